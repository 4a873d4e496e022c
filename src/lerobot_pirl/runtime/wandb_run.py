"""The W&B side of a training run, in `lerobot-train`'s conventions (`lerobot.common.wandb_utils`).

`--wandb.run_id` (or, on `--resume=true`, the id of the run's own `wandb/latest-run`) continues that W&B
run with `resume="must"`; a new run gets no resume mode. Evaluation videos are logged with their metrics
row, and each checkpoint's `pretrained_model/` as a model artifact unless `--wandb.disable_artifact=true`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import draccus
from lerobot.common.wandb_utils import get_safe_wandb_artifact_name, get_wandb_run_id_from_filesystem
from lerobot.utils.constants import PRETRAINED_MODEL_DIR

logger = logging.getLogger(__name__)


def run_tags(cfg) -> list[str]:
    """LeRobot's tags (`cfg_to_group`): policy type, seed, env type."""
    policy_type = cfg.policy.type if cfg.policy is not None else "flow_mlp"
    return [f"policy:{policy_type}", f"seed:{cfg.seed}", f"env:{cfg.env.type}"]


class WandBRun:
    def __init__(self, cfg, output_dir: Path):
        os.environ.setdefault("WANDB_SILENT", "True")  # as LeRobot: W&B's own banner floods the log
        import wandb

        wandb_cfg = cfg.wandb
        run_id = wandb_cfg.run_id
        if run_id is None and cfg.resume:
            try:
                run_id = get_wandb_run_id_from_filesystem(output_dir)
            except RuntimeError:
                logger.warning("no W&B run in %s/wandb to continue; logging to a new one", output_dir)
        self._wandb = wandb
        self.run = wandb.init(
            id=run_id,
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            name=cfg.job_name,
            notes=wandb_cfg.notes,
            tags=run_tags(cfg) if wandb_cfg.add_tags else None,
            dir=str(output_dir),
            config=draccus.encode(cfg),
            job_type="train_eval",
            resume="must" if run_id is not None else None,
            mode=wandb_cfg.mode if wandb_cfg.mode in ("online", "offline", "disabled") else "online",
        )
        wandb_cfg.run_id = self.run.id  # saved in train_config.json, so a resume finds the same run
        self.artifact_prefix = cfg.job_name
        self.log_artifacts = not wandb_cfg.disable_artifact
        logger.info("W&B run %s (%s)", self.run.id, self.run.get_url() or wandb_cfg.mode)

    def log(self, row: dict, videos: Sequence[str] = ()) -> None:
        """One metrics row at step `row["iteration"]`, with the evaluation videos it produced."""
        data = {k: v for k, v in row.items() if v is not None}
        if videos:
            data["eval/videos"] = [self._wandb.Video(path, format="mp4") for path in videos]
        self.run.log(data, step=row["iteration"])

    def log_checkpoint(self, checkpoint_dir: Path) -> None:
        """The checkpoint's policy folder (weights, config, processors) as a model artifact."""
        if not self.log_artifacts:
            return
        name = get_safe_wandb_artifact_name(f"{self.artifact_prefix}-{checkpoint_dir.name}")
        artifact = self._wandb.Artifact(name, type="model")
        artifact.add_dir(str(checkpoint_dir / PRETRAINED_MODEL_DIR))
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()
