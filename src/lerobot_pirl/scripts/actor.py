"""`lerobot-pirl-actor`: one actor of a distributed πRL run (see distributed/actor.py).

    lerobot-pirl-actor --policy.path=<sft> --env.type=metaworld_state --env.task=push-v3 \\
        --transport.host=<learner> --transport.actor_id=0

Takes the learner's training flags (same policy, env, algorithm, rollout, seed) plus `--transport.*`.
Exits 0 when the learner finishes training, 1 when the learner stays unreachable for
`--transport.reconnect_timeout_s`, 2 on a configuration the learner cannot use.
No `from __future__ import annotations` here: LeRobot's parser reads the config class from `main`.
"""

import sys

from lerobot.configs import parser

from lerobot_pirl.distributed.config import DistributedTrainConfig
from lerobot_pirl.scripts._cli import run, setup_logging


def act(cfg: DistributedTrainConfig):
    """Build and run the actor; returns its ActorResult. Raises ConfigError on bad input."""
    from lerobot_pirl.distributed.actor import Actor

    cfg.validate(role="actor")
    return Actor(cfg).run()


@parser.wrap()
def main(cfg: DistributedTrainConfig) -> int:
    from lerobot_pirl.distributed.actor import LearnerLostError
    from lerobot_pirl.distributed.transport import LearnerRefusedError

    setup_logging(f"actor{cfg.transport.actor_id}")
    try:
        result = act(cfg)
    except (LearnerLostError, LearnerRefusedError) as error:
        print(f"lerobot-pirl-actor: {error}", file=sys.stderr)
        return 1
    print(
        f"actor {cfg.transport.actor_id}: {result.versions_uploaded} versions uploaded, "
        f"{result.env_steps} env steps"
    )
    return 0


def cli() -> None:
    run(main, "lerobot-pirl-actor")


if __name__ == "__main__":
    cli()
