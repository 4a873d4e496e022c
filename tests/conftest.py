import os

import pytest
import torch

# Two cores shared by two xdist workers: intra-op threads only oversubscribe them (10x slower here).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _env_worker_forkserver():
    """One forkserver per test process with the env and runtime modules imported, started before any
    test forks from it (env workers, learner/actor processes), so every forked process starts in
    seconds instead of re-importing torch, LeRobot and MetaWorld."""
    from lerobot_pirl.testing.processes import PRELOAD
    from lerobot_pirl_launch.forkserver import start_forkserver

    start_forkserver(["lerobot_pirl.envs.metaworld_state", *PRELOAD])
