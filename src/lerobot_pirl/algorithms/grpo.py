"""GRPO: groups of envs reset to one initial state, group-relative episode advantages, no critic
(DESIGN.md §4)."""

from __future__ import annotations

import torch

from lerobot_pirl.algorithms.advantages import group_relative_advantages
from lerobot_pirl.algorithms.base import Algorithm, GroupResetHook, RolloutShape, register_algorithm
from lerobot_pirl.algorithms.config import GRPOConfig
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector


def grpo_samples(batch: RolloutBatch, cfg: GRPOConfig) -> tuple[UpdateSamples, dict[str, float]]:
    """Every decision of an episode gets that episode's group-relative advantage.

    The batch must hold one whole episode per env (episodic collection), envs [g*G, (g+1)*G) forming
    group g. Groups whose returns are all equal carry no signal and are dropped.
    """
    samples, keep_episode = _group_samples(batch, cfg)
    return samples.with_unit_mean_weights(), {"grpo/kept_group_fraction": float(keep_episode.float().mean())}


def _group_samples(batch: RolloutBatch, cfg: GRPOConfig) -> tuple[UpdateSamples, torch.Tensor]:
    """The batch's update samples and which of its episodes are kept, (E,) bool."""
    check_whole_episodes(batch)
    advantages_per_episode, keep_episode = group_relative_advantages(
        batch.episode_returns, cfg.group_size, cfg.advantage_eps
    )
    index = batch.episode_index.clamp(min=0)
    advantages = advantages_per_episode[index]  # (T, N)
    keep = keep_episode[index] & batch.mask
    samples = UpdateSamples.from_rollout(batch, advantages, advantages, keep, cfg.loss_weighting)
    return samples, keep_episode


def check_whole_episodes(batch: RolloutBatch) -> None:
    if not bool(batch.episode_done.all()):
        raise ValueError("GRPO needs whole episodes: collect with one full episode per env")


@register_algorithm("grpo")
class GRPO(Algorithm):
    cfg: GRPOConfig

    def collect(
        self, collector: ChunkCollector, rollout: RolloutShape, group_reset: GroupResetHook
    ) -> list[RolloutBatch]:
        """episodes_per_env rounds; in each, the envs of a group reset from one seed (and init state)."""
        collector.policy.eval()
        group_size = self.cfg.group_size
        batches = []
        for _ in range(rollout.episodes_per_env):
            group_seeds = collector.take_seeds(collector.num_envs // group_size)
            seeds = [seed for seed in group_seeds for _ in range(group_size)]  # identical resets
            batches.append(
                collector.collect_episodes(seeds, self.cfg.exploration, before_reset=group_reset(group_size))
            )
        return batches

    def check_batch(self, batch: RolloutBatch) -> None:
        check_whole_episodes(batch)

    def update_samples(self, batches: list[RolloutBatch]) -> tuple[UpdateSamples | None, dict[str, float]]:
        """Advantages per batch (groups never span batches), loss weights of mean 1 over all of them; the
        kept-group fraction over all of them."""
        if not batches:
            return None, {}
        parts, kept = zip(*(_group_samples(batch, self.cfg) for batch in batches), strict=True)
        fraction = float(torch.cat(kept).float().mean())  # every group has G episodes: = the group fraction
        samples = UpdateSamples.concatenate(list(parts)).with_unit_mean_weights()
        return samples, {"grpo/kept_group_fraction": fraction}

    def batches_per_rollout(self, rollout: RolloutShape) -> int:
        return rollout.episodes_per_env

    def seed_budget(self, rollout: RolloutShape) -> int:
        # One seed per group and episode round.
        return (rollout.num_envs // self.cfg.group_size) * rollout.episodes_per_env
