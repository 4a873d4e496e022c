"""GRPO: group-relative episode advantages, no critic (DESIGN.md §4)."""

from __future__ import annotations

from lerobot_pirl.algorithms.advantages import group_relative_advantages
from lerobot_pirl.algorithms.config import GRPOConfig
from lerobot_pirl.algorithms.update import UpdateSamples
from lerobot_pirl.rollout.batch import RolloutBatch


def grpo_samples(batch: RolloutBatch, cfg: GRPOConfig) -> tuple[UpdateSamples, dict[str, float]]:
    """Every decision of an episode gets that episode's group-relative advantage.

    The batch must come from an episodic rollout whose episodes are ordered in groups of
    `cfg.group_size` consecutive episodes that shared their initial state, each finished.
    Groups whose episodes all scored the same are dropped.
    """
    if not bool(batch.episode_done.all()):
        raise ValueError("GRPO needs whole episodes: collect with one full episode per env")
    advantages_per_episode, keep_episode = group_relative_advantages(
        batch.episode_returns, cfg.group_size, cfg.advantage_eps
    )
    index = batch.episode_index.clamp(min=0)
    advantages = advantages_per_episode[index]  # (T, N)
    keep = keep_episode[index] & batch.mask
    samples = UpdateSamples.from_rollout(batch, advantages, advantages, keep)
    stats = {"grpo/kept_group_fraction": float(keep_episode.float().mean())}
    return samples, stats
