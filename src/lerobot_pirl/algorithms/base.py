"""What each algorithm decides for the training loop, and the registry that looks it up once.

An `Algorithm` says how to collect a rollout for it, which batches it can use, how batches become update
samples with their advantages and statistics, and how many reset seeds one rollout may draw. The trainer,
the learner and the actors call these and never ask which algorithm they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import gymnasium as gym

from lerobot_pirl.algorithms.config import AlgorithmConfig
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector

ResetHook = Callable[[gym.vector.VectorEnv, list[int]], None]
# group size -> what to do to the sub-envs before an episodic reset whose seeds come in such groups
GroupResetHook = Callable[[int], ResetHook | None]


class RolloutShape(Protocol):
    """The `--rollout.*` values an algorithm reads (runtime's RolloutConfig)."""

    num_envs: int
    decisions_per_env: int
    episodes_per_env: int


class Algorithm:
    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg

    def collect(
        self, collector: ChunkCollector, rollout: RolloutShape, group_reset: GroupResetHook
    ) -> list[RolloutBatch]:
        """One iteration's rollouts from `collector` (in eval mode: dropout off while sampling)."""
        raise NotImplementedError

    def check_batch(self, batch: RolloutBatch) -> None:
        """Raise ValueError for a batch this algorithm cannot learn from."""

    def update_samples(self, batches: list[RolloutBatch]) -> tuple[UpdateSamples | None, dict[str, float]]:
        """Samples and advantages of an iteration's batches, in their order, and the algorithm's own
        statistics of them (the same on every path). None when there are no batches."""
        raise NotImplementedError

    def batches_per_rollout(self, rollout: RolloutShape) -> int:
        return 1

    def seed_budget(self, rollout: RolloutShape) -> int:
        """An upper bound on the reset seeds one rollout draws (actors get disjoint ranges of it)."""
        raise NotImplementedError


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: `--algorithm.type=name` runs this Algorithm (its config registers the same name)."""

    def register(cls: type[Algorithm]) -> type[Algorithm]:
        ALGORITHMS[name] = cls
        return cls

    return register


def make_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    import lerobot_pirl.algorithms.grpo  # noqa: F401  (registers "grpo")
    import lerobot_pirl.algorithms.ppo  # noqa: F401  (registers "ppo")

    return ALGORITHMS[cfg.type](cfg)
