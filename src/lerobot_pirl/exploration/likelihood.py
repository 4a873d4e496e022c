"""Gaussian log-densities and entropies restricted to the executed part of an action chunk.

Shape legend
    B  batch
    H  chunk_size, C executed actions (C <= H)
    A  model action width, D real action dim (D <= A)
    K  denoising steps

Only the executed C×D entries of a chunk reach the environment, so only they enter a log-prob or an
entropy (DESIGN.md §3): padded action dims and the unexecuted tail never do. Everything is float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_ENTROPY_OF_UNIT_STD = 0.5 + _LOG_SQRT_2PI  # ½·log(2πe), the entropy of N(0, 1)


def executed_mask(
    chunk_size: int,
    action_dim: int,
    n_executed: int,
    real_action_dim: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(H, A) float mask, 1 on the first C steps × first D dims."""
    if not 1 <= n_executed <= chunk_size:
        raise ValueError(f"executed actions C={n_executed} must be in [1, chunk_size={chunk_size}]")
    if not 1 <= real_action_dim <= action_dim:
        raise ValueError(f"real action dim D={real_action_dim} must be in [1, A={action_dim}]")
    mask = torch.zeros(chunk_size, action_dim, dtype=torch.float32, device=device)
    mask[:n_executed, :real_action_dim] = 1.0
    return mask


def _elementwise_log_density(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    z = (x - mean) / std
    return -0.5 * z**2 - torch.log(std) - _LOG_SQRT_2PI


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, mask: Tensor) -> Tensor:
    """Σ over masked elements of log N(x; mean, std²).  x, mean: (B, H, A); std broadcastable; mask (H, A).

    Returns (B,).
    """
    log_density = _elementwise_log_density(x.float(), mean.float(), std.float())
    return (log_density * mask).flatten(1).sum(-1)


def gaussian_entropy(std: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked elements of ½·log(2πe·σ²).  std: (B, H, A) or broadcastable; mask (H, A) -> (B,).

    Per element, as the reference normalises its entropy bonus: a sum over the C×D executed elements
    would make the same coefficient C·D times stronger (DESIGN.md §3)."""
    entropy = _ENTROPY_OF_UNIT_STD + torch.log(std.float())
    return (entropy.expand(entropy.shape[0], *mask.shape) * mask).flatten(1).sum(-1) / mask.sum()


def flow_noise_chain_entropy(stds: Tensor, mask: Tensor) -> Tensor:
    """Flow-Noise entropy of a chain per executed element: the mean over its K+1 terms (the prior N(0, I)
    on x_0, then the K transitions' Gaussians), as its log-prob (`flow_noise_chain_log_prob`) and the
    reference normalise. stds: (B, K, H, A); mask (H, A). Returns (B,)."""
    num_terms = stds.shape[1] + 1
    transitions = torch.stack([gaussian_entropy(stds[:, k], mask) for k in range(stds.shape[1])], 1)
    return (_ENTROPY_OF_UNIT_STD + transitions.sum(1)) / num_terms


def flow_noise_chain_log_prob(chain: Tensor, means: Tensor, stds: Tensor, mask: Tensor) -> Tensor:
    """Flow-Noise likelihood of a whole denoising chain (one-layer MDP, πRL Eq. 5, DESIGN.md §3).

    chain: (B, K+1, H, A) with x_0 ~ N(0, I); means, stds: (B, K, H, A), the Gaussian of each transition
    x_k -> x_{k+1}. Per executed element: the MEAN over the K+1 terms (prior on x_0 plus K transitions);
    then the SUM over the C×D executed elements (πRL Eq. 5 writes the sum over the terms; the mean is the
    reference implementation's normalisation). Returns (B,).
    """
    num_terms = chain.shape[1]
    prior = _elementwise_log_density(
        chain[:, 0].float(), torch.zeros_like(chain[:, 0]), torch.ones_like(chain[:, 0])
    )
    transitions = _elementwise_log_density(chain[:, 1:].float(), means.float(), stds.float()).sum(1)
    per_element = (prior + transitions) / num_terms  # (B, H, A)
    return (per_element * mask).flatten(1).sum(-1)
