"""`lerobot-pirl-train` configuration (draccus, LeRobot-style flags).

    lerobot-pirl-train --policy.path=<sft checkpoint> --env.type=metaworld_state --env.task=push-v3 \
        --algorithm.type=ppo --algorithm.exploration=flow_sde --output_dir=outputs/push

With no `--policy.path` the few-shot flow_mlp is bootstrapped on the default MetaWorld task
(scripted demos -> supervised flow matching, cached) and then fine-tuned: the README's main job.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from lerobot.configs import parser
from lerobot.configs.default import WandBConfig
from lerobot.configs.policies import PreTrainedConfig
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import PRETRAINED_MODEL_DIR

import lerobot_pirl.envs  # noqa: F401  (registers --env.type=metaworld_state)
import lerobot_pirl.policies  # noqa: F401  (registers --policy.type=flow_mlp)
from lerobot_pirl.algorithms.config import AlgorithmConfig, PPOConfig

logger = logging.getLogger(__name__)

# The main job's task (BENCHMARKS.md, "Main-job defaults"); its episode length is the env's default.
DEFAULT_TASK = "pick-place-v3"
TRAIN_CONFIG_FILE = "train_config.json"
# What `--resume=true` may change: where and how the run logs, and its budget. Every other flag must
# repeat the run's saved value (issue 17: a changed actor_lr was recorded but never used).
RESUME_CHANGEABLE = (
    "output_dir",
    "resume",
    "job_name",
    "iterations",
    "max_minutes",
    "max_env_steps",
    "log_freq",
    "save_freq",
    "eval.freq",
    "eval.videos",
    "rollout.num_workers",
    "eval.num_workers",
    "wandb.",
    # the learner's address, TLS files, token and timeouts (not its number of actors)
    "transport.host",
    "transport.insecure",
    "transport.token_file",
    "transport.port",
    "transport.tls",
    "transport.straggler_timeout_s",
    "transport.reconnect",
    "transport.upload_timeout_s",
    "transport.max_",
    "transport.dist_timeout_s",
)


def given_flags(argv: list[str]) -> list[str]:
    """The dotted names of the `--name=value` / `--name value` flags on a command line."""
    return [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--") and arg != "--"]


def _flag_value(cfg, flag: str):
    """The value a dotted flag set in `cfg` (`policy.path` is the policy's pretrained_path)."""
    *sections, name = flag.split(".")
    value = cfg
    for section in sections:
        value = getattr(value, section, None)
    if sections == ["policy"] and name == "path":
        name = "pretrained_path"
    value = getattr(value, name, None)
    return Path(value).expanduser().absolute() if isinstance(value, Path) else value


def _set_flag_value(target, source, flag: str) -> None:
    *sections, name = flag.split(".")
    for section in sections:
        target, source = getattr(target, section), getattr(source, section)
    setattr(target, name, getattr(source, name))


class ConfigError(ValueError):
    """Bad user input found before any work starts; the CLIs print it as one line."""


def require(condition: bool, message: str) -> None:
    """A config value check: at parse time draccus reports the ConfigError as a ParsingError, later it is
    one; either way the CLI prints one line and exits 2 before anything is created (issue 17)."""
    if not condition:
        raise ConfigError(message)


def require_at_least(flag: str, value: int | float | None, minimum: int | float) -> None:
    require(value is None or value >= minimum, f"{flag} must be >= {minimum}, got {value}")


def check_rename_map(rename_map: dict) -> None:
    """`--rename_map` maps observation keys (env -> policy) one to one; actions keep their name."""
    require(isinstance(rename_map, dict), f"--rename_map must be a JSON object, got {rename_map!r}")
    for env_key, policy_key in rename_map.items():
        require(
            isinstance(env_key, str) and isinstance(policy_key, str) and env_key and policy_key,
            f"--rename_map maps names to names, got {env_key!r}: {policy_key!r}",
        )
        require(
            env_key.startswith("observation") and policy_key.startswith("observation"),
            f"--rename_map renames observations only, got {env_key!r}: {policy_key!r}",
        )
    targets = list(rename_map.values())
    require(
        len(set(targets)) == len(targets),
        f"--rename_map maps two env keys onto one policy key: {rename_map}",
    )


def check_device(flag: str, name: str | None) -> None:
    """A device torch can parse and this machine has, so that `cuda` without a GPU stops here."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"{flag}={name}: not a torch device ({error})") from None
    if device.type == "cpu":
        return
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    require(available, f"{flag}={name}: this machine has no {device.type} device")
    require(
        device.index is None or device.index < count,
        f"{flag}={name}: this machine has {count} {device.type} device(s)",
    )


def check_output_dir(path: Path) -> None:
    """The run folder can be made where it is asked for: not a file, under a writable folder."""
    require(not path.exists() or path.is_dir(), f"--output_dir={path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    require(existing.is_dir(), f"--output_dir={path}: {existing} is a file, not a folder")
    require(os.access(existing, os.W_OK | os.X_OK), f"--output_dir={path}: {existing} is not writable")


def load_policy_config(policy_path: str, cli_overrides: list[str]) -> PreTrainedConfig:
    """The config of `--policy.path` (a folder or hub id) with its `--policy.*` overrides applied."""
    looks_local = policy_path.startswith(("/", ".", "~")) or policy_path.count("/") != 1
    if looks_local and not Path(policy_path).expanduser().exists():
        raise ConfigError(f"--policy.path={policy_path}: no such folder (nor a hub id of the form user/name)")
    # A lerobot-train or lerobot-pirl-train checkpoint folder (e.g. checkpoints/last) holds the policy in
    # pretrained_model/.
    inner = Path(policy_path).expanduser() / PRETRAINED_MODEL_DIR
    if not (Path(policy_path).expanduser() / "config.json").exists() and (inner / "config.json").exists():
        policy_path = str(inner)
    try:
        config = PreTrainedConfig.from_pretrained(policy_path, cli_overrides=cli_overrides)
    except Exception as error:  # hub, file-system and draccus errors alike end the same way for a user
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not read a policy config at --policy.path={policy_path}: {message}"
        ) from error
    config.pretrained_path = Path(policy_path)
    return config


def timestamped_output_dir(root: str, job_name: str) -> Path:
    """`<root>/<date>/<time>_<job_name>`, LeRobot's layout for a run's outputs."""
    now = dt.datetime.now()
    return Path(root) / f"{now:%Y-%m-%d}/{now:%H-%M-%S}_{job_name}"


def _default_env() -> EnvConfig:
    return EnvConfig.get_choice_class("metaworld_state")(task=DEFAULT_TASK)


@dataclass
class RolloutConfig:
    num_envs: int = 32  # parallel envs for training rollouts
    # Env worker processes, each stepping a contiguous shard of the envs; 0 = in this process; None = one
    # per core (at most one per env) for metaworld_state, metaworld and libero, else 0.
    num_workers: int | None = None
    use_async_envs: bool = False  # LeRobot's one process per env (exclusive with num_workers)
    # PPO: action chunks per env per iteration (episodes carry over); 50 = one 200-step MetaWorld episode
    # at C = 4, so every update sees about one outcome per env.
    decisions_per_env: int = 50
    episodes_per_env: int = 1  # GRPO: whole episodes per env per iteration
    n_action_steps: int | None = None  # C, actions executed per decision; None = the policy's own
    num_inference_steps: int | None = None  # K, denoising steps (training AND eval); None = the policy's
    sparse_reward: bool = True  # +1 at the first success, else 0; false = the env's dense reward
    reward_scale: float = 1.0  # multiplies the dense reward (MetaWorld's is up to 10 per step: try 0.01)
    # With the dense reward, ending at success cuts off the reward a policy would collect by staying at the
    # goal, so success is penalised: pair --rollout.sparse_reward=false with end_on_success=false.
    end_on_success: bool = True
    storage_device: str = "cpu"  # where rollout tensors wait for the update
    # LIBERO: shadows, reflections, skybox off inside every env worker (faster on CPU, BENCHMARKS.md).
    # Off by default: it changes what pretrained policies see.
    fast_render: bool = False

    def __post_init__(self):
        for name in (
            "num_envs",
            "decisions_per_env",
            "episodes_per_env",
            "n_action_steps",
            "num_inference_steps",
        ):
            require_at_least(f"--rollout.{name}", getattr(self, name), 1)
        require_at_least("--rollout.num_workers", self.num_workers, 0)
        require(self.reward_scale > 0, f"--rollout.reward_scale must be > 0, got {self.reward_scale}")
        check_device("--rollout.storage_device", self.storage_device)


@dataclass
class EvalConfig:
    freq: int = 10  # iterations between deterministic evaluations (0 = only at start and end)
    n_episodes: int = 50
    # Parallel eval envs; default: all n_episodes at once (at most 50) for metaworld_state, whose envs are
    # cheap, else 10 (a LIBERO env holds GBs). The episodes and their seeds do not depend on it.
    batch_size: int | None = None
    # Env workers for evaluation (as --rollout.num_workers); started at each evaluation, closed after it.
    num_workers: int | None = None
    seed: int = 100_000  # eval episode i uses seed + i: the same episodes for every checkpoint
    videos: int = 2  # episodes to record per evaluation (when the env renders)

    def __post_init__(self):
        for name, minimum in (("freq", 0), ("n_episodes", 1), ("batch_size", 1), ("num_workers", 0)):
            require_at_least(f"--eval.{name}", getattr(self, name), minimum)
        for name in ("seed", "videos"):
            require_at_least(f"--eval.{name}", getattr(self, name), 0)


@dataclass
class PolicyOptionsConfig:
    """How the LeRobot policy is trained (adapter options)."""

    train_vlm: bool = False  # VLAs: train the VLM/prefix too (default: action expert only)
    lora_rank: int = 0  # VLAs: LoRA on the action expert instead of full fine-tuning (0 = off)
    autocast_dtype: str | None = None  # "bfloat16" for VLAs on GPU; heads and log-probs stay float32
    gradient_checkpointing: bool = False
    freeze_trunk: bool = False  # flow_mlp: keep the observation encoder fixed
    # VLAs: the tokenizer to use (hub id or local folder) instead of the one the checkpoint's preprocessor
    # names (pi0/pi05 name the gated google/paligemma-3b-pt-224); saved in the output's preprocessor.
    tokenizer: str | None = None
    # VLAs: let policy cameras the env does not render be fed as blank images (LeRobot's padding) instead
    # of refusing the run; --rename_map maps the env's cameras onto the policy's.
    pad_missing_cameras: bool = False


@dataclass
class BootstrapConfig:
    """The few-shot SFT policy made when no --policy.path is given (cached under cache_dir)."""

    # Many imperfect demos rather than a few clean ones, so that outcomes vary within an initial state
    # and a sparse reward has something to teach (BENCHMARKS.md, "Main-job defaults").
    num_demos: int = 20
    action_noise: float = 0.5  # std of the Gaussian noise on every recorded expert action (in [-1, 1])
    sft_steps: int = 2000
    batch_size: int = 256
    cache_dir: Path = Path("~/.cache/lerobot_pirl/bootstrap")

    def __post_init__(self):
        for name in ("num_demos", "sft_steps", "batch_size"):
            require_at_least(f"--bootstrap.{name}", getattr(self, name), 1)
        require(self.action_noise >= 0, f"--bootstrap.action_noise must be >= 0, got {self.action_noise}")


@dataclass
class TrainConfig:
    policy: PreTrainedConfig | None = None
    env: EnvConfig = field(default_factory=_default_env)
    algorithm: AlgorithmConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    policy_options: PolicyOptionsConfig = field(default_factory=PolicyOptionsConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    wandb: WandBConfig = field(default_factory=WandBConfig)
    # env key -> policy key, LeRobot's flag and JSON format, e.g.
    # --rename_map='{"observation.images.image2": "observation.images.wrist_image"}'. The output checkpoint
    # reads the env's names, so lerobot-eval on it needs no --rename_map.
    rename_map: dict[str, str] = field(default_factory=dict)

    iterations: int = 60  # rollout + update cycles (BENCHMARKS.md, "Main-job defaults")
    max_env_steps: int | None = None  # stop earlier once this many training env steps were taken
    max_minutes: float | None = None  # stop earlier after this much wall time (a checkpoint is saved)
    save_freq: int = 10  # iterations between checkpoints (the last one is always saved)
    log_freq: int = 1  # iterations between INFO log lines (the last one is always logged)
    output_dir: Path | None = None
    job_name: str | None = None
    resume: bool = False  # continue the run in --output_dir from its checkpoints/last
    seed: int = 1000
    device: str | None = None  # None: cuda if available, else cpu

    def __post_init__(self):
        require_at_least("--iterations", self.iterations, 1)
        require_at_least("--max_env_steps", self.max_env_steps, 1)
        require(
            self.max_minutes is None or self.max_minutes > 0,
            f"--max_minutes must be > 0, got {self.max_minutes}",
        )
        require_at_least("--save_freq", self.save_freq, 0)
        require_at_least("--log_freq", self.log_freq, 1)
        require_at_least("--seed", self.seed, 0)  # numpy's seeds are unsigned
        check_rename_map(self.rename_map)

    def validate(self) -> None:
        """Resolve `--policy.path` (LeRobot convention) and check values before any work starts."""
        policy_path = parser.get_path_arg("policy")
        if policy_path:
            self.policy = load_policy_config(policy_path, parser.get_cli_overrides("policy") or [])
        if self.resume and self.output_dir is not None:
            self.adopt_saved_run(given_flags(sys.argv[1:]))
        check_device("--device", self.device)
        if not self.rollout.sparse_reward and self.rollout.end_on_success:
            logger.warning(
                "--rollout.sparse_reward=false with --rollout.end_on_success=true: a positive per-step "
                "reward makes ending early at success worth less than lingering; consider "
                "--rollout.end_on_success=false"
            )
        self.resolve_num_workers()
        if self.algorithm.type == "grpo" and self.rollout.num_envs % self.algorithm.group_size:
            raise ConfigError(
                f"GRPO: --rollout.num_envs={self.rollout.num_envs} must be a multiple of "
                f"--algorithm.group_size={self.algorithm.group_size}"
            )
        if not self.job_name:
            policy_name = self.policy.type if self.policy is not None else "flow_mlp"
            task = str(self.env.task)
            if "," in task:  # a task list: its size, not a folder name of commas
                task = f"{len([t for t in task.split(',') if t.strip()])}tasks"
            self.job_name = f"{self.env.type}_{task}_{policy_name}_{self.algorithm.type}"
        if self.output_dir is None:
            if self.resume:
                raise ConfigError("--resume=true needs the --output_dir of the run to continue")
            self.output_dir = timestamped_output_dir("outputs/train", self.job_name)
        # Saved absolute, so that `--config_path=<run>/train_config.json --resume=true` works from anywhere.
        self.output_dir = Path(self.output_dir).expanduser().absolute()
        check_output_dir(self.output_dir)

    def adopt_saved_run(self, flags: list[str]) -> None:
        """On `--resume=true`, become the run saved in `output_dir/train_config.json`: flags in
        RESUME_CHANGEABLE take their new values, every other flag given must repeat the saved value."""
        import draccus

        saved_file = Path(self.output_dir).expanduser() / TRAIN_CONFIG_FILE
        if not saved_file.is_file():
            return  # nothing saved: the trainer says the run cannot be resumed
        saved = draccus.parse(config_class=type(self), config_path=saved_file, args=[])
        for flag in flags:
            if flag == "config_path" or flag.startswith(RESUME_CHANGEABLE):
                continue
            if _flag_value(self, flag) != _flag_value(saved, flag):
                raise ConfigError(
                    f"--{flag} cannot change on --resume=true (the run has {_flag_value(saved, flag)}); "
                    "drop the flag to continue the run as it was, or start a new run"
                )
        for flag in flags:
            if flag != "config_path" and flag.startswith(RESUME_CHANGEABLE):
                _set_flag_value(saved, self, flag)
        saved.resume, saved.output_dir = True, self.output_dir
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))

    def resolve_num_workers(self) -> None:
        """Eval envs and env workers for training and evaluation: checked when given, the machine's
        default when not."""
        from lerobot_pirl.runtime.envs import check_num_workers, default_num_workers, resolve_eval_batch_size

        resolve_eval_batch_size(self.env, self.eval)

        for flag, section, num_envs in (
            ("--rollout.num_workers", self.rollout, self.rollout.num_envs),
            ("--eval.num_workers", self.eval, self.eval.batch_size),
        ):
            if section.num_workers is None:
                section.num_workers = default_num_workers(self.env, num_envs, self.rollout.use_async_envs)
            check_num_workers(self.env, section.num_workers, num_envs, flag)
            if section.num_workers > 0 and self.rollout.use_async_envs:
                raise ConfigError(
                    f"{flag}={section.num_workers} and --rollout.use_async_envs=true exclude each other"
                )

    def push_to_hub_requested(self) -> bool:
        """Only an explicit `--policy.push_to_hub=true` pushes: a loaded SFT config may carry True and
        the SFT repo's id, and silently overwriting a user's SFT repo would be a bad surprise."""
        overrides = parser.get_cli_overrides("policy") or []
        return self.policy is not None and "--push_to_hub=true" in [o.lower() for o in overrides]

    @classmethod
    def __get_path_fields__(cls) -> list[str]:
        """Lets LeRobot's parser load the policy config from `--policy.path=local/dir or hub id`."""
        return ["policy"]
