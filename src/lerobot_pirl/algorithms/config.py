"""Algorithm configs: `--algorithm.type=ppo|grpo`, `--algorithm.exploration=flow_sde|flow_noise`.

Defaults are the reference recipe (REFERENCE.md §1: RLinf's πRL configs for π0 on LIBERO); the main
job's small flow_mlp policy gets its own learning rate and batch sizes (`AlgorithmConfig.resolved`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import draccus

EXPLORATIONS = ("flow_sde", "flow_noise")
# Values the config leaves as None, per policy size. The reference recipe (REFERENCE.md §1) is for the
# VLAs (~300 M trained parameters). For the small flow_mlp, measured on MetaWorld pick-place
# (BENCHMARKS.md): with ~1600 decisions per iteration (32 envs x 50), minibatches of 400 give several
# Adam steps per update; 10 epochs learned faster per env step than 4 (34-40% vs 26-34% eval success
# after ~300k steps), and updates cost ~5% of an iteration. From the default bootstrap, actor lr 3e-5
# (approx-KL ~0.02 per update) reached 84-96% eval success at 220-320k env steps where 1e-5
# (approx-KL ~0.008) was at 72-80%.
REFERENCE_DEFAULTS = {"actor_lr": 5e-6, "minibatch_size": 2048, "update_epochs": 4}
SMALL_POLICY_DEFAULTS = {"actor_lr": 3e-5, "minibatch_size": 400, "update_epochs": 10}
SMALL_POLICY_TYPES = ("flow_mlp",)
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class AlgorithmConfig(draccus.ChoiceRegistry):
    # Exploration (DESIGN.md §3)
    exploration: str = "flow_sde"
    noise_level: float = 0.5  # Flow-SDE a
    noise_std_min: float = 0.08  # Flow-Noise std bounds
    noise_std_max: float = 0.16
    entropy_coef: float = 0.005  # Flow-Noise only: the SDE's std is fixed, so its entropy is constant

    # Returns
    gamma: float = 0.99  # per decision (chunk)
    gae_lambda: float = 0.95

    # Optimisation. actor_lr, update_epochs and minibatch_size (decisions per optimiser step): None takes
    # REFERENCE_DEFAULTS for the VLAs and SMALL_POLICY_DEFAULTS for flow_mlp (see `resolved`).
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
    clip_ratio: float = 0.2
    normalize_advantages: bool = True
    # Stability (REFERENCE.md §3: late collapses without a KL term): stop the epoch loop of an
    # update once the mean approx-KL of an epoch exceeds this. None = never stop early (the reference).
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
        defaults = SMALL_POLICY_DEFAULTS if policy_type in SMALL_POLICY_TYPES else REFERENCE_DEFAULTS
        unset = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def __post_init__(self):
        if self.exploration not in EXPLORATIONS:
            raise ValueError(
                f"--algorithm.exploration must be one of {EXPLORATIONS}, got {self.exploration!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--algorithm.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if not 0 < self.noise_std_min <= self.noise_std_max:
            raise ValueError("need 0 < noise_std_min <= noise_std_max")
        if any(size is not None and size < 1 for size in (self.minibatch_size, self.micro_batch_size)):
            raise ValueError("minibatch_size and micro_batch_size must be >= 1")
        if self.update_epochs is not None and self.update_epochs < 1:
            raise ValueError("update_epochs must be >= 1")


@AlgorithmConfig.register_subclass("ppo")
@dataclass
class PPOConfig(AlgorithmConfig):
    # Critic
    value_loss_coef: float = 0.5
    value_clip: float | None = 0.2  # clip V around its rollout value, as the policy ratio is clipped
    huber_delta: float | None = 10.0  # reference value loss is Huber with δ = 10; None = squared error
    value_head_hidden: tuple[int, ...] = (256, 256)
    value_features: str = "prefix"  # pooled observation features; "expert" = pooled expert states
    detach_value_input: bool = True  # the critic does not move the policy trunk


@AlgorithmConfig.register_subclass("grpo")
@dataclass
class GRPOConfig(AlgorithmConfig):
    group_size: int = 8  # envs reset to the same initial state; each group's outcomes are compared
    advantage_eps: float = 1e-6

    @property
    def uses_critic(self) -> bool:
        return False

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError("GRPO needs --algorithm.group_size >= 2")
