"""PPO loss terms as pure functions (CleanRL's ppo_continuous_action, with DPPO's notation).

Shapes: every input is (M,), one entry per decision of the minibatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clipped_surrogate_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    clip_ratio: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """-E[w·min(r·Â, clip(r, 1-ε, 1+ε)·Â)] with r = exp(ℓ_new - ℓ_old) (πRL Eqs. 14-15); w the loss
    weights (1 by default).

    Returns the loss and diagnostics: both KL estimators of the old policy from the new (Schulman's k3,
    always >= 0, and k1 = E[ℓ_old - ℓ_new], the reference's), and two clip fractions per sample: CleanRL's
    |r - 1| > ε, and the reference's "the clipped branch is the one the loss takes" (r outside the
    range on the side where clipping binds for the sign of Â)."""
    log_ratio = logprob - old_logprob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample if weights is None else per_sample * weights).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "approx_kl_k1": (-log_ratio).mean(),
            "clipped": ((ratio - 1.0).abs() > clip_ratio).float(),  # (M,)
            "clipped_active": (unclipped < clipped).float(),  # (M,)
            "ratio": ratio.detach(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    value_clip: float | None,
    huber_delta: float | None,
    weights: Tensor | None = None,
) -> Tensor:
    """Clipped value loss: max of the losses of V and of V clipped to old_V ± clip (PPO2 / CleanRL),
    averaged with the loss weights (1 by default)."""

    def error(prediction: Tensor) -> Tensor:
        if huber_delta is None:
            return 0.5 * (prediction - returns) ** 2
        return F.huber_loss(prediction, returns, reduction="none", delta=huber_delta)

    loss = error(values)
    if value_clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        loss = torch.maximum(loss, error(clipped))
    return (loss if weights is None else loss * weights).mean()


def explained_variance(predictions: Tensor, targets: Tensor) -> float:
    """1 - Var[y - ŷ] / Var[y]; nan when the targets do not vary."""
    variance = targets.var()
    if variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / variance)
