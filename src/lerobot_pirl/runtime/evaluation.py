"""Deterministic evaluation: the same ODE sampler, K, episode seeds and initial noise for the SFT baseline
and every RL checkpoint (a protocol mismatch between them reads as "RL made it worse")."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from lerobot.utils.io_utils import write_video
from scipy.stats import binomtest

from lerobot_pirl.progress import progress_bar
from lerobot_pirl.rollout.collector import ChunkCollector

logger = logging.getLogger(__name__)


def success_interval(successes: int, episodes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success rate (well-behaved at 0% and 100%, unlike the normal one)."""
    if episodes == 0:
        return (math.nan, math.nan)
    interval = binomtest(successes, episodes).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


@dataclass
class EvalResult:
    success_rate: float
    ci_low: float
    ci_high: float
    n_episodes: int
    mean_return: float
    mean_length: float
    successes: list[bool] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)  # per episode
    per_task: dict[str, EvalResult] = field(default_factory=dict)  # a multi-task run's tasks, by name

    def lerobot_metrics(self) -> dict:
        """This result under `lerobot-eval`'s `eval_info.json` keys (success in percent), plus ours: the
        Wilson interval in percent and the mean episode length. LeRobot's `avg_max_reward` is left out:
        the collector sums rewards per action chunk, so no per-step maximum is known."""
        return {
            "avg_sum_reward": self.mean_return,
            "pc_success": 100 * self.success_rate,
            "n_episodes": self.n_episodes,
            "video_paths": list(self.videos),
            "pc_success_ci95": [100 * self.ci_low, 100 * self.ci_high],
            "avg_episode_length": self.mean_length,
        }

    def summary(self) -> str:
        return (
            f"{100 * self.success_rate:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] "
            f"({self.n_episodes} episodes)"
        )

    def to_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`<prefix>/success_rate` etc., and `<prefix>/<task>/...` for each task of a multi-task run."""
        metrics = {
            f"{prefix}/success_rate": self.success_rate,
            f"{prefix}/ci_low": self.ci_low,
            f"{prefix}/ci_high": self.ci_high,
            f"{prefix}/episodes": float(self.n_episodes),
            f"{prefix}/episode_return": self.mean_return,
            f"{prefix}/episode_length": self.mean_length,
        }
        for task, result in self.per_task.items():
            metrics |= result.to_metrics(f"{prefix}/{task}")
        return metrics

    def per_task_summary(self) -> str:
        """`reach-v3 100%, push-v3 84%, ...` (empty for a single-task result)."""
        return ", ".join(f"{task} {100 * r.success_rate:.0f}%" for task, r in self.per_task.items())

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    collector: ChunkCollector,
    n_episodes: int,
    seed: int,
    *,
    video_dir: Path | None = None,
    n_videos: int = 0,
    video_prefix: str = "eval",
    fps: int = 30,
    before_reset=None,
    description: str = "eval",
) -> EvalResult:
    """Run `n_episodes` deterministic (ODE) episodes: episode i is reset with `seed + i` and draws its chains'
    initial noise from a generator seeded with `seed + i`, so the same policy gets the same result for any
    number of envs and whatever ran before. A terminal shows the episodes done as each round ends."""
    num_envs = collector.num_envs
    successes, returns, lengths = [], [], []
    videos = []
    round_index = 0
    progress = progress_bar(total=n_episodes, desc=description, unit="episode", leave=False)
    while len(successes) < n_episodes:
        seeds = [seed + round_index * num_envs + i for i in range(num_envs)]
        record = min(n_videos, num_envs) if round_index == 0 and video_dir else 0
        batch = collector.collect_episodes(
            seeds, "ode", before_reset=before_reset, record=record, noise_seeds=seeds
        )
        take = min(num_envs, n_episodes - len(successes))
        successes += batch.episode_success[:take].tolist()
        returns += batch.episode_returns[:take].tolist()
        lengths += batch.episode_lengths[:take].tolist()
        if record and collector.recorded_frames and video_dir is not None:
            video_dir.mkdir(parents=True, exist_ok=True)
            for env, frames in zip(collector.recorded_envs, collector.recorded_frames, strict=True):
                path = video_dir / f"{video_prefix}_episode_{env}.mp4"  # env i runs episode i in round 0
                try:
                    write_video(path, frames, fps)
                    videos.append(str(path))
                except OSError as error:  # a video is for looking at: the evaluation's numbers go on
                    logger.warning("could not write the video %s (%s); going on without it", path, error)
        round_index += 1
        progress.update(take)
    progress.close()
    low, high = success_interval(int(sum(successes)), len(successes))
    return EvalResult(
        success_rate=float(np.mean(successes)),
        ci_low=low,
        ci_high=high,
        n_episodes=len(successes),
        mean_return=float(np.mean(returns)),
        mean_length=float(np.mean(lengths)),
        successes=[bool(s) for s in successes],
        videos=videos,
        returns=[float(r) for r in returns[:n_episodes]],
    )
