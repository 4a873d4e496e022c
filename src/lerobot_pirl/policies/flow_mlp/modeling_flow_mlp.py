"""``flow_mlp``: a small flow-matching policy (MLP velocity field) in LeRobot's policy API.

Shape legend
    B  batch
    H  chunk_size, actions per predicted chunk
    A  action dim (the real one: flow_mlp pads nothing, so A = D)
    S  observation vector width (observation.state and observation.environment_state, concatenated)
    E  task_embed_dim (multi-task policies only)
    F  feature_dim, width of the encoded observation
    W  hidden_dim, width of the velocity MLP's hidden layers
    T  time_embed_dim
    K  num_inference_steps

Time follows LeRobot's pi0: t = 1 is noise, t = 0 is the action; x_t = t * noise + (1 - t) * action,
the network regresses u = noise - action, and sampling runs K Euler steps x <- x + dt * v, dt = -1/K.

The RL layer (FlowAdapter for flow_mlp) drives the chain itself through exactly two methods of
``FlowMLPPolicy.model``: ``encode_observation(batch) -> (B, F)`` and
``velocity(features, x_t, t) -> (v (B, H, A), hidden (B, H, W))``. ``predict_action_chunk`` is nothing
but LeRobot's ``euler_integrate`` over ``model.velocity``, so an external sampler reproduces it exactly.
"""

from collections import deque

import torch
from lerobot.policies.common.flow_matching import euler_integrate, sample_noise, sample_time_beta
from lerobot.policies.common.vla_utils import create_sinusoidal_pos_embedding
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE
from torch import Tensor, nn

from .configuration_flow_mlp import OBS_TASK_INDEX, FlowMLPConfig


