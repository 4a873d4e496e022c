"""PPO over decisions: GAE advantages with a learned critic, then the clipped-surrogate update."""

from __future__ import annotations

import torch

from lerobot_pirl.algorithms.advantages import compute_gae
from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.algorithms.update import UpdateSamples
from lerobot_pirl.rollout.batch import RolloutBatch


def ppo_samples(batch: RolloutBatch, cfg: PPOConfig) -> UpdateSamples:
    """GAE(γ, λ) per env over the rollout's decisions; masked decisions never enter the update."""
    rewards = torch.where(batch.mask, batch.rewards, torch.zeros_like(batch.rewards))
    advantages, returns = compute_gae(
        rewards,
        batch.values,
        batch.next_values,
        batch.terminated,
        batch.truncated,
        cfg.gamma,
        cfg.gae_lambda,
    )
    return UpdateSamples.from_rollout(batch, advantages, returns)
