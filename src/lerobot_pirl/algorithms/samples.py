"""The update's view of a rollout: its valid decisions, flattened, with advantages and critic targets.

Shape legend
    M  valid decisions (rows whose mask is True), flattened over (T, N)
    K  denoising steps, H chunk_size, A model action width
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lerobot_pirl.rollout.batch import RolloutBatch


@dataclass
class UpdateSamples:
    observations: dict[str, Tensor]  # each (M, ...)
    chains: Tensor  # (M, K+1, H, A)
    step_index: Tensor  # (M,)
    old_logprobs: Tensor  # (M,)
    old_values: Tensor  # (M,)
    advantages: Tensor  # (M,)
    returns: Tensor  # (M,)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """Every field but the observations, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.name != "observations")

    @classmethod
    def from_rollout(
        cls, batch: RolloutBatch, advantages: Tensor, returns: Tensor, keep: Tensor | None = None
    ) -> UpdateSamples:
        """advantages, returns: (T, N); keep: optional (T, N) bool further restricting batch.mask.

        One gather per tensor: the (T, N) storage is viewed as (T*N, ...) and indexed by the valid rows.
        """
        valid = batch.mask if keep is None else batch.mask & keep
        rows = valid.reshape(-1).nonzero().squeeze(1)  # (M,) into the flattened (T*N) rows

        def gather(tensor: Tensor) -> Tensor:
            return tensor.flatten(0, 1)[rows.to(tensor.device)]

        return cls(
            observations={k: gather(v) for k, v in batch.observations.items()},
            chains=gather(batch.chains),
            step_index=gather(batch.step_index),
            old_logprobs=gather(batch.logprobs),
            old_values=gather(batch.values),
            advantages=gather(advantages),
            returns=gather(returns),
        )

    @classmethod
    def concatenate(cls, parts: list[UpdateSamples]) -> UpdateSamples:
        if len(parts) == 1:
            return parts[0]
        return cls(
            observations={k: torch.cat([p.observations[k] for p in parts]) for k in parts[0].observations},
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in cls.tensor_fields()},
        )

    def replace(self, **changes: Tensor) -> UpdateSamples:
        return UpdateSamples(**{**self.__dict__, **changes})

    def __len__(self) -> int:
        return self.chains.shape[0]

    def select(self, index: Tensor, device: torch.device | str) -> UpdateSamples:
        return UpdateSamples(
            observations={k: v[index].to(device) for k, v in self.observations.items()},
            **{name: getattr(self, name)[index].to(device) for name in self.tensor_fields()},
        )