def make_mlp(widths: list[int], final_activation: bool) -> nn.Sequential:
    """Linear layers of the given widths with SiLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(width_in, width_out))
        if final_activation or index < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class FlowMLPImageEncoder(nn.Module):
    """Small strided CNN for one small image: (B, C, h, w) -> (B, image_feature_dim)."""

    def __init__(self, image_shape: tuple[int, ...], config: FlowMLPConfig):
        super().__init__()
        channels = [image_shape[0], *config.image_conv_channels]
        convs: list[nn.Module] = []
        for channels_in, channels_out in zip(channels[:-1], channels[1:], strict=True):
            convs += [nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1), nn.SiLU()]
        # Adaptive pooling makes the head independent of the image size while keeping a coarse layout.
        convs.append(nn.AdaptiveAvgPool2d(config.image_pool_size))
        self.convs = nn.Sequential(*convs)
        pooled_width = channels[-1] * config.image_pool_size**2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(pooled_width, config.image_feature_dim), nn.SiLU())

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.convs(image))


class FlowMLPModel(nn.Module):
    """Observation encoder + velocity MLP. The RL layer calls ``encode_observation`` and ``velocity``."""

    def __init__(self, config: FlowMLPConfig):
        super().__init__()
        self.config = config
        self.chunk_size = config.chunk_size  # H
        self.action_dim = config.action_feature.shape[0]  # A
        self.feature_dim = config.feature_dim  # F
        self.hidden_dim = config.hidden_dim  # W
        self.time_embed_dim = config.time_embed_dim  # T
        self.observation_clip = config.observation_clip

        # Vector observations, in a fixed order.
        self.vector_keys: list[str] = []
        vector_width = 0  # S
        for key, feature in (
            (OBS_STATE, config.robot_state_feature),
            (OBS_ENV_STATE, config.env_state_feature),
        ):
            if feature is not None:
                self.vector_keys.append(key)
                vector_width += feature.shape[0]

        image = config.image_feature
        self.image_key: str | None = image[0] if image is not None else None
        self.image_encoder = FlowMLPImageEncoder(image[1].shape, config) if image is not None else None
        image_width = config.image_feature_dim if image is not None else 0
        # A multi-task policy tells its tasks apart by a learned embedding of the task's instruction.
        vocabulary = config.task_vocabulary
        self.task_embedding = nn.Embedding(len(vocabulary), config.task_embed_dim) if vocabulary else None
        task_width = config.task_embed_dim if vocabulary else 0

        self.observation_encoder = make_mlp(
            [vector_width + image_width + task_width]
            + [config.hidden_dim] * (config.encoder_num_layers - 1)
            + [self.feature_dim],
            final_activation=False,
        )
        self.time_mlp = make_mlp([self.time_embed_dim, self.time_embed_dim], final_activation=True)
        chunk_width = self.chunk_size * self.action_dim  # H * A
        self.velocity_trunk = make_mlp(
            [self.feature_dim + chunk_width + self.time_embed_dim] + [self.hidden_dim] * config.num_layers,
            final_activation=True,
        )
        self.velocity_out = nn.Linear(self.hidden_dim, chunk_width)

    def encode_observation(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalised observation batch -> features (B, F) float32. Grad-enabled."""
        parts = [batch[key].to(torch.float32) for key in self.vector_keys]  # each (B, S_key)
        if self.observation_clip is not None:
            parts = [part.clamp(-self.observation_clip, self.observation_clip) for part in parts]
        if self.image_encoder is not None:
            parts.append(
                self.image_encoder(batch[self.image_key].to(torch.float32))
            )  # (B, image_feature_dim)
        if self.task_embedding is not None:
            if OBS_TASK_INDEX not in batch:
                raise KeyError(
                    f"this multi-task flow_mlp reads {OBS_TASK_INDEX}, which its preprocessor's task step "
                    "adds from each observation's `task` text; run the batch through the saved preprocessor"
                )
            parts.append(self.task_embedding(batch[OBS_TASK_INDEX].reshape(-1)))  # (B, E)
        return self.observation_encoder(torch.cat(parts, dim=-1))  # (B, F)

    def embed_time(self, t: Tensor) -> Tensor:
        """t (B,) in [0, 1] -> (B, T) float32 (LeRobot's sinusoidal embedding, then a small MLP)."""
        # LeRobot computes the sinusoid in float64 on CPU; cast back so everything downstream is float32.
        sinusoid = create_sinusoidal_pos_embedding(
            t, self.time_embed_dim, self.config.min_period, self.config.max_period, device=t.device
        ).to(torch.float32)  # (B, T)
        return self.time_mlp(sinusoid)  # (B, T)

    def velocity(self, features: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One grad-enabled velocity evaluation.

        features: (B, F), x_t: (B, H, A), t: (B,) float32.
        Returns v (B, H, A) and the last hidden layer of the velocity MLP, shared by every action of
        the chunk (the MLP sees the chunk as one flat vector), expanded to (B, H, W).
        """
        batch_size = x_t.shape[0]
        inputs = torch.cat(
            [features, x_t.reshape(batch_size, -1), self.embed_time(t)], dim=-1
        )  # (B, F+H*A+T)
        hidden = self.velocity_trunk(inputs)  # (B, W)
        v = self.velocity_out(hidden).reshape(batch_size, self.chunk_size, self.action_dim)  # (B, H, A)
        return v, hidden.unsqueeze(1).expand(batch_size, self.chunk_size, self.hidden_dim)  # (B, H, W)


class FlowMLPPolicy(PreTrainedPolicy):
    """LeRobot policy wrapper: flow-matching loss in ``forward``, K-step Euler sampling for actions."""

    config_class = FlowMLPConfig
    name = "flow_mlp"

    def __init__(self, config: FlowMLPConfig, **kwargs):
        # make_policy also passes dataset_stats / dataset_meta: normalisation lives in the processors.
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.model = FlowMLPModel(config)
        self.reset()

    def get_optim_params(self) -> dict:
        return self.parameters()

    def reset(self) -> None:
        """Clear the queue of executed actions (call on env reset)."""
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        """Flow-matching loss. ``reduction="none"`` gives per-sample losses (B,) (LeRobot's RA-BC hook)."""
        actions = batch[ACTION].to(torch.float32)  # (B, H, A)
        batch_size = actions.shape[0]
        noise = sample_noise(actions.shape, actions.device)  # (B, H, A)
        time = sample_time_beta(
            batch_size,
            actions.device,
            alpha=self.config.time_sampling_beta_alpha,
            beta=self.config.time_sampling_beta_beta,
            scale=self.config.time_sampling_scale,
            offset=self.config.time_sampling_offset,
        )  # (B,)
        t = time[:, None, None]  # (B, 1, 1)
        x_t = t * noise + (1 - t) * actions  # (B, H, A)
        target = noise - actions  # (B, H, A)

        v, _ = self.model.velocity(self.model.encode_observation(batch), x_t, time)
        squared_error = (v - target).pow(2)  # (B, H, A)

        # Steps past the episode end are padding copies of the last action: keep them out of the loss.
        if "action_is_pad" in batch:
            valid = (~batch["action_is_pad"]).to(squared_error.dtype)  # (B, H)
        else:
            valid = squared_error.new_ones(squared_error.shape[:2])  # (B, H)
        valid_elements = valid.sum(dim=1) * self.model.action_dim  # (B,)
        per_sample_loss = (squared_error * valid[..., None]).sum(dim=(1, 2)) / valid_elements.clamp_min(1)

        if reduction == "none":
            return per_sample_loss, {"loss": per_sample_loss.mean().item()}
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
        loss = (squared_error * valid[..., None]).sum() / valid_elements.sum().clamp_min(1)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Sample a normalised action chunk (B, H, A) with K Euler steps from ``noise`` (B, H, A) at t = 1."""
        features = self.model.encode_observation(batch)  # (B, F)
        if noise is None:
            shape = (features.shape[0], self.model.chunk_size, self.model.action_dim)
            noise = sample_noise(shape, features.device)  # (B, H, A)
        return euler_integrate(
            lambda x_t, t: self.model.velocity(features, x_t, t)[0],
            noise.to(torch.float32),
            self.config.num_inference_steps,
        )  # (B, H, A)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action (B, A): sample a chunk when the queue is empty, then execute its first C actions."""
        self.eval()
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch, noise=noise)[
                :, : self.config.n_action_steps
            ]  # (B, C, A)
            self._action_queue.extend(chunk.transpose(0, 1))  # C tensors of (B, A)
        return self._action_queue.popleft()
