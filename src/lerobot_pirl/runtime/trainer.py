"""The πRL training loop: collect → samples and advantages → update → log, evaluate, save.

Two things are passed in rather than subclassed. Where an iteration's rollouts come from is a
`BatchSource`: `LocalCollection` steps this process's own envs; the learner's actor server
(distributed/learner.py) gathers the actors' uploads. How the update runs is an `Update`: `LocalUpdate`
here, DDP across ranks in the learner. Everything else (set-up, resume, evaluation protocol,
checkpoints, metrics, budget) is this one class for every process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from lerobot.envs.utils import close_envs
from lerobot.utils.random_utils import set_seed

from lerobot_pirl.algorithms.base import make_algorithm
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.algorithms.update import (
    NonFiniteLossError,
    make_lr_scheduler,
    make_optimizer,
    policy_update,
)
from lerobot_pirl.progress import duration, progress_bar
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.rollout.workers import EnvWorkerError
from lerobot_pirl.runtime.checkpoint import (
    TRAIN_CONFIG_FILE,
    IterationRow,
    TrainerState,
    complete_checkpoints,
    get_step_checkpoint_dir,
    last_checkpoint,
    load_iteration_row,
    restore_training_state,
    resumable_checkpoint,
    save_checkpoint,
    save_config,
)
from lerobot_pirl.runtime.config import ConfigError, TrainConfig, load_policy_config
from lerobot_pirl.runtime.envs import (
    check_task_envs,
    env_task_names,
    episode_reset_hook,
    evaluation_reset_hook,
    start_env_worker_server,
    task_group_size,
)
from lerobot_pirl.runtime.evaluation import EvalResult, evaluate
from lerobot_pirl.runtime.factory import (
    build_collector,
    build_rl_policy,
    resolve_device,
    resolve_policy_source,
)
from lerobot_pirl.runtime.memory import estimate_memory, profile_of, warn_if_it_cannot_fit
from lerobot_pirl.runtime.metrics import MetricsLog, OutputWriteError, plot_learning_curves
from lerobot_pirl.runtime.suite_evaluation import evaluate_per_task

logger = logging.getLogger(__name__)


@dataclass
class Collected:
    """One iteration's rollouts, however they were gathered (here, or from actors)."""

    batches: list[RolloutBatch]  # in a fixed order (actor order for the learner); empty: none usable
    env_steps: int
    collect_s: float
    metrics: dict[str, float]  # the source's own extras for the metrics row (e.g. transport/*)


class BatchSource(Protocol):
    def start(self) -> None:
        """Before the first iteration of this process (the learner publishes its first version)."""

    def collect(self) -> Collected | None:
        """This iteration's rollouts; None ends the run early."""

    def after_update(self, final_iteration: bool) -> None:
        """Right after an update (the learner publishes the next version before evaluating)."""

    def after_checkpoint(self) -> None:
        """Right after a checkpoint: the next rollout must start as a resume from it would start."""

    def close(self, completed: bool) -> None: ...


Update = Callable[[UpdateSamples | None], dict[str, float]]


@dataclass
class TrainResult:
    sft: EvalResult | None
    final: EvalResult | None
    state: TrainerState
    checkpoint_dir: Path | None
    stopped_by_error: str | None = None

    def summary(self) -> str:
        if self.sft is None or self.final is None or self.final is self.sft:
            return "no RL evaluation was run"
        return (
            f"SFT {100 * self.sft.success_rate:.0f}% → RL {100 * self.final.success_rate:.0f}% "
            f"({self.final.n_episodes} episodes)"
        )


