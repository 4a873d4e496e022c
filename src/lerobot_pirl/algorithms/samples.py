"""The update's view of a rollout: its valid decisions, flattened, with advantages and critic targets.

Shape legend
    M  valid decisions (rows whose mask is True), flattened over (T, N)
    R  stored observation rows (T*N of a rollout: the samples index them instead of copying)
    K  denoising steps, H chunk_size, A model action width
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lerobot_pirl.rollout.batch import RolloutBatch, expand_observation


@dataclass
class UpdateSamples:
    observations: dict[str, Tensor]  # each (R, ...), as stored (images uint8)
    chains: Tensor  # (M, K+1, H, A)
    step_index: Tensor  # (M,)
    old_logprobs: Tensor  # (M,)
    old_values: Tensor  # (M,)
    advantages: Tensor  # (M,)
    returns: Tensor  # (M,)
    observation_rows: Tensor | None = None  # (M,) int64: sample i reads observation row i or this row
    loss_weights: Tensor | None = None  # (M,) float32, each decision's weight in the loss means; None = 1

    def __post_init__(self):
        if self.observation_rows is None:
            self.observation_rows = torch.arange(len(self.chains))
        if self.loss_weights is None:
            self.loss_weights = torch.ones(len(self.chains), device=self.chains.device)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """Every field but the observations, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.name not in ("observations", "observation_rows"))

    @classmethod
    def from_rollout(
        cls,
        batch: RolloutBatch,
        advantages: Tensor,
        returns: Tensor,
        keep: Tensor | None = None,
        loss_weighting: str = "decision",
    ) -> UpdateSamples:
        """advantages, returns: (T, N); keep: optional (T, N) bool further restricting batch.mask;
        loss_weighting: "decision" (every decision weighs 1) or "episode" (1 / its episode's decisions
        among the samples, so that each episode's weights sum to 1).

        One gather per (T, N) tensor; the observations stay in the rollout's storage, viewed as
        (T*N, ...) and indexed by the valid rows at each minibatch.
        """
        valid = batch.mask if keep is None else batch.mask & keep
        rows = valid.reshape(-1).nonzero().squeeze(1)  # (M,) into the flattened (T*N) rows
        if loss_weighting == "episode":
            weights = episode_loss_weights(batch.episode_index, valid)
        else:
            weights = valid.float()

        def gather(tensor: Tensor) -> Tensor:
            return tensor.flatten(0, 1)[rows.to(tensor.device)]

        return cls(
            observations={k: v.flatten(0, 1) for k, v in batch.observations.items()},
            observation_rows=rows,
            chains=gather(batch.chains),
            step_index=gather(batch.step_index),
            old_logprobs=gather(batch.logprobs),
            old_values=gather(batch.values),
            advantages=gather(advantages),
            returns=gather(returns),
            loss_weights=gather(weights),
        )

    @classmethod
    def concatenate(cls, parts: list[UpdateSamples]) -> UpdateSamples:
        if len(parts) == 1:
            return parts[0]
        parts = [p.compacted() for p in parts]  # only the rows in use are copied, in sample order
        return cls(
            observations={k: torch.cat([p.observations[k] for p in parts]) for k in parts[0].observations},
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in cls.tensor_fields()},
        )

    def compacted(self) -> UpdateSamples:
        """The same samples with their own observation rows only (R = M), e.g. to send them."""
        rows = self.observation_rows
        return self.replace(
            observations={k: v[rows.to(v.device)] for k, v in self.observations.items()},
            observation_rows=None,
        )

    def with_unit_mean_weights(self) -> UpdateSamples:
        """The loss weights scaled to mean 1 over these samples: a loss mean over a random minibatch
        then estimates the weighted mean over all of them (RLinf's `masked_mean_ratio` form)."""
        if len(self) == 0:
            return self
        return self.replace(loss_weights=self.loss_weights / self.loss_weights.mean())

    def replace(self, **changes: Tensor) -> UpdateSamples:
        return UpdateSamples(**{**self.__dict__, **changes})

    def __len__(self) -> int:
        return self.chains.shape[0]

    def select(self, index: Tensor, device: torch.device | str, *, expand: bool = True) -> UpdateSamples:
        """Samples `index` on `device`; `expand`: observations as the policy reads them (images float32,
        converted there, once per micro-batch), else as stored."""
        rows = self.observation_rows[index]
        stored = {k: v[rows.to(v.device)].to(device) for k, v in self.observations.items()}
        return UpdateSamples(
            observations=expand_observation(stored) if expand else stored,
            **{name: getattr(self, name)[index].to(device) for name in self.tensor_fields()},
        )


def episode_loss_weights(episode_index: Tensor, valid: Tensor) -> Tensor:
    """(T, N) float32: 1 / L_e on the valid decisions of episode e, L_e its valid decisions here; else 0.

    episode_index, valid: (T, N). An episode that crosses the rollout's end weighs as much as a whole one
    (its length here is what the rollout holds of it)."""
    index = episode_index.clamp(min=0)
    counts = torch.bincount(index[valid], minlength=int(index.max()) + 1 if index.numel() else 0)  # (E,)
    weights = 1.0 / counts.clamp(min=1).float()
    return torch.where(valid, weights[index], torch.zeros((), dtype=torch.float32))
