"""What a rollout hands to the algorithms: one decision (= one action chunk) per env per row.

Shape legend
    T  decisions per env
    N  parallel envs
    K  denoising steps, H chunk_size, A model action width
    E  episodes that started in this rollout
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    observations: dict[str, Tensor]  # each (T, N, ...): the policy-preprocessed observation of decision t
    chains: Tensor  # (T, N, K+1, H, A) denoising chains
    step_index: Tensor  # (T, N) int64, Flow-SDE's stochastic step k*
    logprobs: Tensor  # (T, N) float32, log-prob at collection time
    values: Tensor  # (T, N) float32, V(o_t) at collection time
    rewards: Tensor  # (T, N) float32, sum of the chunk's step rewards
    terminated: Tensor  # (T, N) bool, the episode terminated during this chunk
    truncated: Tensor  # (T, N) bool, the episode hit its time limit during this chunk
    next_values: Tensor  # (T, N) V of the observation after the chunk (final obs if the episode ended)
    mask: Tensor  # (T, N) bool, the decision is real (False after an episode ended in episodic mode)
    episode_index: Tensor  # (T, N) int64 into the episode tensors below, -1 where mask is False
    episode_returns: Tensor  # (E,) float32, undiscounted return of each episode that started here
    episode_success: Tensor  # (E,) bool
    episode_lengths: Tensor  # (E,) int64, env steps
    episode_done: Tensor  # (E,) bool, the episode finished inside this rollout
    env_steps: int = 0  # env steps taken by the rollout (all envs, masked ones excluded)
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def num_decisions(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device)
            elif f.name == "observations":
                value = {k: v.to(device) for k, v in value.items()}
            moved[f.name] = value
        return RolloutBatch(**moved)
