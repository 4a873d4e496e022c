"""Advantages over decisions (one decision = one action chunk, DESIGN.md §4).

Shape legend
    T  decisions per env in the rollout
    N  parallel envs
    E  episodes (GRPO), G group size

A chunk's reward is the sum of its C step rewards; an episode ends at the first chunk in which one of its
steps terminated or truncated. Terminations do not bootstrap; time-limit truncations do, with the value of
the final observation (Pardo et al. 2018, "Time Limits in RL"; SB3 does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over decisions (πRL Eq. 13, per action chunk).

    rewards, values: (T, N).
    next_values: (T, N), V of the observation that follows decision t: for a decision that ended its episode,
        the value of the episode's final observation; for the last decision of the rollout, the value of the
        observation the rollout stopped at.
    terminated, truncated: (T, N) bool, the episode ended at decision t by termination / by a time limit.
    Returns (advantages, returns), both (T, N); returns = advantages + values (the critic's target).
    """
    not_terminated = (~terminated).float()
    continues = (~(terminated | truncated)).float()  # the next decision belongs to the same episode
    deltas = rewards + gamma * not_terminated * next_values - values  # (T, N)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])  # (N,)
    for t in reversed(range(rewards.shape[0])):
        running = deltas[t] + gamma * gae_lambda * continues[t] * running
        advantages[t] = running
    return advantages, advantages + values


def group_relative_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """GRPO: Â = (score - mean_g) / (std_g + eps) inside each group of G episodes that share a reset,
    std_g Bessel-corrected (÷ (G-1), as the reference's `torch.std`).

    scores: (E,) episode returns, E a multiple of G, consecutive episodes forming a group.
    Returns (advantages (E,), keep (E,) bool). Groups whose scores are all equal carry no learning signal
    and are dropped (keep = False, advantage 0).
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} episodes do not split into groups of {group_size}")
    grouped = scores.float().view(-1, group_size)  # (E/G, G)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    keep = (grouped.max(1, keepdim=True).values > grouped.min(1, keepdim=True).values).expand_as(grouped)
    advantages = torch.where(keep, (grouped - mean) / (std + eps), torch.zeros_like(grouped))
    return advantages.reshape(-1), keep.reshape(-1)
