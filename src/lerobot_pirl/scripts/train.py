"""`lerobot-pirl-train`: online RL fine-tuning of a LeRobot flow policy (see runtime/config.py).

No `from __future__ import annotations` here: LeRobot's parser reads the config class from the
annotation of `main`, which must stay a real type."""

import logging

from lerobot.configs import parser

from lerobot_pirl.runtime.config import TrainConfig
from lerobot_pirl.scripts._cli import report_training, run, setup_logging


def train(cfg: TrainConfig):
    """Build and run the trainer; returns its TrainResult. Raises ConfigError on bad input."""
    from lerobot_pirl.runtime.trainer import Trainer

    cfg.validate()
    trainer = Trainer(cfg)
    result = trainer.run()
    if result.checkpoint_dir is not None and cfg.push_to_hub_requested():
        from lerobot_pirl.runtime.hub import push_checkpoint

        url = push_checkpoint(result.checkpoint_dir, cfg.policy.repo_id, private=bool(cfg.policy.private))
        logging.info("Policy pushed to %s", url)
    return result


@parser.wrap()
def main(cfg: TrainConfig) -> int:
    setup_logging()
    return report_training(train(cfg))


def cli() -> None:
    run(main, "lerobot-pirl-train")


if __name__ == "__main__":
    cli()
