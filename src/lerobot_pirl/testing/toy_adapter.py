"""A tiny analytic FlowAdapter for testing the RL layer without any LeRobot model.

velocity(x, t | o) = tanh(x @ M + t·u + o @ P) @ N, with one hidden layer so the Flow-Noise head
has expert states to read. Shapes follow adapters/base.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lerobot_pirl.adapters.base import FlowAdapter, FlowContext, FlowSizes


class ToyVelocityNet(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int):
        super().__init__()
        self.encoder = nn.Linear(obs_dim, hidden_dim)  # the "trunk": observation -> features (B, F)
        self.x_in = nn.Linear(action_dim, hidden_dim)
        self.t_in = nn.Linear(1, hidden_dim)
        self.out = nn.Linear(hidden_dim, action_dim)


class ToyFlowAdapter(FlowAdapter):
    """Observation key `observation.state` (B, obs_dim). A may exceed D to exercise padding."""

    def __init__(
        self,
        obs_dim: int = 3,
        chunk_size: int = 4,
        action_dim: int = 3,
        real_action_dim: int = 2,
        num_steps: int = 4,
        n_action_steps: int = 2,
        hidden_dim: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.policy = ToyVelocityNet(obs_dim, action_dim, hidden_dim)
        self._sizes = FlowSizes(
            chunk_size=chunk_size,
            action_dim=action_dim,
            real_action_dim=real_action_dim,
            num_steps=num_steps,
            n_action_steps=n_action_steps,
            pooled_dim=hidden_dim,
            hidden_dim=hidden_dim,
        )
        self.velocity_calls = 0  # rows evaluated, to check the cost of an update

    @property
    def sizes(self) -> FlowSizes:
        return self._sizes

    def encode(self, batch: dict[str, Tensor]) -> FlowContext:
        features = torch.tanh(self.policy.encoder(batch["observation.state"].float()))  # (B, F)
        return FlowContext(data=features, pooled=features)

    def velocity(self, context: FlowContext, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        self.velocity_calls += x_t.shape[0]
        net = self.policy
        hidden = torch.tanh(
            net.x_in(x_t) + net.t_in(t.view(-1, 1, 1).expand(*x_t.shape[:2], 1)) + context.data[:, None, :]
        )  # (B, H, W)
        return net.out(hidden), hidden

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self.policy.encoder.parameters())


def toy_rl_policy(exploration: str = "flow_sde", adapter: FlowAdapter | None = None, **settings):
    """A FlowRLPolicy over the toy adapter with PPO's default settings (flow_mlp's critic); `settings`
    override them."""
    from lerobot_pirl.algorithms.config import PPOConfig
    from lerobot_pirl.rl_policy import FlowRLPolicy

    defaults = {
        **PPOConfig(exploration=exploration).resolved("flow_mlp").policy_settings(),
        "n_action_steps": None,
    }
    return FlowRLPolicy(adapter if adapter is not None else ToyFlowAdapter(), **{**defaults, **settings})
