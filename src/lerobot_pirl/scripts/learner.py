"""`lerobot-pirl-learner`: the learner of a distributed πRL run (see distributed/learner.py).

    lerobot-pirl-learner --policy.path=<sft> --env.type=metaworld_state --env.task=push-v3 \\
        --transport.num_actors=2 --output_dir=outputs/push
    torchrun --nproc_per_node=2 -m lerobot_pirl.scripts.learner ...   # DDP over 2 GPUs

Takes every `lerobot-pirl-train` flag plus `--transport.*` (distributed/config.py).
No `from __future__ import annotations` here: LeRobot's parser reads the config class from the
annotation of `main`, which must stay a real type.
"""

import os

from lerobot.configs import parser

from lerobot_pirl.distributed.config import DistributedTrainConfig
from lerobot_pirl.scripts._cli import report_training, run, setup_logging


def learn(cfg: DistributedTrainConfig):
    """Build and run the learner; returns its TrainResult. Raises ConfigError on bad input."""
    from lerobot_pirl.distributed.learner import learn as run_learner

    cfg.validate()
    return run_learner(cfg)


@parser.wrap()
def main(cfg: DistributedTrainConfig) -> int:
    rank = os.environ.get("RANK")
    setup_logging(f"learner[{rank}]" if rank else "learner")
    return report_training(learn(cfg))


def cli() -> None:
    run(main, "lerobot-pirl-learner")


if __name__ == "__main__":
    cli()
