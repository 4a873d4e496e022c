"""FlowAdapter for the package's own `flow_mlp` policy: observation encoder once, velocity MLP per step."""

from __future__ import annotations

from torch import Tensor, nn

from lerobot_pirl.adapters.base import FlowAdapter, FlowContext, FlowSizes


class FlowMLPAdapter(FlowAdapter):
    """Wraps a FlowMLPPolicy. `num_steps` overrides the policy's K (also for evaluation, which must
    use the same K as training)."""

    def __init__(self, policy: nn.Module, num_steps: int | None = None):
        super().__init__()
        self.policy = policy
        config = policy.config
        if num_steps is not None:
            config.num_inference_steps = num_steps
        model = policy.model
        self._sizes = FlowSizes(
            chunk_size=config.chunk_size,
            action_dim=model.action_dim,
            real_action_dim=model.action_dim,
            num_steps=config.num_inference_steps,
            n_action_steps=config.n_action_steps,
            pooled_dim=model.feature_dim,
            hidden_dim=model.hidden_dim,
        )

    @property
    def sizes(self) -> FlowSizes:
        return self._sizes

    def encode(self, batch: dict[str, Tensor]) -> FlowContext:
        features = self.policy.model.encode_observation(batch)  # (B, F)
        return FlowContext(data=features, pooled=features)

    def velocity(self, context: FlowContext, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.policy.model.velocity(context.data, x_t, t)

    def trunk_parameters(self) -> list[nn.Parameter]:
        model = self.policy.model
        encoders = [model.observation_encoder, model.image_encoder, model.task_embedding]
        return [p for module in encoders if module is not None for p in module.parameters()]
