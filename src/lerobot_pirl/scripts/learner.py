"""`lerobot-pirl-learner`: the learner of a distributed πRL run (see runtime/learner.py).

    lerobot-pirl-learner --policy.path=<sft> --env.type=metaworld_state --env.task=push-v3 \\
        --transport.num_actors=2 --output_dir=outputs/push
    torchrun --nproc_per_node=2 -m lerobot_pirl.scripts.learner ...   # DDP over 2 GPUs

Takes every `lerobot-pirl-train` flag plus `--transport.*` (runtime/distributed_config.py).
No `from __future__ import annotations` here: LeRobot's parser reads the config class from the
annotation of `main`, which must stay a real type.
"""

import logging
import os
import sys

from lerobot.configs import parser

from lerobot_pirl.runtime.distributed_config import DistributedTrainConfig
from lerobot_pirl.scripts._cli import run


def learn(cfg: DistributedTrainConfig):
    """Build and run the learner; returns its TrainResult. Raises ConfigError on bad input."""
    from lerobot_pirl.runtime.learner import Learner

    cfg.validate()
    return Learner(cfg).run()


@parser.wrap()
def main(cfg: DistributedTrainConfig) -> int:
    from lerobot_pirl.runtime.config import ConfigError

    rank = os.environ.get("RANK")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(levelname)s %(asctime)s learner{'[' + rank + ']' if rank else ''} %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # an imported library may have configured the root logger already
    )
    try:
        result = learn(cfg)
    except ConfigError as error:
        print(f"lerobot-pirl-learner: error: {error}", file=sys.stderr)
        return 2
    if result.checkpoint_dir is not None:
        print(result.summary())
        print(f"checkpoint: {result.checkpoint_dir}")
    if result.stopped_by_error:
        print(f"stopped: {result.stopped_by_error}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    run(main, "lerobot-pirl-learner")


if __name__ == "__main__":
    cli()
