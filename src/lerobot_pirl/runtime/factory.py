"""Building a run's pieces from its config: the device, the RL policy (loaded, checked against the env,
wrapped for RL) and the collectors over the env's vector envs.

Every entry point builds through here: the trainer, the learner and actors, `lerobot-pirl-eval`, the
benchmarks and the tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType
from lerobot.envs.factory import make_env_pre_post_processors
from lerobot.envs.utils import close_envs
from lerobot.utils.constants import ACTION

from lerobot_pirl.adapters.registry import SUPPORTED_POLICY_TYPES, load_flow_policy, make_adapter
from lerobot_pirl.envs.metaworld_state import metaworld_task_description
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.runtime.config import ConfigError, TrainConfig
from lerobot_pirl.runtime.envs import (
    env_policy_features,
    env_task_set,
    fixed_env_tasks,
    make_rollout_envs,
    task_group_size,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def single_vec_env(envs: dict) -> object:
    """LeRobot returns {suite: {task_id: vec_env}}; a run trains on exactly one task."""
    vec_envs = [vec for suite in envs.values() for vec in suite.values()]
    if len(vec_envs) != 1:
        close_envs(envs)
        raise ConfigError(
            f"the env config builds {len(vec_envs)} tasks; train on one task per run "
            "(e.g. --env.task_ids='[0]' for LIBERO)"
        )
    return vec_envs[0]


def check_policy_matches_env(policy_config, env_cfg, pad_missing_cameras: bool = False) -> None:
    """The policy's inputs must exist in the env: state/action features with the same shapes, and every
    camera (image sizes are left to the processors, which resize). Runs before any env is made."""
    env_features = env_policy_features(env_cfg)  # after the env's processors (LIBERO: 8-d state)
    problems = []
    for key, feature in policy_config.input_features.items():
        if feature.type is FeatureType.VISUAL:
            continue  # checked below, all cameras at once
        if key not in env_features:
            problems.append(f"the policy reads {key} {tuple(feature.shape)}, which the env does not provide")
        elif tuple(env_features[key].shape) != tuple(feature.shape):
            problems.append(f"{key}: policy {tuple(feature.shape)} vs env {tuple(env_features[key].shape)}")
    problems += _camera_problems(policy_config, env_features, pad_missing_cameras)
    problems += _task_problems(policy_config, env_cfg)
    policy_action = policy_config.output_features.get(ACTION)
    env_action = env_features.get(ACTION)
    if policy_action is not None and env_action is not None and policy_action.shape != env_action.shape:
        problems.append(f"action: policy {tuple(policy_action.shape)} vs env {tuple(env_action.shape)}")
    if problems:
        raise ConfigError(f"policy/env feature mismatch ({env_cfg.type}): " + "; ".join(problems))


def _camera_problems(policy_config, env_features: dict, pad_missing_cameras: bool) -> list[str]:
    """LeRobot's pi0/pi05/smolvla feed a camera the observation lacks as a blank image with mask False, so
    a misnamed wrist camera would train blind without a word (issue 15): each one must be rendered, or
    padding asked for. pi0/pi05's `empty_cameras` are padded by design."""
    wanted = [
        key
        for key, feature in policy_config.input_features.items()
        if feature.type is FeatureType.VISUAL and ".empty_camera_" not in key
    ]
    rendered = [key for key, feature in env_features.items() if feature.type is FeatureType.VISUAL]
    if wanted and not rendered:
        return ["the policy reads camera images but the env renders none"]
    missing = [key for key in wanted if key not in env_features]
    if not missing:
        return []
    if pad_missing_cameras:
        logger.warning(
            "the env renders no %s: the policy sees blank images (--policy_options.pad_missing_cameras)",
            ", ".join(missing),
        )
        return []
    unused = [key for key in rendered if key not in wanted]
    suggestion = json.dumps(dict(zip(unused, missing, strict=False)))
    return [
        f"the policy's cameras are {wanted}, the env renders {rendered}: {missing} would be blank; map the "
        f"env's cameras onto the policy's with --rename_map='{suggestion}' (env key -> policy key), or "
        "feed blank images with --policy_options.pad_missing_cameras=true"
    ]


def _task_problems(policy_config, env_cfg) -> list[str]:
    """A task-conditioned flow_mlp knows the instructions it was trained on, and nothing else; a flow_mlp
    without task input cannot tell a suite's tasks apart (issue 14)."""
    if not hasattr(policy_config, "task_vocabulary"):
        return []  # not a flow_mlp: VLAs read the instruction as text
    task_set = env_task_set(env_cfg)
    vocabulary = policy_config.task_vocabulary
    if task_set is None:
        if vocabulary and env_cfg.type == "metaworld_state":
            return _unknown_tasks(vocabulary, env_cfg.tasks, (metaworld_task_description(env_cfg.task),))
        return []
    if not vocabulary:
        return [
            f"this flow_mlp has no task input, so it cannot tell the {len(task_set.names)} tasks of "
            f"--env.task={env_cfg.task} apart; start from a multi-task one (omit --policy.path to bootstrap "
            "one) or train on one task"
        ]
    return _unknown_tasks(vocabulary, task_set.names, task_set.descriptions)


