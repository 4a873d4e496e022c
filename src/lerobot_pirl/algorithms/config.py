"""Algorithm configs: `--algorithm.type=ppo|grpo`, `--algorithm.exploration=flow_sde|flow_noise`.

Defaults are the reference recipe (RLinf's πRL configs for π0 on LIBERO); the main
job's small flow_mlp policy gets its own learning rate and batch sizes (`AlgorithmConfig.resolved`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import draccus

EXPLORATIONS = ("flow_sde", "flow_noise")
VALUE_FEATURES = ("prefix", "expert")
VALUE_HEAD_ACTIVATIONS = ("relu", "gelu", "tanh")
LOSS_WEIGHTINGS = ("decision", "episode")
# Values the config leaves as None, per policy size: the reference recipe (RLinf's πRL configs) for the VLAs
# (~300 M trained parameters), and the measured choice for the small flow_mlp (BENCHMARKS.md, "Per-policy
# update defaults").
REFERENCE_DEFAULTS = {"actor_lr": 5e-6, "minibatch_size": 2048, "update_epochs": 4}
SMALL_POLICY_DEFAULTS = {"actor_lr": 3e-5, "minibatch_size": 400, "update_epochs": 10}
SMALL_POLICY_TYPES = ("flow_mlp",)
LR_SCHEDULES = ("constant", "linear", "cosine")
# The critic left as None, per policy type: the reference's value heads (RLinf's `ValueHead` in its openpi
# model) for π0 (pooled expert features, 512-256-128, ReLU) and π0.5 (pooled VLM prefix, 1024-512-256,
# ReLU). SmolVLA has no reference critic; it is π0's design (VLM prefix + action expert), so it gets π0's.
# flow_mlp keeps the head measured on MetaWorld (prefix = its observation encoding, 256-256, GELU).
VALUE_HEAD_DEFAULTS = {
    "pi0": {
        "value_features": "expert",
        "value_head_hidden": (512, 256, 128),
        "value_head_activation": "relu",
    },
    "pi05": {
        "value_features": "prefix",
        "value_head_hidden": (1024, 512, 256),
        "value_head_activation": "relu",
    },
    "smolvla": {
        "value_features": "expert",
        "value_head_hidden": (512, 256, 128),
        "value_head_activation": "relu",
    },
    "flow_mlp": {
        "value_features": "prefix",
        "value_head_hidden": (256, 256),
        "value_head_activation": "gelu",
    },
}
OTHER_POLICY_VALUE_HEAD = VALUE_HEAD_DEFAULTS["flow_mlp"]


def _require(condition: bool, message: str) -> None:
    """Config checks raise ValueError: draccus reports it as a ParsingError, the CLI as one line."""
    if not condition:
        raise ValueError(message)


@dataclass
class AlgorithmConfig(draccus.ChoiceRegistry):
    # Exploration (DESIGN.md §3)
    exploration: str = "flow_sde"
    noise_level: float = 0.5  # Flow-SDE a, > 0
    noise_std_min: float = 0.08  # Flow-Noise std bounds
    noise_std_max: float = 0.16
    # Flow-Noise only (the SDE's std is fixed). Weighs the chain's entropy per executed element, the mean
    # over its K+1 terms and C x D elements (the reference's normalisation, so 0.005 is the paper's 0.005).
    entropy_coef: float = 0.005

    # Returns
    gamma: float = 0.99  # per decision (chunk)
    gae_lambda: float = 0.95

    # Optimisation. actor_lr, update_epochs and minibatch_size (decisions per optimiser step): None takes
    # the per-policy default (reference recipe for VLAs, a flow_mlp-sized one), filled in once the policy
    # type is known and saved with the run.
    actor_lr: float | None = None
    critic_lr: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    update_epochs: int | None = None
    minibatch_size: int | None = None
    micro_batch_size: int | None = 128  # decisions per forward/backward (gradient accumulation); None = all
    # VLAs with a frozen VLM: memory (GiB, on the update device) for every sample's prefix keys and values,
    # computed in the first update epoch and reused by the others. An update that needs more recomputes
    # the prefix in every epoch, as 0 does.
    prefix_cache_gib: float = 16.0
    clip_ratio: float = 0.2
    normalize_advantages: bool = True  # standardise the advantages over the whole batch before the update
    # How the loss averages over decisions: "decision" weighs every decision the same, "episode" divides
    # each decision by its episode's decision count in the rollout, so every episode weighs the same.
    loss_weighting: str = "decision"
    # Stability against late collapses: stop the epoch loop of an update once the mean approx-KL of an
    # epoch exceeds this. It reads Schulman's k3 estimator (losses/approx_kl); losses/approx_kl_k1 is
    # the reference's k1. None = never stop early (the reference).
    target_kl: float | None = None
    lr_schedule: str = "constant"
    lr_warmup_iterations: int = 0

    @property
    def type(self) -> str:
        return self.get_choice_name(self.__class__)

    @classmethod
    def default_choice_name(cls) -> str:
        """`--algorithm.actor_lr=...` without `--algorithm.type` means PPO."""
        return "ppo"

    @property
    def uses_critic(self) -> bool:
        return True

    def resolved(self, policy_type: str | None) -> AlgorithmConfig:
        """This config with every None size/rate filled in for the policy type ("pi0", "flow_mlp", ...)."""
        unset = {
            name: value
            for name, value in self.policy_defaults(policy_type).items()
            if getattr(self, name) is None
        }
        return dataclasses.replace(self, **unset) if unset else self

    @staticmethod
    def policy_defaults(policy_type: str | None) -> dict:
        """The values `resolved` fills in where this config has None."""
        return dict(SMALL_POLICY_DEFAULTS if policy_type in SMALL_POLICY_TYPES else REFERENCE_DEFAULTS)

    def policy_settings(self) -> dict:
        """FlowRLPolicy's exploration and critic settings for this algorithm (no critic by default)."""
        return {
            "exploration": self.exploration,
            "noise_level": self.noise_level,
            "noise_std_min": self.noise_std_min,
            "noise_std_max": self.noise_std_max,
            "value_head_hidden": None,
            "value_features": "prefix",
            "detach_value_input": True,
        }

    def __post_init__(self):
        _require(
            self.exploration in EXPLORATIONS,
            f"--algorithm.exploration must be one of {EXPLORATIONS}, got {self.exploration!r}",
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"--algorithm.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
        )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float):
                _require(
                    math.isfinite(value), f"--algorithm.{field.name} must be a finite number, got {value}"
                )
        _require(
            self.loss_weighting in LOSS_WEIGHTINGS,
            f"--algorithm.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}",
        )
        # σ_k = a·sqrt(t/(1-t)): a = 0 makes every Flow-SDE step deterministic and its log-prob -inf/NaN.
        _require(
            self.exploration != "flow_sde" or self.noise_level > 0,
            f"--algorithm.noise_level must be > 0 for flow_sde exploration, got {self.noise_level}",
        )
        _require(self.noise_std_min > 0, f"--algorithm.noise_std_min must be > 0, got {self.noise_std_min}")
        _require(
            self.noise_std_max >= self.noise_std_min,
            f"--algorithm.noise_std_max must be >= noise_std_min ({self.noise_std_min}), "
            f"got {self.noise_std_max}",
        )
        _require(self.entropy_coef >= 0, f"--algorithm.entropy_coef must be >= 0, got {self.entropy_coef}")
        _require(0 <= self.gamma <= 1, f"--algorithm.gamma must be in [0, 1], got {self.gamma}")
        _require(
            0 <= self.gae_lambda <= 1, f"--algorithm.gae_lambda must be in [0, 1], got {self.gae_lambda}"
        )
        _require(self.clip_ratio > 0, f"--algorithm.clip_ratio must be > 0, got {self.clip_ratio}")
        _require(
            self.prefix_cache_gib >= 0,
            f"--algorithm.prefix_cache_gib must be >= 0, got {self.prefix_cache_gib}",
        )
        _require(self.max_grad_norm > 0, f"--algorithm.max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("actor_lr", "critic_lr"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"--algorithm.{name} must be > 0, got {value}")
        for name in ("minibatch_size", "micro_batch_size", "update_epochs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"--algorithm.{name} must be >= 1, got {value}")
        _require(
            self.target_kl is None or self.target_kl > 0,
            f"--algorithm.target_kl must be > 0 (or unset), got {self.target_kl}",
        )
        _require(
            self.lr_warmup_iterations >= 0,
            f"--algorithm.lr_warmup_iterations must be >= 0, got {self.lr_warmup_iterations}",
        )


@AlgorithmConfig.register_subclass("ppo")
@dataclass
class PPOConfig(AlgorithmConfig):
    # Critic
    value_loss_coef: float = 0.5
    value_clip: float | None = 0.2  # clip V around its rollout value, as the policy ratio is clipped
    huber_delta: float | None = 10.0  # reference value loss is Huber with δ = 10; None = squared error
    # The critic: None takes the policy type's (the reference's value heads for pi0 and pi05, pi0's for
    # smolvla, prefix features with 256-256 GELU for flow_mlp). "prefix" = pooled observation features,
    # "expert" = pooled expert states, the value averaged over the denoising steps.
    value_head_hidden: tuple[int, ...] | None = None
    value_features: str | None = None
    value_head_activation: str | None = None
    detach_value_input: bool = True  # the critic does not move the policy trunk

    @staticmethod
    def policy_defaults(policy_type: str | None) -> dict:
        critic = VALUE_HEAD_DEFAULTS.get(policy_type, OTHER_POLICY_VALUE_HEAD)
        return {**AlgorithmConfig.policy_defaults(policy_type), **critic}

    def policy_settings(self) -> dict:
        unset = [name for name in ("value_head_hidden", "value_features") if getattr(self, name) is None]
        if unset:
            raise ValueError(
                f"resolve the algorithm config for the policy type first (unset: {', '.join(unset)})"
            )
        return {
            **super().policy_settings(),
            "value_head_hidden": self.value_head_hidden,
            "value_features": self.value_features,
            "value_head_activation": self.value_head_activation or "gelu",
            "detach_value_input": self.detach_value_input,
        }

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.value_features is None or self.value_features in VALUE_FEATURES,
            f"--algorithm.value_features must be one of {VALUE_FEATURES}, got {self.value_features!r}",
        )
        _require(
            self.value_head_activation is None or self.value_head_activation in VALUE_HEAD_ACTIVATIONS,
            f"--algorithm.value_head_activation must be one of {VALUE_HEAD_ACTIVATIONS}, "
            f"got {self.value_head_activation!r}",
        )
        _require(
            self.value_clip is None or self.value_clip > 0,
            f"--algorithm.value_clip must be > 0 (or unset), got {self.value_clip}",
        )
        _require(
            self.huber_delta is None or self.huber_delta > 0,
            f"--algorithm.huber_delta must be > 0 (or unset), got {self.huber_delta}",
        )
        _require(
            self.value_loss_coef >= 0, f"--algorithm.value_loss_coef must be >= 0, got {self.value_loss_coef}"
        )
        _require(
            all(width >= 1 for width in self.value_head_hidden or ()),
            f"--algorithm.value_head_hidden widths must be >= 1, got {self.value_head_hidden}",
        )


@AlgorithmConfig.register_subclass("grpo")
@dataclass
class GRPOConfig(AlgorithmConfig):
    group_size: int = 8  # envs reset to the same initial state; each group's outcomes are compared
    advantage_eps: float = 1e-6  # Â = (R - mean) / (std + eps), std Bessel-corrected as the reference's
    # Â is already standardised within each group (DESIGN.md §4); a second standardisation over the batch
    # shifts it by the decision-weighted mean, which is not 0 when episodes differ in length.
    normalize_advantages: bool = False
    loss_weighting: str = "episode"  # every episode weighs the same, as the reference's GRPO

    @property
    def uses_critic(self) -> bool:
        return False

    def __post_init__(self):
        super().__post_init__()
        _require(self.group_size >= 2, f"GRPO needs --algorithm.group_size >= 2, got {self.group_size}")
        _require(self.advantage_eps >= 0, f"--algorithm.advantage_eps must be >= 0, got {self.advantage_eps}")
