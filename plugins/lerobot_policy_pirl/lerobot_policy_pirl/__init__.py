"""Registers lerobot-pirl's LeRobot plugins (the ``flow_mlp`` policy, the ``metaworld_state`` env).

LeRobot's CLIs import every installed distribution whose name starts with ``lerobot_policy_``; this one only
imports ``lerobot_pirl``, which registers them.
"""

import lerobot_pirl  # noqa: F401