def _unknown_tasks(vocabulary: list[str], names, descriptions) -> list[str]:
    for name, description in zip(names, descriptions, strict=True):
        if description not in vocabulary:
            return [
                f"the policy was not trained on task {name} ({description!r}); it knows {len(vocabulary)} "
                f"tasks: {vocabulary}"
            ]
    return []


def read_env_names(policy_config, preprocessor, rename_map: dict[str, str]) -> None:
    """Make the loaded policy read the env's observation names: `rename_map` (env key -> policy key, as
    LeRobot's `--rename_map`) is applied to the policy's input features and to its preprocessor's
    normaliser, in place and order kept (the model reads its cameras in that order).

    Renaming the policy rather than the observations is what lets `lerobot-eval` run the saved checkpoint
    without a flag: lerobot-eval replaces the rename map saved in a preprocessor by its own `--rename_map`
    (empty by default), but reads the policy's feature names from its config.
    """
    if not rename_map:
        return
    from lerobot.processor import NormalizerProcessorStep
    from lerobot.processor.rename_processor import rename_stats

    to_env = {policy_key: env_key for env_key, policy_key in rename_map.items()}
    unknown = [key for key in to_env if key not in policy_config.input_features]
    if unknown:
        raise ConfigError(
            f"--rename_map maps onto {unknown}, which the policy does not read; its inputs are "
            f"{list(policy_config.input_features)}"
        )
    renamed = {to_env.get(key, key): feature for key, feature in policy_config.input_features.items()}
    if len(renamed) != len(policy_config.input_features):
        raise ConfigError(f"--rename_map {rename_map} gives two policy inputs the same env name")
    policy_config.input_features = renamed
    for index, step in enumerate(preprocessor.steps):
        if isinstance(step, NormalizerProcessorStep):
            preprocessor.steps[index] = replace(
                step,
                features={to_env.get(key, key): feature for key, feature in step.features.items()},
                stats=rename_stats(step.stats or {}, to_env),
            )
    reads = ", ".join(f"{env_key} as {policy_key}" for env_key, policy_key in rename_map.items())
    logger.info("the policy reads the env's %s (--rename_map)", reads)


def cli_policy_overrides(policy_config) -> dict:
    """The `--policy.<field>=...` values given next to `--policy.path`, as loader overrides."""
    if policy_config is None or policy_config.pretrained_path is None:
        return {}
    from lerobot.configs.policies import PreTrainedConfig

    saved = PreTrainedConfig.from_pretrained(policy_config.pretrained_path)
    ignored = {"pretrained_path", "device", "push_to_hub", "repo_id", "private", "tags", "license"}
    return {
        f.name: getattr(policy_config, f.name)
        for f in fields(policy_config)
        if f.name not in ignored and getattr(policy_config, f.name) != getattr(saved, f.name, None)
    }


def adapter_options(policy_type: str, cfg: TrainConfig) -> dict:
    options = cfg.policy_options
    common = {"num_steps": cfg.rollout.num_inference_steps}
    if policy_type == "flow_mlp":
        vla_only = (options.train_vlm, options.lora_rank, options.autocast_dtype, options.tokenizer)
        if any(vla_only) or options.gradient_checkpointing:
            raise ConfigError(
                "--policy_options.{train_vlm,lora_rank,autocast_dtype,gradient_checkpointing,tokenizer} "
                "apply to VLAs only"
            )
        return common
    if options.autocast_dtype not in (None, "bfloat16", "float16"):
        raise ConfigError(
            f"--policy_options.autocast_dtype must be bfloat16 or float16, got {options.autocast_dtype}"
        )
    return {
        **common,
        "train_vlm": options.train_vlm,
        "lora_rank": options.lora_rank,
        "autocast_dtype": getattr(torch, options.autocast_dtype) if options.autocast_dtype else None,
        "gradient_checkpointing": options.gradient_checkpointing,
    }


def resolve_policy_source(cfg: TrainConfig, resume_from: Path | None) -> str | Path:
    """Where the policy comes from: the run's last checkpoint, --policy.path, or the few-shot bootstrap."""
    if resume_from is not None:
        return resume_from / "pretrained_model"
    if cfg.policy is None:
        from lerobot_pirl.runtime.bootstrap import bootstrap_flow_policy

        return bootstrap_flow_policy(cfg.env, cfg.bootstrap, seed=cfg.seed)
    if cfg.policy.type not in SUPPORTED_POLICY_TYPES:
        raise ConfigError(
            f"policy type '{cfg.policy.type}' is not a flow-matching policy; "
            f"lerobot-pirl fine-tunes {', '.join(SUPPORTED_POLICY_TYPES)}"
        )
    if cfg.policy.pretrained_path is None:
        raise ConfigError("RL fine-tuning starts from a trained policy: pass --policy.path=<checkpoint>")
    return cfg.policy.pretrained_path


