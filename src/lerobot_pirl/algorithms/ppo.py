"""PPO over decisions: continuous chunked rollouts, GAE advantages with a learned critic."""

from __future__ import annotations

import torch

from lerobot_pirl.algorithms.advantages import compute_gae
from lerobot_pirl.algorithms.base import Algorithm, GroupResetHook, RolloutShape, register_algorithm
from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector


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
    return UpdateSamples.from_rollout(batch, advantages, returns, loss_weighting=cfg.loss_weighting)


@register_algorithm("ppo")
class PPO(Algorithm):
    cfg: PPOConfig

    def collect(
        self, collector: ChunkCollector, rollout: RolloutShape, group_reset: GroupResetHook
    ) -> list[RolloutBatch]:
        """T = decisions_per_env decisions per env; episodes carry over between iterations (up to a
        checkpoint, where the trainer restarts them)."""
        collector.policy.eval()
        return [collector.collect(rollout.decisions_per_env, self.cfg.exploration)]

    def update_samples(self, batches: list[RolloutBatch]) -> tuple[UpdateSamples | None, dict[str, float]]:
        """GAE per batch (per env inside it), concatenated; loss weights of mean 1 over all of them."""
        if not batches:
            return None, {}
        samples = UpdateSamples.concatenate([ppo_samples(batch, self.cfg) for batch in batches])
        return samples.with_unit_mean_weights(), {}

    def seed_budget(self, rollout: RolloutShape) -> int:
        # The first rollout resets every env, then each decision can end at most every env's episode.
        return rollout.num_envs * (rollout.decisions_per_env + 1)
