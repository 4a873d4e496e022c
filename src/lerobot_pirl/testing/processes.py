"""Child processes for tests and benchmarks of the distributed runtime, started cheaply.

Importing torch + LeRobot + MetaWorld takes 10-20 s on a small CI machine. A forkserver that imports
them once forks every learner / actor / DDP rank ready to run, so a test can start (and SIGKILL) a
handful of processes in seconds. Only strings (command lines, paths) cross the process boundary.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from pathlib import Path

PRELOAD = [
    "torch",
    "lerobot_pirl.distributed.learner",
    "lerobot_pirl.distributed.actor",
    "lerobot_pirl.scripts.learner",
    "lerobot_pirl.scripts.actor",
    "lerobot_pirl.scripts.train",
]
PROGRAMS = {
    "lerobot-pirl-train": "lerobot_pirl.scripts.train",
    "lerobot-pirl-learner": "lerobot_pirl.scripts.learner",
    "lerobot-pirl-actor": "lerobot_pirl.scripts.actor",
}


def forkserver_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redirect_output(log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _run_cli(program: str, argv: list[str], log_path: str, environment: dict[str, str]) -> None:
    """Child: run a console script's `cli()` with `argv`, output appended to `log_path`."""
    import importlib

    import torch

    _redirect_output(log_path)
    os.environ.update(environment)
    torch.set_num_threads(1)
    sys.argv = [program, *argv]
    importlib.import_module(PROGRAMS[program]).cli()


def start_cli(
    program: str, argv: list[str], log_path: Path, environment: dict[str, str] | None = None
) -> multiprocessing.Process:
    """Start `program` (lerobot-pirl-train / -learner / -actor) with `argv` in a forked, preloaded child."""
    process = forkserver_context().Process(
        target=_run_cli, args=(program, list(argv), str(log_path), dict(environment or {})), daemon=False
    )
    process.start()
    return process
