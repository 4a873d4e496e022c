"""lerobot-pirl: online RL fine-tuning of LeRobot flow-matching policies (πRL, arXiv 2510.25889).

Importing the package registers its LeRobot plugins, the ``flow_mlp`` policy type and the
``metaworld_state`` env type, so that ``PreTrainedConfig.from_pretrained`` knows them. LeRobot's CLIs import
it themselves through the ``lerobot_policy_pirl`` distribution it installs, which LeRobot's plugin discovery
finds by its name.
"""

import os

# MuJoCo picks its GL backend at first import; headless machines need EGL for offscreen images.
os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"

from lerobot_pirl import envs, policies  # noqa: E402  (registers the plugin types)

__all__ = ["envs", "policies"]
