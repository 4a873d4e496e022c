"""The single-process πRL trainer: rollout -> advantages -> update, with evaluation and checkpoints."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType
from lerobot.envs.factory import make_env_pre_post_processors
from lerobot.envs.utils import close_envs
from lerobot.utils.constants import ACTION
from lerobot.utils.random_utils import set_seed
from tqdm.auto import tqdm

from lerobot_pirl.adapters.registry import SUPPORTED_POLICY_TYPES, load_flow_policy, make_adapter
from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.grpo import grpo_samples
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import (
    NonFiniteLossError,
    UpdateSamples,
    make_lr_scheduler,
    make_optimizer,
    policy_update,
)
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.runtime.checkpoint import (
    TRAIN_CONFIG_FILE,
    TrainerState,
    last_checkpoint,
    restore_training_state,
    save_checkpoint,
    save_config,
)
from lerobot_pirl.runtime.config import ConfigError, TrainConfig
from lerobot_pirl.runtime.envs import (
    env_policy_features,
    episode_reset_hook,
    evaluation_reset_hook,
    make_rollout_envs,
)
from lerobot_pirl.runtime.evaluation import EvalResult, evaluate
from lerobot_pirl.runtime.metrics import MetricsLog, plot_learning_curves

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's experience, however it was gathered (here, or from actors)."""

    samples: UpdateSamples | None  # None: nothing usable arrived
    batches: list[RolloutBatch]
    env_steps: int
    collect_s: float
    metrics: dict[str, float]  # algorithm/transport extras for the metrics row


@dataclass
class TrainResult:
    sft: EvalResult | None
    final: EvalResult | None
    state: TrainerState
    checkpoint_dir: Path | None
    stopped_by_error: str | None = None

    def summary(self) -> str:
        if self.sft is None or self.final is None:
            return "no evaluation was run"
        return (
            f"SFT {100 * self.sft.success_rate:.0f}% → RL {100 * self.final.success_rate:.0f}% "
            f"({self.final.n_episodes} episodes)"
        )


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


def check_policy_matches_env(policy_config, env_cfg) -> None:
    """The policy's state/action features must exist in the env with the same shapes."""
    env_features = env_policy_features(env_cfg)  # after the env's processors (LIBERO: 8-d state)
    problems = []
    for key, feature in policy_config.input_features.items():
        if feature.type is FeatureType.VISUAL:
            continue  # VLAs pad missing cameras; image sizes are resized by the processors
        if key not in env_features:
            problems.append(f"the policy reads {key} {tuple(feature.shape)}, which the env does not provide")
        elif tuple(env_features[key].shape) != tuple(feature.shape):
            problems.append(f"{key}: policy {tuple(feature.shape)} vs env {tuple(env_features[key].shape)}")
    needs_image = any(f.type is FeatureType.VISUAL for f in policy_config.input_features.values())
    if needs_image and not any(f.type is FeatureType.VISUAL for f in env_features.values()):
        problems.append("the policy reads camera images but the env renders none")
    policy_action = policy_config.output_features.get(ACTION)
    env_action = env_features.get(ACTION)
    if policy_action is not None and env_action is not None and policy_action.shape != env_action.shape:
        problems.append(f"action: policy {tuple(policy_action.shape)} vs env {tuple(env_action.shape)}")
    if problems:
        raise ConfigError(f"policy/env feature mismatch ({env_cfg.type}): " + "; ".join(problems))


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
        if options.train_vlm or options.lora_rank or options.autocast_dtype or options.gradient_checkpointing:
            raise ConfigError("--policy_options.{train_vlm,lora_rank,autocast_dtype,...} apply to VLAs only")
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

    `tokenizer`: a tokenizer object for the policy's tokenizer step instead of the one its saved
    preprocessor names (pi0/pi05 name the gated `google/paligemma-3b-pt-224`), e.g. to work offline.
    """
    overrides = cli_policy_overrides(cfg.policy) if apply_cli_overrides else {}
    try:
        lerobot_policy, preprocessor, postprocessor = load_flow_policy(
            policy_path, device=str(device), tokenizer=tokenizer, **overrides
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"could not load the policy from {policy_path}: {error}") from error
    check_policy_matches_env(lerobot_policy.config, cfg.env)
    adapter = make_adapter(lerobot_policy, **adapter_options(lerobot_policy.config.type, cfg))
    algorithm = cfg.algorithm
    uses_critic = isinstance(algorithm, PPOConfig)
    policy = FlowRLPolicy(
        adapter,
        exploration=algorithm.exploration,
        noise_level=algorithm.noise_level,
        noise_std_min=algorithm.noise_std_min,
        noise_std_max=algorithm.noise_std_max,
        n_action_steps=cfg.rollout.n_action_steps,
        value_head_hidden=algorithm.value_head_hidden if uses_critic else None,
        value_features=algorithm.value_features if uses_critic else "prefix",
        detach_value_input=algorithm.detach_value_input if uses_critic else True,
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
) -> tuple[ChunkCollector, dict]:
    """A ChunkCollector over `num_envs` envs of cfg.env; also returns LeRobot's env dict (to close)."""
    envs = make_rollout_envs(
        cfg.env, num_envs, cfg.rollout.use_async_envs, fast_render=cfg.rollout.fast_render
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
    )
    return collector, envs


