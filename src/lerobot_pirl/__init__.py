"""lerobot-pirl: online RL fine-tuning of LeRobot flow-matching policies (πRL, arXiv 2510.25889).

LeRobot's CLIs load the package's plugins (the ``flow_mlp`` policy type, the ``metaworld_state`` env)
with ``--discover_packages_path=lerobot_pirl``; our own CLIs register them themselves.
"""

import os

# MuJoCo picks its GL backend at first import; headless machines need EGL for offscreen images.
os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
