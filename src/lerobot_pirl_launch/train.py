"""The console entry point of `lerobot-pirl-train`: starts the env-worker forkserver before the
trainer's imports, then runs the CLI.

torch, LeRobot and MetaWorld take ~15 s to import on a 2-core machine, in this process and again in the
forkserver the env workers fork from. Started first, the forkserver imports them on the other core at
the same time (issue 13: ~20 s of the main job's start-up). Only the standard library is imported
before that; what the command line leaves undecided (a `--config_path`, LIBERO's first-use setup, one
core) is left to the trainer, which starts the forkserver itself when it has not been started here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lerobot_pirl_launch.forkserver import ENV_PRELOAD, start_forkserver

DEFAULT_ENV_TYPE = "metaworld_state"  # TrainConfig's default env (checked by a test)
# Env types whose forkserver may start before the config is parsed (LIBERO first runs a set-up step).
EARLY_ENV_TYPES = ("metaworld_state", "metaworld")


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` as `flag=value` or `flag value`."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def early_worker_env_type(argv: Sequence[str], cores: int) -> str | None:
    """The env type whose env workers the command line will certainly use, or None when unsure."""
    if cores < 2 or any(arg in ("-h", "--help") for arg in argv):
        return None
    if flag_value(argv, "--rollout.use_async_envs") in ("true", "True", "1"):
        return None
    if all(flag_value(argv, f"--{section}.num_workers") == "0" for section in ("rollout", "eval")):
        return None
    env_type = flag_value(argv, "--env.type")
    if env_type is None:
        if flag_value(argv, "--config_path") is not None:
            return None  # the file may name another env
        env_type = DEFAULT_ENV_TYPE
    return env_type if env_type in EARLY_ENV_TYPES else None


def train() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env_type = early_worker_env_type(sys.argv[1:], cores)
    if env_type is not None:
        start_forkserver(ENV_PRELOAD[env_type])
    from lerobot_pirl.scripts.train import cli

    cli()