def collect_update_samples(
    cfg: TrainConfig, collector: ChunkCollector
) -> tuple[UpdateSamples, list[RolloutBatch], dict[str, float]]:
    """One iteration's rollouts and their update samples: continuous chunks (PPO) or groups (GRPO)."""
    algorithm = cfg.algorithm
    collector.policy.eval()
    if isinstance(algorithm, GRPOConfig):
        batches, parts, extras = [], [], {}
        groups = collector.num_envs // algorithm.group_size
        for _ in range(cfg.rollout.episodes_per_env):
            group_seeds = collector.take_seeds(groups)
            seeds = [s for s in group_seeds for _ in range(algorithm.group_size)]  # identical resets
            before_reset = episode_reset_hook(cfg.env, algorithm.group_size)
            batch = collector.collect_episodes(seeds, algorithm.exploration, before_reset=before_reset)
            samples, extras = grpo_samples(batch, algorithm)
            batches.append(batch)
            parts.append(samples)
        return UpdateSamples.concatenate(parts), batches, extras
    batch = collector.collect(cfg.rollout.decisions_per_env, algorithm.exploration)
    return ppo_samples(batch, algorithm), [batch], {}


def rollout_metrics(batches: list[RolloutBatch]) -> dict[str, float]:
    """Success, return and length of the episodes that finished during the rollouts (noisy policy)."""
    done = torch.cat([b.episode_done for b in batches])
    success = torch.cat([b.episode_success for b in batches])[done].float()
    returns = torch.cat([b.episode_returns for b in batches])[done]
    lengths = torch.cat([b.episode_lengths for b in batches])[done].float()
    metrics = {"rollout/episodes": float(done.sum())}
    if done.any():
        metrics["rollout/success_rate"] = float(success.mean())
        metrics["rollout/episode_return"] = float(returns.mean())
        metrics["rollout/episode_length"] = float(lengths.mean())
    return metrics


