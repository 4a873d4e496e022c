"""Checkpoints in LeRobot's layout, written so that a crash never leaves a half checkpoint behind.

<output_dir>/checkpoints/<iteration>/pretrained_model/   the policy, as its own LeRobot type, with
                                                         its processors: `lerobot-eval` and
                                                         `from_pretrained` load it unchanged
<output_dir>/checkpoints/<iteration>/training_state/     optimizer, scheduler, RNG, step (LeRobot's
                                                         files) + RL heads, algorithm config, and
                                                         the trainer's counters
<output_dir>/checkpoints/last -> <iteration>
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import draccus
import torch
from lerobot.common.train_utils import (
    get_step_checkpoint_dir,
    load_training_state,
    save_training_state,
)
from lerobot.utils.constants import (
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT_LINK,
    PRETRAINED_MODEL_DIR,
    TRAINING_STATE_DIR,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.runtime.config import TRAIN_CONFIG_FILE
from lerobot_pirl.runtime.metrics import OutputWriteError

HEADS_FILE = "rl_heads.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
ALGORITHM_FILE = "algorithm_config.json"
ITERATION_ROW_FILE = "iteration_row.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    iteration: int = 0  # completed rollout + update cycles
    env_steps: int = 0  # training env steps so far
    next_env_seed: int = 0  # the collector's reset-seed counter, so a resumed run sees new episodes
    elapsed_s: float = 0.0
    sft_success_rate: float | None = None  # the baseline, evaluated before the first update
    sft_eval_episodes: int = 0


@dataclass
class IterationRow:
    """The checkpointed iteration's metrics row, saved before its evaluation runs and the row is logged."""

    row: dict
    evaluation_due: bool


def save_config(cfg, path: Path) -> None:
    with open(path, "w") as f, draccus.config_type("json"):
        draccus.dump(cfg, f, indent=4)


class CheckpointWriteError(OutputWriteError):
    """A checkpoint could not be written (disk full, read-only, ...); the CLIs print it as one line."""


def save_checkpoint(
    output_dir: Path,
    *,
    cfg,
    total_iterations: int,
    policy: FlowRLPolicy,
    preprocessor,
    postprocessor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainerState,
    row: IterationRow | None = None,
) -> Path:
    """Write checkpoints/<iteration>/ via a temporary folder, then point `last` at it. An I/O failure
    removes the temporary folder and raises CheckpointWriteError; `last` is left as it was."""
    final_dir = get_step_checkpoint_dir(output_dir, total_iterations, state.iteration)
    staging = final_dir.with_name(final_dir.name + ".partial")
    try:
        _write_checkpoint(staging, cfg, policy, preprocessor, postprocessor, optimizer, scheduler, state, row)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        shutil.rmtree(staging, ignore_errors=True)
        kept = last_checkpoint(output_dir)
        raise CheckpointWriteError(
            f"could not write checkpoint {final_dir.name} ({getattr(error, 'strerror', None) or error}); "
            f"the last complete checkpoint is {kept or 'none'}"
        ) from error
    if final_dir.exists():  # a re-run of the same iteration after a resume
        shutil.rmtree(final_dir)
    staging.rename(final_dir)
    point_last_at(final_dir)
    logger.info("checkpoint saved: %s", final_dir)
    return final_dir


def _write_checkpoint(
    staging, cfg, policy, preprocessor, postprocessor, optimizer, scheduler, state, row
) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    pretrained = staging / PRETRAINED_MODEL_DIR
    lerobot_policy = policy.adapter.policy
    lerobot_policy.save_pretrained(pretrained, state_dict=policy.adapter.policy_state_dict())
    preprocessor.save_pretrained(pretrained)
    postprocessor.save_pretrained(pretrained)
    save_config(cfg, pretrained / TRAIN_CONFIG_FILE)

    save_training_state(staging, state.iteration, optimizer, scheduler)
    training_state = staging / TRAINING_STATE_DIR
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in policy.heads_state_dict().items()},
        training_state / HEADS_FILE,
    )
    with open(training_state / ALGORITHM_FILE, "w") as f, draccus.config_type("json"):
        draccus.dump(cfg.algorithm, f, indent=4)
    (training_state / TRAINER_STATE_FILE).write_text(json.dumps(state.__dict__, indent=2))
    if row is not None:
        finite = {k: v for k, v in row.row.items() if not (isinstance(v, float) and not math.isfinite(v))}
        document = {"row": finite, "evaluation_due": row.evaluation_due}
        (training_state / ITERATION_ROW_FILE).write_text(json.dumps(document, indent=2))


