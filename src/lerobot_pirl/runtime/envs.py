"""Env construction and per-episode reset preparation for training and evaluation.

The trainer builds every vector env here, so env-specific needs (LIBERO's offline assets, fast
rendering inside workers, init-state group resets) stay out of the trainer loop.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
from lerobot.envs.configs import EnvConfig
from lerobot.envs.factory import make_env

ResetHook = Callable[[gym.vector.VectorEnv, list[int]], None]


def make_rollout_envs(
    env_cfg: EnvConfig, num_envs: int, use_async_envs: bool, *, fast_render: bool = False
) -> dict:
    """LeRobot's {suite: {task_id: vec_env}} for `env_cfg`."""
    if fast_render:
        raise ValueError(f"--rollout.fast_render is not available for --env.type={env_cfg.type}")
    return make_env(env_cfg, n_envs=num_envs, use_async_envs=use_async_envs)


def episode_reset_hook(env_cfg: EnvConfig, group_size: int) -> ResetHook | None:
    """What to do to the sub-envs before an episodic reset whose seeds come in groups of `group_size`
    (GRPO: members of a group must start from the same initial state). None: the seeds are enough."""
    return None
