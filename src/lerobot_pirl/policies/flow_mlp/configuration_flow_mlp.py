"""Configuration of ``flow_mlp``: a small flow-matching policy for CPU-scale RL (DESIGN.md §5).

The network is an MLP velocity field over the flattened action chunk, conditioned on an observation
encoder (state / environment state and optionally one small image through a small CNN). It follows
the flow-matching conventions of LeRobot's pi0 (t = 1 noise, t = 0 action, Beta time sampling,
Euler sampling with ``dt = -1/K``) so the RL layer drives it exactly like the VLAs.
"""

from dataclasses import dataclass, field

from lerobot.configs import NormalizationMode, PolicyFeature, PreTrainedConfig
from lerobot.optim import AdamWConfig
from lerobot.utils.constants import OBS_IMAGE

# The index of each observation's task in `task_vocabulary`, added by the preprocessor's task step: a
# tensor, so that stored rollouts carry it into the update as they carry every other input.
OBS_TASK_INDEX = "observation.task_index"


@PreTrainedConfig.register_subclass("flow_mlp")
@dataclass
class FlowMLPConfig(PreTrainedConfig):
    """Small flow-matching MLP policy.

    Inputs: ``observation.state`` and/or ``observation.environment_state`` (concatenated) and
    optionally one image (``image_key``, else ``observation.image``, else the first visual feature).
    Output: ``action`` chunks of ``chunk_size`` steps, of the real action dim (no padding).
    """

    # Input / output structure.
    n_obs_steps: int = 1
    chunk_size: int = 8  # H, actions predicted per decision
    n_action_steps: int = 4  # C, actions executed per decision (<= chunk_size)

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ENV": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Flow matching (pi0's conventions: t ~ Beta(alpha, beta) * scale + offset, K Euler steps).
    num_inference_steps: int = 4  # K
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    # Periods of the sinusoidal time embedding (pi0's values).
    min_period: float = 4e-3
    max_period: float = 4.0

    # Observation encoder: MLP over [state, env_state, image features] -> (B, F).
    feature_dim: int = 256  # F
    # Normalised state inputs are clamped to ±observation_clip. A few demos leave some dims almost constant
    # (MetaWorld's object quaternion: std 0.004 over 3 demos), so an RL state that tips the object
    # normalises to ~±300 and every Adam step on those input weights swings the actions (approx-KL 42 on
    # the first update before this clamp). None disables it.
    observation_clip: float | None = 5.0
    encoder_num_layers: int = 2  # linear layers of the encoder MLP

    # Velocity network: MLP over [features, flattened x_t, time embedding] -> v (B, H, A).
    hidden_dim: int = 256  # W, width of every hidden layer
    num_layers: int = 3  # hidden layers of the velocity MLP
    time_embed_dim: int = 64

    # Task conditioning of a multi-task policy: the task instructions (the `task` text of each observation)
    # it was trained on, each with a learned embedding of task_embed_dim. None: one task, no task input.
    task_vocabulary: list[str] | None = None
    task_embed_dim: int = 32

    # Vision: one small image through a small strided CNN (ignored if use_image is False).
    use_image: bool = True
    image_key: str | None = None  # None: "observation.image" if present, else the first visual feature
    image_conv_channels: tuple[int, ...] = (16, 32, 64)  # each conv 3x3 stride 2
    image_pool_size: int = 4  # adaptive average pool to (pool, pool) keeps coarse spatial layout
    image_feature_dim: int = 128

    # Training preset.
    optimizer_lr: float = 1e-3
    optimizer_betas: tuple[float, float] = (0.9, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-4
    optimizer_grad_clip_norm: float = 1.0

    def __post_init__(self):
        super().__post_init__()

        if self.n_obs_steps != 1:
            raise ValueError(
                f"flow_mlp uses the current observation only: n_obs_steps must be 1, got {self.n_obs_steps}."
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) must be in [1, chunk_size ({self.chunk_size})]: "
                "the policy cannot execute more actions than it predicts."
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.time_embed_dim % 2 != 0:
            raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {self.time_embed_dim}.")
        for name in ("feature_dim", "encoder_num_layers", "hidden_dim", "num_layers", "image_feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.observation_clip is not None and self.observation_clip <= 0:
            raise ValueError(f"observation_clip must be > 0 or None, got {self.observation_clip}.")
        if self.task_vocabulary is not None:
            if not self.task_vocabulary or any(not str(task).strip() for task in self.task_vocabulary):
                raise ValueError(
                    f"task_vocabulary must list non-empty instructions, got {self.task_vocabulary}."
                )
            repeated = sorted({t for t in self.task_vocabulary if self.task_vocabulary.count(t) > 1})
            if repeated:
                raise ValueError(f"task_vocabulary lists {repeated[0]!r} more than once.")
            if self.task_embed_dim < 1:
                raise ValueError(f"task_embed_dim must be >= 1, got {self.task_embed_dim}.")
        if not self.image_conv_channels:
            raise ValueError("image_conv_channels must name at least one conv layer.")
        if min(self.time_sampling_beta_alpha, self.time_sampling_beta_beta, self.time_sampling_scale) <= 0:
            raise ValueError(
                "time_sampling_beta_alpha, time_sampling_beta_beta and time_sampling_scale must be > 0."
            )

    @property
    def image_feature(self) -> tuple[str, PolicyFeature] | None:
        """The one image the CNN encodes, or None when the policy uses no image."""
        if not self.use_image or not self.image_features:
            return None
        if self.image_key is not None:
            if self.image_key not in self.image_features:
                raise ValueError(
                    f"image_key {self.image_key!r} is not a visual input feature; "
                    f"visual features: {list(self.image_features)}."
                )
            return self.image_key, self.image_features[self.image_key]
        if OBS_IMAGE in self.image_features:
            return OBS_IMAGE, self.image_features[OBS_IMAGE]
        key = next(iter(self.image_features))
        return key, self.image_features[key]

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        action = self.action_feature
        if action is None:
            raise ValueError("flow_mlp needs an 'action' output feature (FeatureType.ACTION).")
        if len(action.shape) != 1:
            raise ValueError(f"flow_mlp needs a flat action vector, got action shape {action.shape}.")
        image = self.image_feature  # raises if image_key names no visual feature
        if self.robot_state_feature is None and self.env_state_feature is None and image is None:
            raise ValueError(
                "flow_mlp needs at least one observation input: 'observation.state', "
                "'observation.environment_state' or an image (with use_image=True). "
                f"Got input features: {list(self.input_features or {})}."
            )
        for name, feature in (("state", self.robot_state_feature), ("env_state", self.env_state_feature)):
            if feature is not None and len(feature.shape) != 1:
                raise ValueError(f"flow_mlp needs a flat {name} vector, got shape {feature.shape}.")
        if image is not None and len(image[1].shape) != 3:
            raise ValueError(
                f"flow_mlp needs a (C, H, W) image for {image[0]!r}, got shape {image[1].shape}."
            )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None