def point_last_at(checkpoint_dir: Path) -> None:
    """Move `checkpoints/last` atomically: a new link renamed over the old one. (LeRobot's
    update_last_checkpoint unlinks first, and a kill between its two calls leaves no `last`.)"""
    last = checkpoint_dir.parent / LAST_CHECKPOINT_LINK
    fresh = checkpoint_dir.parent / f".{LAST_CHECKPOINT_LINK}.{os.getpid()}"
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(checkpoint_dir.name)
    os.replace(fresh, last)


def last_checkpoint(output_dir: Path) -> Path | None:
    """`checkpoints/last`, or else the newest complete checkpoint (`.partial` folders are never one)."""
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    last = checkpoints / LAST_CHECKPOINT_LINK
    if last.exists():
        return last.resolve()
    complete = complete_checkpoints(output_dir)
    return complete[0] if complete else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The numbered checkpoint folders, newest first (`.partial` staging folders are never one)."""
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    complete = [d for d in checkpoints.glob("[0-9]*") if d.is_dir() and d.name.isdigit()]
    return sorted(complete, key=lambda d: int(d.name), reverse=True)


def checkpoint_damage(checkpoint_dir: Path) -> str | None:
    """What makes a checkpoint unusable for a resume (a missing file, a truncated safetensors file, JSON
    that does not parse), or None. Reads the headers only: safetensors checks them against the file size."""
    pretrained, training_state = checkpoint_dir / PRETRAINED_MODEL_DIR, checkpoint_dir / TRAINING_STATE_DIR
    required = [pretrained / "config.json"]
    required += [
        training_state / name
        for name in (
            "optimizer_state.safetensors",
            "optimizer_param_groups.json",
            "rng_state.safetensors",
            "training_step.json",
            HEADS_FILE,
            TRAINER_STATE_FILE,
            "scheduler_state.json",
        )
    ]
    for path in required:
        if not path.is_file():
            return f"{path.relative_to(checkpoint_dir)} is missing"
    weights = list(pretrained.glob("*.safetensors"))
    if not any(p.name in ("model.safetensors", "adapter_model.safetensors") for p in weights):
        return f"{PRETRAINED_MODEL_DIR}/ holds no model weights"
    for path in sorted({*weights, *training_state.glob("*.safetensors")}):
        try:
            with safe_open(str(path), "pt") as tensors:
                tensors.keys()
        except (SafetensorError, OSError) as error:
            return f"{path.relative_to(checkpoint_dir)} is damaged ({error})"
    for path in sorted({*pretrained.glob("*.json"), *training_state.glob("*.json")}):
        try:
            json.loads(path.read_text())
        except (ValueError, OSError) as error:
            return f"{path.relative_to(checkpoint_dir)} is damaged ({error})"
    return None


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint a resume can load: `checkpoints/last` unless it is damaged, else the newest
    complete one that is not, with a warning for each one passed over (issue 17)."""
    last = last_checkpoint(output_dir)
    candidates = list(
        dict.fromkeys([*([last] if last is not None else []), *complete_checkpoints(output_dir)])
    )
    for checkpoint_dir in candidates:
        damage = checkpoint_damage(checkpoint_dir)
        if damage is None:
            return checkpoint_dir
        logger.warning(
            "checkpoint %s cannot be resumed from: %s; trying the one before", checkpoint_dir, damage
        )
    return None


def load_iteration_row(checkpoint_dir: Path) -> IterationRow | None:
    path = checkpoint_dir / TRAINING_STATE_DIR / ITERATION_ROW_FILE
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    return IterationRow(document["row"], bool(document["evaluation_due"]))


def load_trainer_state(checkpoint_dir: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint_dir / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text()))


def restore_training_state(
    checkpoint_dir: Path,
    policy: FlowRLPolicy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> TrainerState:
    """Load heads, optimizer, scheduler and RNG (the policy weights come from pretrained_model/)."""
    training_state = checkpoint_dir / TRAINING_STATE_DIR
    heads = load_file(training_state / HEADS_FILE)
    policy.load_heads_state_dict({k: v.to(next(policy.parameters()).device) for k, v in heads.items()})
    load_training_state(checkpoint_dir, optimizer, scheduler)
    return load_trainer_state(checkpoint_dir)
