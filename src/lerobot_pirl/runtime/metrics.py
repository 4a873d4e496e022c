"""metrics.jsonl (a line per iteration, flushed at once: a crash loses nothing) and learning curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


class OutputWriteError(OSError):
    """A run output that cannot be lost (metrics, a checkpoint) could not be written (disk full,
    read-only, ...); the CLIs print it as one line, exit status 1."""


class MetricsLog:
    def __init__(self, path: Path, resume_from_iteration: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if resume_from_iteration is not None and self.path.exists():
            # Lines a killed run wrote after its last checkpoint describe updates that are redone now.
            self.rows = [
                row for row in self.read(self.path) if row.get("iteration", 0) <= resume_from_iteration
            ]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        elif self.path.exists():
            self.path.unlink()

    @staticmethod
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        line = json.dumps(clean) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as error:
            raise OutputWriteError(f"could not append to {self.path} ({error.strerror or error})") from error
        self.rows.append(clean)


def _series(rows: list[dict], key: str, x_key: str = "env_steps") -> tuple[list, list]:
    points = [(row[x_key], row[key]) for row in rows if row.get(key) is not None and x_key in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_learning_curves(rows: list[dict], plot_dir: Path, title: str = "") -> list[Path]:
    """eval success vs env steps (with its 95% interval), losses, approx-KL and clip fraction."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    steps, success = _series(rows, "eval/success_rate")
    if steps:
        _, low = _series(rows, "eval/ci_low")
        _, high = _series(rows, "eval/ci_high")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [100 * s for s in success], marker="o", label="deterministic eval")
        if len(low) == len(steps):
            ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], alpha=0.2, label="95% CI")
        rollout_steps, rollout_success = _series(rows, "rollout/success_rate")
        if rollout_steps:
            ax.plot(rollout_steps, [100 * s for s in rollout_success], alpha=0.6, label="rollout (noisy)")
        ax.set_xlabel("env steps")
        ax.set_ylabel("success (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(title or "success")
        ax.legend()
        fig.tight_layout()
        _save_figure(fig, plot_dir / "success.png", written)

    _plot_tasks(rows, plot_dir, title, written)

    panels = [
        ("losses/policy_loss", "policy loss"),
        ("losses/value_loss", "value loss"),
        ("losses/approx_kl", "approx KL"),
        ("losses/clipfrac", "clip fraction"),
    ]
    present = [(key, label) for key, label in panels if _series(rows, key)[0]]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, (key, label) in zip(axes[0], present, strict=True):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys)
            ax.set_title(label)
            ax.set_xlabel("env steps")
        fig.tight_layout()
        _save_figure(fig, plot_dir / "training.png", written)
    return written


def task_names_in(rows: list[dict]) -> list[str]:
    """The tasks a multi-task run evaluated (`eval/<task>/success_rate` keys), in the order first logged."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "success_rate":
                names[parts[1]] = None
    return list(names)


def _plot_tasks(rows: list[dict], plot_dir: Path, title: str, written: list[Path]) -> None:
    """tasks.png: each task's eval success vs env steps, and a bar per task for the first and the last
    evaluation (a multi-task run only)."""
    tasks = task_names_in(rows)
    if not tasks:
        return
    evaluated = [row for row in rows if row.get(f"eval/{tasks[0]}/success_rate") is not None]
    first, last = evaluated[0], evaluated[-1]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    for task in tasks:
        xs, ys = _series(rows, f"eval/{task}/success_rate")
        curves.plot(xs, [100 * y for y in ys], marker=".", label=task)
    xs, ys = _series(rows, "eval/success_rate")
    curves.plot(xs, [100 * y for y in ys], color="black", linewidth=2.5, label="mean")
    curves.set_xlabel("env steps")
    curves.set_ylabel("success (%)")
    curves.set_ylim(-2, 102)
    curves.set_title(title or "success per task")
    curves.legend(fontsize="x-small", ncol=2 if len(tasks) > 12 else 1)
    positions = range(len(tasks))
    width = 0.4
    for offset, row, label in ((-width / 2, first, "first eval"), (width / 2, last, "last eval")):
        values = [100 * (row.get(f"eval/{task}/success_rate") or 0.0) for task in tasks]
        bars.bar(
            [p + offset for p in positions],
            values,
            width,
            label=f"{label} (step {row.get('env_steps', 0):,})",
        )
    bars.set_xticks(list(positions), tasks, rotation=60, ha="right", fontsize="x-small")
    bars.set_ylabel("success (%)")
    bars.set_ylim(0, 102)
    bars.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, plot_dir / "tasks.png", written)


def _save_figure(fig, path: Path, written: list[Path]) -> None:
    """Plots are redrawn from metrics.jsonl at every checkpoint: one that cannot be written is a warning."""
    try:
        fig.savefig(path, dpi=100)
        written.append(path)
    except OSError as error:
        logger.warning("could not write the plot %s (%s); going on without it", path, error.strerror or error)
    finally:
        plt.close(fig)
