"""`lerobot-pirl-train`: online RL fine-tuning of a LeRobot flow policy (see runtime/config.py).

No `from __future__ import annotations` here: LeRobot's parser reads the config class from the
annotation of `main`, which must stay a real type."""

import logging
import sys

from lerobot.configs import parser
from tqdm.contrib.logging import logging_redirect_tqdm

from lerobot_pirl.runtime.config import TrainConfig
from lerobot_pirl.scripts._cli import report_training, run, setup_logging


def train(cfg: TrainConfig):
    """Build and run the trainer; returns its TrainResult. Raises ConfigError on bad input."""
    from lerobot_pirl.runtime.trainer import Trainer

    cfg.validate()
    if cfg.push_to_hub_requested():
        from lerobot_pirl.runtime.hub import check_push_possible

        check_push_possible(cfg.policy.repo_id)
    return Trainer(cfg).run()


def push(cfg: TrainConfig, result) -> int:
    """Push the final checkpoint after its result is printed; a failure is one line (exit status 1)."""
    from lerobot_pirl.runtime.hub import push_checkpoint, push_command

    try:
        url = push_checkpoint(result.checkpoint_dir, cfg.policy.repo_id, private=bool(cfg.policy.private))
    except Exception as error:  # noqa: BLE001 - network, auth, quota: all end the same way
        reason = (str(error).strip().splitlines() or [""])[0]
        later = push_command(cfg.policy.repo_id, result.checkpoint_dir)
        print(
            f"lerobot-pirl-train: push to {cfg.policy.repo_id} failed ({type(error).__name__}: {reason}); "
            f"the checkpoint is safe; push it later with: {later}",
            file=sys.stderr,
        )
        return 1
    logging.info("Policy pushed to %s", url)
    return 0


@parser.wrap()
def main(cfg: TrainConfig) -> int:
    setup_logging()
    with logging_redirect_tqdm():  # log lines above the progress bars, not glued to them
        result = train(cfg)
    status = report_training(result)
    if status == 0 and result.checkpoint_dir is not None and cfg.push_to_hub_requested():
        status = push(cfg, result)
    return status


def cli() -> None:
    run(main, "lerobot-pirl-train")


if __name__ == "__main__":
    cli()
