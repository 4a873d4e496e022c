"""The forkserver env workers fork from, and what it imports (standard library only, so that the CLIs
can start it before their own imports: torch and LeRobot take ~15 s to import on a 2-core machine, and
the forkserver then imports them on the other core at the same time)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# Imported once in the forkserver, before any worker forks from it: what every worker imports, and what
# the CLI's main modules import, because each child re-runs the parent's main script (Python 3.12's
# forkserver never preloads "__main__": it looks for a "main_path" key that the preparation data lacks).
DEFAULT_PRELOAD = (
    "torch",
    "gymnasium",
    "lerobot.envs.utils",
    "lerobot_pirl.rollout.workers",
    "lerobot_pirl.runtime.trainer",
    "lerobot_pirl.distributed.learner",
    "lerobot_pirl.distributed.actor",
    "lerobot_pirl.scripts.train",
    "lerobot_pirl.scripts.learner",
    "lerobot_pirl.scripts.actor",
    "lerobot_pirl.scripts.eval",
)

# The env types env workers step, and the modules that build their envs.
ENV_PRELOAD = {
    "metaworld_state": ("lerobot_pirl.envs.metaworld_state",),
    "metaworld": ("lerobot.envs.metaworld",),
    "libero": ("lerobot_pirl.envs.libero_tools",),
}

_started_with: frozenset[str] | None = None  # the modules of the forkserver this process started


def start_forkserver(preload: Sequence[str]) -> None:
    """Start the forkserver with DEFAULT_PRELOAD and `preload` imported, once per process; returns at
    once (the forkserver imports in the background, the first worker waits for it)."""
    global _started_with
    modules = list(dict.fromkeys([*DEFAULT_PRELOAD, *preload]))
    if _started_with is not None:
        missing = [m for m in modules if m not in _started_with]
        if missing:
            logger.warning("the env-worker forkserver was started without %s; workers import them", missing)
        return
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        logger.warning(
            "env workers fork from a forkserver this process started earlier without their modules; "
            "each worker imports them itself (slower start-up)"
        )
    else:
        mp.get_context("forkserver").set_forkserver_preload(modules)
        forkserver.ensure_running()
    _started_with = frozenset(modules)
