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


def _save_figure(fig, path: Path, written: list[Path]) -> None:
    """Plots are redrawn from metrics.jsonl at every checkpoint: one that cannot be written is a warning."""
    try:
        fig.savefig(path, dpi=100)
        written.append(path)
    except OSError as error:
        logger.warning("could not write the plot %s (%s); going on without it", path, error.strerror or error)
    finally:
        plt.close(fig)