class LocalCollection:
    """Rollouts from this process's own `--rollout.num_envs` envs, collected as the algorithm says."""

    def __init__(self, trainer: Trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.collector, self.envs = build_collector(
            cfg,
            trainer.policy,
            trainer.preprocessor,
            trainer.postprocessor,
            num_envs=cfg.rollout.num_envs,
            device=trainer.device,
            seed=trainer.state.next_env_seed,
            storage_device=cfg.rollout.storage_device,
            num_workers=cfg.rollout.num_workers,
            keep_prefix_gib=cfg.algorithm.prefix_cache_gib,
        )
        self.group_reset = functools.partial(episode_reset_hook, cfg.env)  # LIBERO: init state per group

    def start(self) -> None:
        pass

    def collect(self) -> Collected:
        start = time.perf_counter()
        batches = self.trainer.algorithm.collect(self.collector, self.trainer.cfg.rollout, self.group_reset)
        self.trainer.state.next_env_seed = self.collector.next_seed
        env_steps = sum(b.env_steps for b in batches)
        return Collected(batches, env_steps, time.perf_counter() - start, {})

    def after_update(self, final_iteration: bool) -> None:
        pass

    def after_checkpoint(self) -> None:
        # A checkpoint is a clean cut (issue 17: exact resume): the episodes in flight end there, as
        # time-limit truncations already bootstrapped by the rollout's last value, and the next rollout
        # resets every env from the saved seed counter, exactly what a resume from it does.
        self.collector.restart_episodes()

    def close(self, completed: bool) -> None:
        close_envs(self.envs)


class LocalUpdate:
    """`policy_update` in this process (minibatch order from the global RNG, seeded by --seed)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def __call__(self, samples: UpdateSamples | None) -> dict[str, float]:
        if samples is None:
            return {"update/num_samples": 0.0}
        t = self.trainer
        return policy_update(t.policy, t.optimizer, samples, t.cfg.algorithm, t.device)


def rollout_metrics(batches: list[RolloutBatch], task_names: tuple[str, ...] = ()) -> dict[str, float]:
    """Success, return and length of the episodes that finished during the rollouts (noisy policy); with
    several `task_names`, also per task (`rollout/<task>/...`, episodes counted by the task they played)."""
    if not batches:
        return {}
    done = torch.cat([b.episode_done for b in batches])
    success = torch.cat([b.episode_success for b in batches])[done].float()
    returns = torch.cat([b.episode_returns for b in batches])[done]
    lengths = torch.cat([b.episode_lengths for b in batches])[done].float()
    tasks = torch.cat([b.episode_task for b in batches])[done]
    metrics = {}
    groups = [("rollout", torch.ones_like(tasks, dtype=torch.bool))]
    if len(task_names) > 1:
        groups += [(f"rollout/{name}", tasks == index) for index, name in enumerate(task_names)]
    for prefix, members in groups:
        metrics[f"{prefix}/episodes"] = float(members.sum())
        if members.any():
            metrics[f"{prefix}/success_rate"] = float(success[members].mean())
            metrics[f"{prefix}/episode_return"] = float(returns[members].mean())
            metrics[f"{prefix}/episode_length"] = float(lengths[members].mean())
    return metrics


class Trainer:
    """A run's state and its loop; `run()` trains until the budget is spent and returns the evaluations.

    Args:
        cfg: the run's config; its algorithm config is resolved for the policy type when the policy loads.
        source: builds the BatchSource from the set-up trainer (default: this process's envs).
        update: builds the Update from the set-up trainer (default: `policy_update` here).
        device: where the policy runs (default: `--device`, else cuda when available).
        main: False on the follower ranks of a multi-GPU learner: the policy, optimizer and state are set
            up, but no output, evaluation envs, source or W&B.
        policy_source: where the policy comes from (the learner orders its ranks around the bootstrap).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        source: Callable[[Trainer], BatchSource] = LocalCollection,
        update: Callable[[Trainer], Update] = LocalUpdate,
        device: torch.device | None = None,
        main: bool = True,
        policy_source: Callable[[TrainConfig, Path | None], str | Path] = resolve_policy_source,
    ):
        self.cfg, self.main = cfg, main
        self.task_names = env_task_names(cfg.env)  # several: a multi-task run, metrics per task
        self.output_dir = Path(cfg.output_dir)
        self.device = device if device is not None else resolve_device(cfg.device)
        if main:
            self._check_output_dir()
        cfg.resolve_num_workers()  # done by validate() for the CLI; a config made in Python may not be
        if main and max(cfg.rollout.num_workers, cfg.eval.num_workers) > 0:
            logger.info(
                "env workers: %d for the %d training envs, %d for the %d evaluation envs "
                "(--rollout.num_workers, --eval.num_workers; 0 = in this process)",
                cfg.rollout.num_workers,
                cfg.rollout.num_envs,
                cfg.eval.num_workers,
                cfg.eval.batch_size,
            )
            start_env_worker_server(cfg.env)
        set_seed(cfg.seed)

        self.resume_from = resumable_checkpoint(self.output_dir) if cfg.resume else None
        if cfg.resume and self.resume_from is None:
            if complete_checkpoints(self.output_dir):
                raise ConfigError(
                    f"--resume=true: every checkpoint in {self.output_dir} is damaged (see above)"
                )
            raise ConfigError(
                f"--resume=true but {self.output_dir} holds no checkpoint yet (the run stopped before its "
                "first); run the same command without --resume=true to start it afresh there"
            )
        policy_path = policy_source(cfg, self.resume_from)
        if cfg.policy is None and self.resume_from is None:
            # The bootstrapped SFT policy: train_config.json names the checkpoint the run started from.
            cfg.policy = load_policy_config(str(policy_path), [])
        self.policy, self.preprocessor, self.postprocessor = build_rl_policy(
            cfg, policy_path, self.device, apply_cli_overrides=self.resume_from is None
        )
        self.algorithm = make_algorithm(cfg.algorithm)
        if main:
            check_task_envs(cfg.env, cfg.rollout.num_envs, task_group_size(cfg.algorithm))
            warn_if_it_cannot_fit(estimate_memory(cfg, profile_of(self.policy)), self.device)
            self.output_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs proved good
        self.optimizer = make_optimizer(self.policy, cfg.algorithm)
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.algorithm, cfg.iterations)
        self.state = TrainerState(next_env_seed=cfg.seed)
        if self.resume_from is not None:
            self.state = restore_training_state(self.resume_from, self.policy, self.optimizer, self.scheduler)
            logger.info("resumed from %s at iteration %d", self.resume_from, self.state.iteration)
        self.update = update(self)
        if not main:
            return

        self.metrics = MetricsLog(
            self.output_dir / "metrics.jsonl",
            resume_from_iteration=self.state.iteration if self.resume_from is not None else None,
        )
        self.source = source(self)
        self.wandb = self._init_wandb()
        save_config(cfg, self.output_dir / TRAIN_CONFIG_FILE)

    # ---- the loop -----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        sft_result = self._evaluate_sft() if self.state.iteration == 0 and self.resume_from is None else None
        self._run_started, self._elapsed_before = time.perf_counter(), self.state.elapsed_s
        last_eval = sft_result or self._log_the_checkpointed_iteration()
        checkpoint_dir, error, completed = None, None, False
        progress = progress_bar(
            total=self.cfg.iterations, initial=self.state.iteration, desc="πRL", unit="it"
        )
        try:
            if not self._budget_spent():
                self.source.start()
            while not self._budget_spent():
                collected = self.source.collect()  # 1. rollouts
                if collected is None:
                    break
                self.state.env_steps += collected.env_steps
                samples, sample_stats = self.algorithm.update_samples(collected.batches)  # 2. advantages
                rollout_row = rollout_metrics(collected.batches, self.task_names)
                # Free the rollouts before the update allocates; the samples index the observations.
                collected.batches = []
                update_start = time.perf_counter()
                try:
                    update_metrics = self.update(samples)  # 3. update
                except NonFiniteLossError as nan_error:
                    # Earlier minibatches of this update may have blown the weights up already: save
                    # nothing, so the last checkpoint stays the newest good state (issue 17).
                    error = f"{nan_error} at iteration {self.state.iteration + 1}; its update is dropped"
                    checkpoint_dir = last_checkpoint(self.output_dir)
                    raise
                with warnings.catch_warnings():
                    # The schedule counts iterations; one whose GRPO groups all tied made no optimizer step.
                    warnings.filterwarnings(
                        "ignore", message=r"Detected call of `lr_scheduler.step\(\)` before"
                    )
                    self.scheduler.step()
                self.state.iteration += 1
                self.state.elapsed_s = self._elapsed_s()
                update_s = time.perf_counter() - update_start
                final_iteration = self._budget_spent()
                row = {  # 4. save, publish, evaluate, log
                    **self._iteration_row(collected, update_s),
                    **rollout_row,
                    **sample_stats,
                    **update_metrics,
                    **collected.metrics,
                }
                evaluation_due = final_iteration or self._due(self.cfg.eval.freq)
                saving = final_iteration or self._due(self.cfg.save_freq)
                if saving:
                    # Before the learner publishes the next version (issue 17): a learner killed after it
                    # resumes past this update. The row travels with the checkpoint until it is logged.
                    checkpoint_dir = self._save(IterationRow(row, evaluation_due))
                self.source.after_update(final_iteration)
                videos = []
                if evaluation_due:
                    last_eval = self.evaluate(f"iter{self.state.iteration:06d}")
                    row.update(last_eval.to_metrics())
                    videos = last_eval.videos
                self._log(row, videos)
                if saving:
                    self.source.after_checkpoint()
                    if self.wandb is not None:
                        self.wandb.log_checkpoint(checkpoint_dir)
                    plot_learning_curves(
                        self.metrics.rows, self.output_dir / "plots", title=self.cfg.job_name
                    )
                progress.set_postfix(_progress_fields(row, last_eval), refresh=False)
                progress.update(1)
                if final_iteration or self._due(self.cfg.log_freq):
                    logger.info(self._log_line(row, last_eval))
            completed = self._budget_spent()
        except NonFiniteLossError:
            logger.error("%s; last good checkpoint: %s", error, checkpoint_dir or "none yet")
        except EnvWorkerError as worker_error:
            # The policy and state of the last completed iteration are intact: keep them, unless that
            # iteration's checkpoint exists already (never rewrite a good one).
            error = f"{worker_error} (in iteration {self.state.iteration + 1})"
            saved = get_step_checkpoint_dir(self.output_dir, self.cfg.iterations, self.state.iteration)
            checkpoint_dir = saved if saved.is_dir() else self._save()
            logger.error("%s; checkpoint of iteration %d: %s", error, self.state.iteration, checkpoint_dir)
        finally:
            progress.close()
            self.close(completed)
        return self._result(sft_result, last_eval, checkpoint_dir or last_checkpoint(self.output_dir), error)

    # ---- the steps ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def evaluation_collector(self) -> Iterator[ChunkCollector]:
        """A collector over `--eval.batch_size` envs, built for this use and closed after it, so the
        evaluation envs (and their workers) hold no memory or processes between evaluations."""
        collector, envs = build_collector(
            self.cfg,
            self.policy,
            self.preprocessor,
            self.postprocessor,
            num_envs=self.cfg.eval.batch_size,
            device=self.device,
            num_workers=self.cfg.eval.num_workers,
        )
        try:
            yield collector
        finally:
            close_envs(envs)

    def evaluate(self, label: str) -> EvalResult:
        """Deterministic episodes `eval.seed + i` (LIBERO: init state i), the same for every checkpoint; a
        multi-task run evaluates each task so (`--eval.n_episodes` each), as `lerobot-pirl-eval` does."""
        eval_cfg = self.cfg.eval
        begin = time.perf_counter()
        if len(self.task_names) > 1:
            result = evaluate_per_task(
                self.cfg,
                self.policy,
                self.preprocessor,
                self.postprocessor,
                device=self.device,
                video_dir=self.output_dir / "videos" if eval_cfg.videos else None,
                video_label=label,
            ).as_eval_result()
            logger.info(
                "eval %s: %s in %s; per task: %s",
                label,
                result.summary(),
                duration(time.perf_counter() - begin),
                result.per_task_summary(),
            )
            return result
        with self.evaluation_collector() as collector:
            result = evaluate(
                collector,
                eval_cfg.n_episodes,
                eval_cfg.seed,
                video_dir=self.output_dir / "videos",
                n_videos=eval_cfg.videos,
                video_prefix=label,
                fps=self.cfg.env.fps,
                before_reset=evaluation_reset_hook(self.cfg.env, eval_cfg.seed),
                description=f"eval {label}",
            )
        logger.info("eval %s: %s in %s", label, result.summary(), duration(time.perf_counter() - begin))
        return result

    def _log_the_checkpointed_iteration(self) -> EvalResult | None:
        """A run killed between a checkpoint and that iteration's metrics row (in its evaluation, say):
        log the row saved with the checkpoint, evaluating first if that was due."""
        if self.resume_from is None or any(
            r.get("iteration") == self.state.iteration for r in self.metrics.rows
        ):
            return None
        pending = load_iteration_row(self.resume_from)
        if pending is None:
            return None
        result, videos = None, []
        if pending.evaluation_due:
            result = self.evaluate(f"iter{self.state.iteration:06d}")
            pending.row.update(result.to_metrics())
            videos = result.videos
        logger.info(
            "logged iteration %d, saved with its checkpoint before the run stopped", self.state.iteration
        )
        self._log(pending.row, videos)
        return result

    def _evaluate_sft(self) -> EvalResult:
        result = self.evaluate("sft")
        self.state.sft_success_rate, self.state.sft_eval_episodes = result.success_rate, result.n_episodes
        self._log({"iteration": 0, "env_steps": 0, **result.to_metrics()}, result.videos)
        return result

    def _iteration_row(self, collected: Collected, update_s: float) -> dict[str, float]:
        return {
            "iteration": self.state.iteration,
            "env_steps": self.state.env_steps,
            "time_s": self.state.elapsed_s,
            "charts/SPS": collected.env_steps / max(collected.collect_s, 1e-9),
            "charts/collect_s": collected.collect_s,
            "charts/update_s": update_s,
            "charts/actor_lr": self.optimizer.param_groups[0]["lr"],
        }

    def _log_line(self, row: dict, last_eval: EvalResult | None) -> str:
        """One line per logged iteration, as `lerobot-train` logs its steps."""
        fields = {
            "iter": f"{self.state.iteration}/{self.cfg.iterations}",
            "env_steps": f"{self.state.env_steps:,}",
            **_progress_fields(row, last_eval),
            "pi_loss": f"{row['losses/policy_loss']:.3g}" if "losses/policy_loss" in row else "-",
            "v_loss": f"{row['losses/value_loss']:.3g}" if "losses/value_loss" in row else "-",
            "lr": f"{row['charts/actor_lr']:.1e}",
            "time": duration(self.state.elapsed_s),
        }
        return " ".join(f"{key}:{value}" for key, value in fields.items())

    def _save(self, row: IterationRow | None = None) -> Path:
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
            row=row,
        )

    def _log(self, row: dict, videos: list[str] = ()) -> None:
        try:
            self.metrics.append(row)
        except OutputWriteError as error:
            kept = last_checkpoint(self.output_dir)
            raise OutputWriteError(f"{error}; the last complete checkpoint is {kept or 'none'}") from error
        if self.wandb is not None:
            self.wandb.log(row, videos)

    def _elapsed_s(self) -> float:
        """Training wall time of the whole run, resumed runs included."""
        return self._elapsed_before + time.perf_counter() - self._run_started

    def _due(self, freq: int) -> bool:
        """Every `freq` iterations (0: never)."""
        return freq > 0 and self.state.iteration % freq == 0

    def _budget_spent(self) -> bool:
        cfg = self.cfg
        if self.state.iteration >= cfg.iterations:
            return True
        if cfg.max_env_steps is not None and self.state.env_steps >= cfg.max_env_steps:
            return True
        return cfg.max_minutes is not None and self._elapsed_s() / 60 >= cfg.max_minutes

    def close(self, completed: bool) -> None:
        self.source.close(completed)

    def _result(
        self, sft: EvalResult | None, final: EvalResult | None, checkpoint_dir: Path | None, error: str | None
    ) -> TrainResult:
        plot_learning_curves(self.metrics.rows, self.output_dir / "plots", title=self.cfg.job_name)
        if sft is None and self.state.sft_success_rate is not None:  # resumed: the baseline from the state
            sft = EvalResult(
                self.state.sft_success_rate, math.nan, math.nan, self.state.sft_eval_episodes, 0, 0
            )
        if self.wandb is not None:
            self.wandb.finish()
        return TrainResult(sft, final, self.state, checkpoint_dir, stopped_by_error=error)

    # ---- set-up helpers -----------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        if self.cfg.resume or not self.output_dir.exists() or not any(self.output_dir.iterdir()):
            return
        if complete_checkpoints(self.output_dir) or last_checkpoint(self.output_dir) is not None:
            raise ConfigError(
                f"output dir {self.output_dir} already holds a run; pass --resume=true to continue it "
                "or choose another --output_dir"
            )
        # A run stopped before its first checkpoint left logs only: start it afresh in the same folder.
        logger.warning(
            "%s holds no checkpoint (a run stopped before its first): starting afresh", self.output_dir
        )

    def _init_wandb(self):
        if not self.cfg.wandb.enable:
            return None
        from lerobot_pirl.runtime.wandb_run import WandBRun

        return WandBRun(self.cfg, self.output_dir)


def _progress_fields(row: dict, last_eval: EvalResult | None) -> dict[str, str]:
    rollout_success = row.get("rollout/success_rate", math.nan)
    return {  # "-" where there is nothing yet (no episode ended in this rollout, no evaluation)
        "rollout": "-" if math.isnan(rollout_success) else f"{rollout_success:.0%}",
        "eval": f"{last_eval.success_rate:.0%}" if last_eval else "-",
        "kl": f"{row['losses/approx_kl']:.3g}" if "losses/approx_kl" in row else "-",
        "sps": f"{row['charts/SPS']:.0f}",
    }
