"""Per-task evaluation of a policy over every task an env config selects (a LIBERO suite, or several).

Each task runs the single evaluation protocol of `runtime.evaluation.evaluate` (deterministic ODE,
the rollout's K and C, episode i reset with seed `eval.seed + i`) on its own envs; on LIBERO episode i
also starts from init state i (`runtime.envs.evaluation_reset_hook`), so with the default 50 episodes
every task is evaluated on all 50 of its init states (LIBERO's standard protocol) and every checkpoint
sees exactly the same scenes. Suites and the whole run pool their tasks' episodes, each with a Wilson
95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lerobot_pirl.runtime.config import EvalConfig, TrainConfig
from lerobot_pirl.runtime.envs import evaluation_reset_hook, single_task_configs
from lerobot_pirl.runtime.evaluation import EvalResult, evaluate, success_interval


def pool_results(results: list[EvalResult]) -> EvalResult:
    """One EvalResult over all episodes of `results` (returns and lengths averaged per episode)."""
    episodes = sum(r.n_episodes for r in results)
    if episodes == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0, float("nan"), float("nan"))
    successes = [s for r in results for s in r.successes]
    low, high = success_interval(int(sum(successes)), len(successes))
    weights = np.array([r.n_episodes for r in results], dtype=np.float64)
    return EvalResult(
        success_rate=float(np.mean(successes)),
        ci_low=low,
        ci_high=high,
        n_episodes=episodes,
        mean_return=float(np.average([r.mean_return for r in results], weights=weights)),
        mean_length=float(np.average([r.mean_length for r in results], weights=weights)),
        successes=successes,
        videos=[v for r in results for v in r.videos],
        returns=[x for r in results for x in r.returns],
    )


@dataclass
class TaskEvalResult:
    suite: str
    task_id: int
    task: str  # the language instruction the policy received
    result: EvalResult
    name: str = ""  # the task's metric label: a MetaWorld task name, or `<suite>_<task_id>` on LIBERO


@dataclass
class SuiteEvalResult:
    """Per-task results; `per_suite()` and `overall()` pool their episodes."""

    tasks: list[TaskEvalResult] = field(default_factory=list)

    def per_suite(self) -> dict[str, EvalResult]:
        suites = dict.fromkeys(t.suite for t in self.tasks)
        return {s: pool_results([t.result for t in self.tasks if t.suite == s]) for s in suites}

    def overall(self) -> EvalResult:
        return pool_results([t.result for t in self.tasks])

    def as_eval_result(self) -> EvalResult:
        """All episodes pooled, with each task's own result in `per_task` (the trainer's evaluation)."""
        overall = self.overall()
        overall.per_task = {t.name or f"{t.suite}_{t.task_id}": t.result for t in self.tasks}
        return overall

    def table(self) -> str:
        """Plain-text table: one row per task, then one per suite, then the total."""
        lines = [f"{'suite':16s} {'task':>4s} {'success':>8s} {'95% CI':>16s} {'episodes':>8s}  instruction"]

        def row(suite: str, task: str, result: EvalResult, text: str = "") -> str:
            interval = f"[{100 * result.ci_low:.1f}, {100 * result.ci_high:.1f}]"
            return (
                f"{suite:16s} {task:>4s} {100 * result.success_rate:7.1f}% {interval:>16s} "
                f"{result.n_episodes:8d}  {text}"
            ).rstrip()

        lines += [row(t.suite, str(t.task_id), t.result, t.task) for t in self.tasks]
        lines += [row(suite, "all", result) for suite, result in self.per_suite().items()]
        lines.append(row("total", "all", self.overall()))
        return "\n".join(lines)

    def to_lerobot_eval_info(self, eval_s: float) -> dict:
        """`lerobot-eval`'s `eval_info.json` layout (`per_task[].metrics`, `per_group`, `overall`, success
        in percent), each entry with our Wilson interval and mean length too; `per_task` also names the
        instruction the policy received."""
        overall = self.overall()
        return {
            "per_task": [
                {
                    "task_group": t.suite,
                    "task_id": t.task_id,
                    "task": t.task,
                    "metrics": {
                        "sum_rewards": t.result.returns,
                        "successes": t.result.successes,
                        **t.result.lerobot_metrics(),
                    },
                }
                for t in self.tasks
            ],
            "per_group": {suite: result.lerobot_metrics() for suite, result in self.per_suite().items()},
            "overall": {
                **overall.lerobot_metrics(),
                "eval_s": eval_s,
                "eval_ep_s": eval_s / max(1, overall.n_episodes),
            },
        }


def evaluate_per_task(
    cfg: TrainConfig,
    policy,
    preprocessor,
    postprocessor,
    *,
    device: torch.device,
    eval_cfg: EvalConfig | None = None,
    video_dir: Path | None = None,
    video_label: str = "",
) -> SuiteEvalResult:
    """Evaluate `policy` on every task `cfg.env` selects, one task at a time (its envs are closed before
    the next task's are built), `eval_cfg.n_episodes` episodes on `eval_cfg.batch_size` envs each.
    Videos are named `<video_label>_<task>_episode_<i>.mp4`."""
    from lerobot.envs.utils import close_envs

    from lerobot_pirl.runtime.envs import check_num_workers, default_num_workers, resolve_eval_batch_size
    from lerobot_pirl.runtime.factory import build_collector

    eval_cfg = eval_cfg or cfg.eval
    resolve_eval_batch_size(cfg.env, eval_cfg)
    num_workers = eval_cfg.num_workers
    if num_workers is None:
        num_workers = default_num_workers(cfg.env, eval_cfg.batch_size, cfg.rollout.use_async_envs)
    check_num_workers(cfg.env, num_workers, eval_cfg.batch_size, "--eval.num_workers")
    results = SuiteEvalResult()
    for suite, task_id, task_env_cfg in single_task_configs(cfg.env):
        task_cfg = replace(cfg, env=task_env_cfg)
        name = task_env_cfg.task if task_env_cfg.type == "metaworld_state" else f"{suite}_{task_id}"
        collector, envs = build_collector(
            task_cfg,
            policy,
            preprocessor,
            postprocessor,
            num_envs=eval_cfg.batch_size,
            device=device,
            num_workers=num_workers,
        )
        try:
            result = evaluate(
                collector,
                eval_cfg.n_episodes,
                eval_cfg.seed,
                video_dir=video_dir,
                n_videos=eval_cfg.videos if video_dir is not None else 0,
                video_prefix="_".join(part for part in (video_label, name) if part),
                fps=task_env_cfg.fps,
                before_reset=evaluation_reset_hook(task_env_cfg, eval_cfg.seed),
                description=" ".join(part for part in ("eval", video_label, name) if part),
            )
        finally:
            close_envs(envs)
        results.tasks.append(TaskEvalResult(suite, task_id, collector.tasks[0], result, name))
    return results