class Trainer:
    """Holds the run's state; `run()` trains until the budget is spent and returns the evaluations."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        self._check_output_dir()
        set_seed(cfg.seed)

        self.resume_from = last_checkpoint(self.output_dir) if cfg.resume else None
        if cfg.resume and self.resume_from is None:
            raise ConfigError(f"--resume=true but {self.output_dir}/checkpoints/last does not exist")
        policy_path = resolve_policy_source(cfg, self.resume_from)
        self.policy, self.preprocessor, self.postprocessor = build_rl_policy(
            cfg, policy_path, self.device, apply_cli_overrides=self.resume_from is None
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs proved good
        self.optimizer = make_optimizer(self.policy, cfg.algorithm)
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.algorithm, cfg.iterations)

        self.state = TrainerState(next_env_seed=cfg.seed)
        if self.resume_from is not None:
            self.state = restore_training_state(self.resume_from, self.policy, self.optimizer, self.scheduler)
        self.metrics = MetricsLog(
            self.output_dir / "metrics.jsonl",
            resume_from_iteration=self.state.iteration if self.resume_from is not None else None,
        )
        processors = (self.policy, self.preprocessor, self.postprocessor)
        self.collector, self.envs = build_collector(
            cfg,
            *processors,
            num_envs=cfg.rollout.num_envs,
            device=self.device,
            seed=self.state.next_env_seed,
            storage_device=cfg.rollout.storage_device,
        )
        self.eval_collector, self.eval_envs = build_collector(
            cfg, *processors, num_envs=cfg.eval.batch_size, device=self.device
        )
        self.wandb = self._init_wandb()
        save_config(cfg, self.output_dir / TRAIN_CONFIG_FILE)

    # ---- set-up helpers -----------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.cfg.resume:
            raise ConfigError(
                f"output dir {self.output_dir} already holds a run; pass --resume=true to continue it "
                "or choose another --output_dir"
            )

    def _init_wandb(self):
        if not self.cfg.wandb.enable:
            return None
        import draccus
        import wandb

        return wandb.init(
            project=self.cfg.wandb.project,
            entity=self.cfg.wandb.entity,
            name=self.cfg.job_name,
            notes=self.cfg.wandb.notes,
            mode=self.cfg.wandb.mode,
            dir=str(self.output_dir),
            config=draccus.encode(self.cfg),
            resume="allow",
        )

    # ---- the loop -----------------------------------------------------------------------------------

    def evaluate(self, label: str) -> EvalResult:
        eval_cfg = self.cfg.eval
        result = evaluate(
            self.eval_collector,
            eval_cfg.n_episodes,
            eval_cfg.seed,
            video_dir=self.output_dir / "videos",
            n_videos=eval_cfg.videos,
            video_prefix=label,
            fps=self.cfg.env.fps,
            before_reset=evaluation_reset_hook(self.cfg.env, eval_cfg.seed),  # LIBERO: init state i
        )
        return result

    def _save(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            cfg=self.cfg,
            total_iterations=self.cfg.iterations,
            policy=self.policy,
            preprocessor=self.preprocessor,
            postprocessor=self.postprocessor,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
        )

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["iteration"])

    def _elapsed_s(self) -> float:
        """Training wall time of the whole run, resumed runs included."""
        return self._elapsed_before + time.perf_counter() - self._run_started

    def _budget_spent(self) -> bool:
        cfg = self.cfg
        if self.state.iteration >= cfg.iterations:
            return True
        if cfg.max_env_steps is not None and self.state.env_steps >= cfg.max_env_steps:
            return True
        return cfg.max_minutes is not None and self._elapsed_s() / 60 >= cfg.max_minutes

    # ---- the steps of one iteration; the learner process overrides them ----------------------------

    progress_label = "πRL"

    def _start(self) -> None:
        """Before the first iteration of this process (the learner publishes its first version)."""

    def _gather(self) -> Rollout | None:
        """This iteration's rollouts and update samples; None ends the run early."""
        start = time.perf_counter()
        samples, batches, extras = collect_update_samples(self.cfg, self.collector)
        self.state.next_env_seed = self.collector.next_seed
        env_steps = sum(b.env_steps for b in batches)
        return Rollout(samples, batches, env_steps, time.perf_counter() - start, extras)

    def _update(self, samples: UpdateSamples | None) -> dict[str, float]:
        return policy_update(self.policy, self.optimizer, samples, self.cfg.algorithm, self.device)

    def _after_update(self, final_iteration: bool) -> None:
        """Right after an update (the learner publishes the next version before evaluating)."""

    def _close(self, completed: bool) -> None:
        close_envs(self.envs)
        close_envs(self.eval_envs)

    # ---- the loop -----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        sft_result = None
        if self.state.iteration == 0 and self.resume_from is None:
            sft_result = self.evaluate("sft")
            self.state.sft_success_rate = sft_result.success_rate
            self.state.sft_eval_episodes = sft_result.n_episodes
            self._log({"iteration": 0, "env_steps": 0, **sft_result.to_metrics()})
            logger.info("SFT policy: %s", sft_result.summary())

        self._run_started = time.perf_counter()
        self._elapsed_before = self.state.elapsed_s
        checkpoint_dir = None
        last_eval: EvalResult | None = sft_result
        error = None
        completed = False
        progress = tqdm(
            total=cfg.iterations,
            initial=self.state.iteration,
            desc=self.progress_label,
            unit="it",
            dynamic_ncols=True,
        )
        try:
            if not self._budget_spent():
                self._start()
            while not self._budget_spent():
                rollout = self._gather()
                if rollout is None:
                    break
                self.state.env_steps += rollout.env_steps
                update_start = time.perf_counter()
                try:
                    update_metrics = self._update(rollout.samples)
                except NonFiniteLossError as nan_error:
                    error = f"{nan_error} at iteration {self.state.iteration + 1}"
                    checkpoint_dir = self._save()
                    raise
                self.scheduler.step()
                self.state.iteration += 1
                self.state.elapsed_s = self._elapsed_s()
                update_s = time.perf_counter() - update_start
                final_iteration = self._budget_spent()
                self._after_update(final_iteration)
                row = {
                    "iteration": self.state.iteration,
                    "env_steps": self.state.env_steps,
                    "time_s": self.state.elapsed_s,
                    "charts/SPS": rollout.env_steps / max(rollout.collect_s, 1e-9),
                    "charts/collect_s": rollout.collect_s,
                    "charts/update_s": update_s,
                    "charts/actor_lr": self.optimizer.param_groups[0]["lr"],
                    **(rollout_metrics(rollout.batches) if rollout.batches else {}),
                    **update_metrics,
                    **rollout.metrics,
                }
                if final_iteration or (cfg.eval.freq > 0 and self.state.iteration % cfg.eval.freq == 0):
                    last_eval = self.evaluate(f"iter{self.state.iteration:06d}")
                    row.update(last_eval.to_metrics())
                self._log(row)
                if final_iteration or (cfg.save_freq > 0 and self.state.iteration % cfg.save_freq == 0):
                    checkpoint_dir = self._save()
                    plot_learning_curves(self.metrics.rows, self.output_dir / "plots", title=cfg.job_name)
                progress.update(1)
                progress.set_postfix(
                    rollout=f"{row.get('rollout/success_rate', math.nan):.0%}",
                    eval=f"{last_eval.success_rate:.0%}" if last_eval else "-",
                    kl=f"{row['losses/approx_kl']:.3g}" if "losses/approx_kl" in row else "-",
                    sps=f"{row['charts/SPS']:.0f}",
                )
            completed = self._budget_spent()
        except NonFiniteLossError:
            logger.error("%s; checkpoint saved to %s", error, checkpoint_dir)
        finally:
            progress.close()
            self._close(completed)
        if checkpoint_dir is None:
            checkpoint_dir = last_checkpoint(self.output_dir)
        plot_learning_curves(self.metrics.rows, self.output_dir / "plots", title=cfg.job_name)
        sft = sft_result
        if sft is None and self.state.sft_success_rate is not None:
            sft = EvalResult(
                self.state.sft_success_rate, math.nan, math.nan, self.state.sft_eval_episodes, 0, 0
            )
        if self.wandb is not None:
            self.wandb.finish()
        return TrainResult(
            sft=sft, final=last_eval, state=self.state, checkpoint_dir=checkpoint_dir, stopped_by_error=error
        )
