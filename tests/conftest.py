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
