"""Small gymnasium envs in LeRobot's observation format, for tests and the CPU learning check.

Both expose `agent_pos` (-> `observation.state` through LeRobot's `preprocess_observation`),
`task_description`, `_max_episode_steps`, and `info["is_success"]`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    """A clock with known outcomes, to test collection semantics.

    The observation is (step, seed, 0). Reward 0.1 per step. An episode whose reset seed is a multiple
    of 3 succeeds at step `success_step`; the others run into the time limit `max_steps` (truncation).
    """

    metadata = {"render_modes": []}

    def __init__(self, success_step: int = 5, max_steps: int = 9):
        self.observation_space = gym.spaces.Dict(
            {"agent_pos": gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)}
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.success_step = success_step
        self._max_episode_steps = max_steps
        self.task_description = "count"
        self.task = "count"
        self._step = 0
        self._seed = 0
        self.actions: list[np.ndarray] = []

    def _observation(self):
        return {"agent_pos": np.array([self._step, self._seed, 0.0], dtype=np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step = 0
        self._seed = -1 if seed is None else int(seed)
        return self._observation(), {"is_success": False}

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        self._step += 1
        success = self._seed % 3 == 0 and self._step >= self.success_step
        truncated = self._step >= self._max_episode_steps
        return self._observation(), 0.1, False, truncated, {"is_success": success}


class PointTargetEnv(gym.Env):
    """Continuous bandit: act near a fixed target; reward -||a - target||² per step (dense).

    The observation is a constant 2-d context so the policy's optimum is the target itself. An episode
    is `max_steps` steps (one or a few decisions) and then terminates; it never succeeds.
    """

    metadata = {"render_modes": []}

    def __init__(self, target=(0.5, -0.5), max_steps: int = 4):
        self.target = np.asarray(target, dtype=np.float32)
        self.observation_space = gym.spaces.Dict(
            {"agent_pos": gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)}
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._max_episode_steps = max_steps
        self.task_description = "reach the target"
        self.task = self.task_description
        self._step = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step = 0
        return {"agent_pos": np.array([0.3, -0.2], dtype=np.float32)}, {"is_success": False}

    def step(self, action):
        self._step += 1
        error = float(np.sum((np.asarray(action, dtype=np.float32) - self.target) ** 2))
        observation = {"agent_pos": np.array([0.3, -0.2], dtype=np.float32)}
        return observation, -error, self._step >= self._max_episode_steps, False, {"is_success": False}
