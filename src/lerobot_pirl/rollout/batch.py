"""What a rollout hands to the algorithms: one decision (= one action chunk) per env per row.

Shape legend
    T  decisions per env
    N  parallel envs
    K  denoising steps, H chunk_size, A model action width
    E  episodes that started in this rollout

Each tensor field says in its metadata what it is indexed by ("decision": (T, N), "episode": (E,)) and its
dtype; moving, encoding and checking a batch derive from that one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


def _per(kind: str, dtype: torch.dtype):
    return field(metadata={"per": kind, "dtype": dtype})


@dataclass
class RolloutBatch:
    # each (T, N, ...): the policy-preprocessed observation of decision t, images as uint8 where exact
    # (`compact_observation`; `expand_observation` gives the policy's float32 back)
    observations: dict[str, Tensor]
    chains: Tensor  # (T, N, K+1, H, A) denoising chains, float
    step_index: Tensor = _per("decision", torch.int64)  # Flow-SDE's stochastic step k*
    logprobs: Tensor = _per("decision", torch.float32)  # log-prob at collection time
    values: Tensor = _per("decision", torch.float32)  # V(o_t) at collection time
    rewards: Tensor = _per("decision", torch.float32)  # sum of the chunk's step rewards
    terminated: Tensor = _per("decision", torch.bool)  # the episode terminated during this chunk
    truncated: Tensor = _per("decision", torch.bool)  # the episode hit its time limit during this chunk
    next_values: Tensor = _per("decision", torch.float32)  # V after the chunk (final obs if it ended)
    mask: Tensor = _per("decision", torch.bool)  # the decision is real (False after an episode ended)
    episode_index: Tensor = _per("decision", torch.int64)  # into the episode tensors, -1 where masked
    episode_returns: Tensor = _per("episode", torch.float32)  # undiscounted return of each episode
    episode_success: Tensor = _per("episode", torch.bool)
    episode_lengths: Tensor = _per("episode", torch.int64)  # env steps
    episode_done: Tensor = _per("episode", torch.bool)  # the episode finished inside this rollout
    episode_task: Tensor = _per("episode", torch.int64)  # the episode's task, into the run's TaskSet
    env_steps: int = 0  # env steps taken by the rollout (all envs, masked ones excluded)
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def num_decisions(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS}
        observations = {k: v.to(device) for k, v in self.observations.items()}
        return RolloutBatch(observations=observations, **moved, env_steps=self.env_steps, extras=self.extras)


PER_DECISION_DTYPES = {
    f.name: f.metadata["dtype"] for f in fields(RolloutBatch) if f.metadata.get("per") == "decision"
}
PER_EPISODE_DTYPES = {
    f.name: f.metadata["dtype"] for f in fields(RolloutBatch) if f.metadata.get("per") == "episode"
}
TENSOR_FIELDS = ("chains", *PER_DECISION_DTYPES, *PER_EPISODE_DTYPES)  # every tensor but the observations


IMAGE_LEVELS = 255  # LeRobot's `preprocess_observation` turns uint8 pixels into float32 k / 255


def compact_observation(observation: dict[str, Tensor]) -> dict[str, Tensor]:
    """Camera images (float (B, C, H, W) tensors holding exactly k / 255) as uint8 k: 4x smaller, and
    `expand_observation` restores the very same float32 values. Anything else is kept as it is."""
    compact = {}
    for key, value in observation.items():
        if value.ndim == 4 and value.dtype == torch.float32:
            levels = (value * IMAGE_LEVELS).round_()
            exact = bool(levels.min() >= 0) and bool(levels.max() <= IMAGE_LEVELS)
            if exact and torch.equal(levels.to(torch.uint8).to(torch.float32) / IMAGE_LEVELS, value):
                compact[key] = levels.to(torch.uint8)
                continue
        compact[key] = value
    return compact


def expand_observation(observation: dict[str, Tensor]) -> dict[str, Tensor]:
    """The policy's float32 inputs from a rollout's stored observation (the inverse of compact)."""
    return {
        key: value.to(torch.float32) / IMAGE_LEVELS if value.dtype == torch.uint8 else value
        for key, value in observation.items()
    }
