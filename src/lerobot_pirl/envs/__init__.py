"""Env plugins for LeRobot. Importing this package registers ``--env.type=metaworld_state``."""

from lerobot_pirl.envs.metaworld_state import (
    METAWORLD_TASKS,
    MetaWorldStateEnv,
    MetaWorldStateEnvConfig,
    metaworld_task_description,
    resolve_metaworld_task,
)

__all__ = [
    "METAWORLD_TASKS",
    "MetaWorldStateEnv",
    "MetaWorldStateEnvConfig",
    "metaworld_task_description",
    "resolve_metaworld_task",
]
