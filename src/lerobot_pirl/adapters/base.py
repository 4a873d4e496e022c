"""The adapter contract: the only place that knows a LeRobot policy's internals (DESIGN.md §5).

Shape legend
    B  batch (observations)
    H  chunk_size, actions the model outputs per decision
    A  model action width (LeRobot's ``max_action_dim`` for VLAs; the real width for flow_mlp)
    D  real action dim (the env's), D <= A
    K  denoising steps
    F  width of the pooled features given to the critic
    W  width of the expert hidden state of one action token (input of the Flow-Noise head)

Time follows LeRobot: t = 1 is noise, t = 0 is the action.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class FlowSizes:
    chunk_size: int  # H
    action_dim: int  # A
    real_action_dim: int  # D
    num_steps: int  # K
    n_action_steps: int  # C, executed actions per decision (the policy config's default)
    pooled_dim: int  # F
    hidden_dim: int  # W


@dataclass
class FlowContext:
    """What ``encode`` computed once per observation batch and every ``velocity`` call reuses.

    ``data`` is adapter-private (a KV cache, masks, state embeddings...); ``pooled`` is public.
    """

    data: Any
    pooled: Tensor  # (B, F) float32


class FlowAdapter(nn.Module, abc.ABC):
    """Wraps one LeRobot flow policy so the RL layer can drive its denoising chain step by step.

    Subclasses keep the wrapped policy as ``self.policy`` (a registered submodule) so that its
    parameters are the adapter's parameters and saving it writes a standard LeRobot checkpoint.
    ``batch`` is always the output of the policy's own preprocessor (normalised, tokenised).
    """

    policy: nn.Module

    @property
    @abc.abstractmethod
    def sizes(self) -> FlowSizes: ...

    @abc.abstractmethod
    def encode(self, batch: dict[str, Tensor]) -> FlowContext:
        """Run the observation (prefix) part once. Grad flows only into trainable prefix params."""

    @abc.abstractmethod
    def velocity(self, context: FlowContext, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One grad-enabled velocity evaluation.

        x_t: (B, H, A) float32, t: (B,) float32 in [0, 1]
        returns v: (B, H, A) float32 and the expert's hidden states for the action tokens (B, H, W).
        """

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Parameters that make up the observation encoder (VLM / prefix); frozen by default for VLAs."""
        return []

    def policy_state_dict(self) -> dict[str, Tensor]:
        """The wrapped policy's weights as its LeRobot type saves them (e.g. LoRA merged in), so the
        checkpoint loads with the type's own `from_pretrained` and `lerobot-eval`."""
        return self.policy.state_dict()

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the velocity network (action expert + projections)."""
        trunk = {id(p) for p in self.trunk_parameters()}
        return [p for p in self.policy.parameters() if id(p) not in trunk]
