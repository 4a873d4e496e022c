"""lerobot-pirl: online RL fine-tuning of LeRobot flow-matching policies (πRL, arXiv 2510.25889).

Importing the package registers its LeRobot plugins (the ``flow_mlp`` policy type and the env
configs), so ``--policy.discover_packages_path=lerobot_pirl`` works with LeRobot's own CLIs.
"""

__version__ = "0.1.0"