def build_rl_policy(
    cfg: TrainConfig,
    policy_path: str | Path,
    device: torch.device,
    apply_cli_overrides: bool = True,
    tokenizer: object | None = None,
) -> tuple[FlowRLPolicy, object, object]:
    """Load the LeRobot policy with its processors, check it against the env, wrap it for RL.

    Once the policy type is known, `cfg.algorithm` is resolved in place (per-policy learning rate,
    minibatch and epochs: `AlgorithmConfig.resolved`), so every saved config carries the numbers that ran.

    `tokenizer`: a tokenizer object for the policy's tokenizer step instead of the one its saved
    preprocessor names (pi0/pi05 name the gated `google/paligemma-3b-pt-224`), e.g. to work offline;
    from the CLI, `--policy_options.tokenizer` names one.

    `apply_cli_overrides` is False for a resumed run: its checkpoint already holds the `--policy.*`
    values and `--rename_map`'s names.
    """
    overrides = cli_policy_overrides(cfg.policy) if apply_cli_overrides else {}
    if cfg.rollout.n_action_steps is not None:
        overrides["n_action_steps"] = cfg.rollout.n_action_steps  # saved: lerobot-eval executes C too
    try:
        lerobot_policy, preprocessor, postprocessor = load_flow_policy(
            policy_path,
            device=str(device),
            tokenizer=tokenizer,
            tokenizer_name=cfg.policy_options.tokenizer,
            **overrides,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"could not load the policy from {policy_path}: {error}") from error
    policy_config = lerobot_policy.config
    if not 1 <= policy_config.n_action_steps <= policy_config.chunk_size:
        raise ConfigError(
            f"--rollout.n_action_steps={policy_config.n_action_steps} must be in [1, the policy's chunk_size "
            f"{policy_config.chunk_size}]"
        )
    if apply_cli_overrides:
        read_env_names(policy_config, preprocessor, cfg.rename_map)
    check_policy_matches_env(policy_config, cfg.env, cfg.policy_options.pad_missing_cameras)
    policy_type = policy_config.type
    adapter = make_adapter(lerobot_policy, **adapter_options(policy_type, cfg))
    cfg.algorithm = cfg.algorithm.resolved(policy_type)  # the one place the per-policy defaults are filled
    policy = FlowRLPolicy(
        adapter,
        **cfg.algorithm.policy_settings(),
        n_action_steps=cfg.rollout.n_action_steps,
        freeze_trunk=cfg.policy_options.freeze_trunk,
    ).to(device)
    train_in_float32(adapter)
    return policy, preprocessor, postprocessor


def train_in_float32(adapter) -> None:
    """Keep the trained parameters in float32 when the checkpoint's weights are bf16/fp16.

    An AdamW step of the reference size (lr 5e-6) is far below half a bf16 ulp of a typical weight
    (~1e-4 at |w| ~ 0.02), so bf16 parameters would silently never move. The frozen VLM keeps its dtype
    (half the memory); the model then runs under autocast in that dtype, which mixed weights need.
    """
    low_precision = [
        p for p in adapter.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
    ]
    if not low_precision:
        return
    dtype = low_precision[0].dtype
    for param in low_precision:
        param.data = param.data.float()
    if getattr(adapter, "autocast_dtype", False) is None:
        adapter.autocast_dtype = dtype
    logger.info(
        "training %d %s parameters in float32 (master weights) under %s autocast",
        len(low_precision),
        dtype,
        getattr(adapter, "autocast_dtype", None),
    )


def build_collector(
    cfg: TrainConfig,
    policy: FlowRLPolicy,
    preprocessor,
    postprocessor,
    *,
    num_envs: int,
    device: torch.device,
    seed: int = 0,
    storage_device: str = "cpu",
    num_workers: int = 0,
    keep_prefix_gib: float = 0.0,
) -> tuple[ChunkCollector, dict]:
    """A ChunkCollector over `num_envs` envs of cfg.env (stepped by `num_workers` env workers, 0 = here);
    also returns LeRobot's env dict (to close). `keep_prefix_gib`: see ChunkCollector (the trainer's own
    collection only: actors would ship the kept prefixes to the learner)."""
    task_set = env_task_set(cfg.env)
    env_tasks = None
    if task_set is not None and not task_set.by_seed:  # LIBERO, LeRobot metaworld: a task per env
        env_tasks = fixed_env_tasks(num_envs, len(task_set.names), task_group_size(cfg.algorithm))
    envs = make_rollout_envs(
        cfg.env,
        num_envs,
        cfg.rollout.use_async_envs,
        fast_render=cfg.rollout.fast_render,
        num_workers=num_workers,
        env_tasks=env_tasks,
    )
    env_pre, env_post = make_env_pre_post_processors(cfg.env, policy.adapter.policy.config)
    collector = ChunkCollector(
        single_vec_env(envs),
        policy,
        preprocessor,
        postprocessor,
        env_pre,
        env_post,
        device=device,
        storage_device=storage_device,
        sparse_reward=cfg.rollout.sparse_reward,
        reward_scale=cfg.rollout.reward_scale,
        end_on_success=cfg.rollout.end_on_success,
        seed=seed,
        keep_prefix_gib=keep_prefix_gib,
        task_set=task_set,
        env_tasks=env_tasks,
    )
    return collector, envs
