"""One decision's env work: C env steps of a vector env, then the resets due at that chunk boundary.

The same function runs in the trainer's process (`--rollout.num_workers=0`) and inside every env worker
over its shard of the envs (rollout/workers.py), so both paths give identical outcomes for the same
actions and seeds, and a chunk costs one message per worker rather than C round trips.

Shape legend
    C  env steps per decision, n  sub-envs of this vector env (a shard of the N envs), D action dim
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from lerobot.envs.utils import NEW_ROLLOUT_OPTION


@dataclass(frozen=True)
class RewardRules:
    """How step rewards become a decision's reward (see ChunkCollector)."""

    sparse_reward: bool = True
    reward_scale: float = 1.0
    end_on_success: bool = True


@dataclass
class ChunkOutcome:
    """What C env steps did to each of n sub-envs; every array is (n,)."""

    reward: np.ndarray  # float64, summed over the chunk's running steps
    success: np.ndarray  # bool, succeeded during the chunk
    terminated: np.ndarray  # bool, the running episode terminated (or ended at success)
    truncated: np.ndarray  # bool, the running episode hit its time limit
    steps: np.ndarray  # int64, env steps taken while the episode was running
    frames: list[list[np.ndarray]] | None = None  # per rendered sub-env, one (H, W, 3) frame per step run

    @classmethod
    def concatenate(cls, parts: Sequence[ChunkOutcome]) -> ChunkOutcome:
        frames = [f for part in parts for f in (part.frames or [])]
        return cls(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _ARRAY_FIELDS},
            frames=frames if any(p.frames is not None for p in parts) else None,
        )


_ARRAY_FIELDS = ("reward", "success", "terminated", "truncated", "steps")


def step_success(info: dict, num_envs: int) -> np.ndarray:
    """(n,) bool success flags of one vector step, whether the info is flat or in `final_info`."""
    success = np.zeros(num_envs, dtype=bool)
    for source in (info, info.get("final_info", {})):
        if isinstance(source, dict) and "is_success" in source:
            flags = np.asarray(source["is_success"], dtype=bool).reshape(-1)
            present = np.asarray(source.get("_is_success", np.ones(num_envs, dtype=bool)), dtype=bool)
            success |= flags & present
    return success


def render_frames(vec_env: gym.vector.VectorEnv, envs: Sequence[int]) -> list[np.ndarray] | None:
    """RGB frames of the sub-envs `envs`, in that order, or None when the env does not render."""
    if len(envs) == 0:
        return []
    try:
        if isinstance(vec_env, gym.vector.SyncVectorEnv):
            images = [vec_env.envs[i].render() for i in envs]
        else:
            every = list(vec_env.call("render"))
            images = [every[i] for i in envs]
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if any(image is None for image in images):
        return None
    return [np.asarray(image) for image in images]


def reset_envs(
    vec_env: gym.vector.VectorEnv, seeds: Sequence[int | None] | None, mask: np.ndarray | None = None
) -> dict:
    """Start genuinely new episodes in all sub-envs, or in those of `mask` (n,), thawing frozen ones."""
    options: dict = {NEW_ROLLOUT_OPTION: True}
    if mask is not None:
        options["reset_mask"] = mask
    observation, _ = vec_env.reset(seed=None if seeds is None else list(seeds), options=options)
    return observation


def run_chunk(
    vec_env: gym.vector.VectorEnv,
    env_actions: np.ndarray,
    active: np.ndarray,
    succeeded: np.ndarray,
    rules: RewardRules,
    reset_seeds: Sequence[int | None] | None = None,
    render_envs: Sequence[int] = (),
) -> tuple[dict, ChunkOutcome]:
    """Execute the (C, n, D) `env_actions`, then reset the sub-envs that have a seed in `reset_seeds`.

    `active` (n,): the sub-env's episode is running at the chunk start (others replay their frozen last
    transition); `succeeded` (n,): it already succeeded (the sparse reward is paid once, at the first
    success). `render_envs`: the sub-envs whose frames the outcome carries, one per step their episode
    ran. Returns the observation after the chunk (and after the resets) and the outcome.
    """
    num_envs = vec_env.num_envs
    reward = np.zeros(num_envs, dtype=np.float64)
    success = np.zeros(num_envs, dtype=bool)
    terminated = np.zeros(num_envs, dtype=bool)
    truncated = np.zeros(num_envs, dtype=bool)
    steps_taken = np.zeros(num_envs, dtype=np.int64)
    running = active.copy()
    frames: list[list[np.ndarray]] | None = [[] for _ in render_envs] if len(render_envs) else None
    observation = None
    for c in range(env_actions.shape[0]):
        observation, step_reward, step_terminated, step_truncated, info = vec_env.step(env_actions[c])
        if frames is not None:
            # Frames only of the steps an episode ran: a frozen env's would never be shown.
            shown = [i for i, env in enumerate(render_envs) if running[env]]
            images = render_frames(vec_env, [render_envs[i] for i in shown])
            if images is None:
                frames = None  # this env does not render: no videos
            else:
                for i, image in zip(shown, images, strict=True):
                    frames[i].append(image)
        step_succeeded = step_success(info, num_envs) & running
        steps_taken += running
        if rules.sparse_reward:
            reward += (step_succeeded & ~succeeded & ~success).astype(np.float64)
        else:
            reward += np.where(running, rules.reward_scale * np.asarray(step_reward), 0.0)
        success |= step_succeeded
        ends_by_success = step_succeeded & rules.end_on_success
        terminated |= running & (np.asarray(step_terminated, dtype=bool) | ends_by_success)
        truncated |= running & np.asarray(step_truncated, dtype=bool) & ~terminated
        running &= ~(terminated | truncated)
    if reset_seeds is not None and any(seed is not None for seed in reset_seeds):
        mask = np.array([seed is not None for seed in reset_seeds])
        observation = reset_envs(vec_env, list(reset_seeds), mask)
    outcome = ChunkOutcome(reward, success, terminated, truncated, steps_taken, frames)
    return observation, outcome
