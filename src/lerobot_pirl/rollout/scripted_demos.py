"""Scripted-expert demonstrations for MetaWorld, recorded as a local LeRobotDataset (for SFT baselines).

MetaWorld ships a hand-written controller per task (``metaworld.policies.Sawyer*V3Policy``) that reads the
39-d state. We run it in ``MetaWorldStateEnv``, optionally with Gaussian action noise for imperfect
demos, and record every step with LeRobot's own dataset writer.

Features of one frame (S = image_size):
    observation.state              (4,)      float32  hand xyz + gripper opening
    observation.environment_state  (39,)     float32  MetaWorld's full state (see envs/metaworld_state.py)
    observation.image              (S, S, 3) uint8    only when image_size > 0
    action                         (4,)      float32  the action sent to the env, noise included, in [-1, 1]
    next.reward                    (1,)      float32  MetaWorld's dense reward after the action
    next.success                   (1,)      bool     task solved after the action
    next.done                      (1,)      bool     last frame of the episode
    episode_seed                   (1,)      int64    ``env.reset(seed=episode_seed)`` + the actions replay it
    task                           str                the task instruction, e.g. "Push the puck to a goal"
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE

from lerobot_pirl.envs.metaworld_state import (
    ACTION_DIM,
    AGENT_POS_DIM,
    ENV_STATE_DIM,
    METAWORLD_FPS,
    METAWORLD_MAX_PATH_LENGTH,
    MetaWorldStateEnv,
    resolve_metaworld_task,
)
from lerobot_pirl.progress import progress_bar

if TYPE_CHECKING:
    from metaworld.policies.policy import Policy

logger = logging.getLogger(__name__)


def metaworld_expert(task: str) -> Policy:
    """MetaWorld's scripted controller for ``task`` (stateless: ``get_action(state_39d) -> (4,)``)."""
    # Imported here, after lerobot_pirl.envs has set MUJOCO_GL, because metaworld imports mujoco.
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[resolve_metaworld_task(task)]()


def expert_action(
    expert: Policy, environment_state: np.ndarray, action_noise: float, rng: np.random.Generator
) -> np.ndarray:
    """The expert's action for one (39,) state, clipped to [-1, 1], plus N(0, action_noise²) noise."""
    action = np.clip(expert.get_action(environment_state), -1.0, 1.0).astype(np.float32)  # (4,)
    if action_noise > 0:
        action = np.clip(action + action_noise * rng.standard_normal(ACTION_DIM), -1.0, 1.0).astype(
            np.float32
        )
    return action


def demo_dataset_features(image_size: int, use_videos: bool) -> dict[str, dict]:
    """The LeRobotDataset feature spec of ``record_metaworld_demos``."""
    features = {
        OBS_STATE: {"dtype": "float32", "shape": (AGENT_POS_DIM,), "names": None},
        OBS_ENV_STATE: {"dtype": "float32", "shape": (ENV_STATE_DIM,), "names": None},
        ACTION: {"dtype": "float32", "shape": (ACTION_DIM,), "names": None},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
        "episode_seed": {"dtype": "int64", "shape": (1,), "names": None},
    }
    if image_size > 0:
        features[OBS_IMAGE] = {
            "dtype": "video" if use_videos else "image",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channel"],
        }
    return features


def record_metaworld_demos(
    task: str,
    num_episodes: int,
    root: Path,
    *,
    action_noise: float = 0.0,
    seed: int = 0,
    image_size: int = 0,
    repo_id: str = "local/metaworld_expert_demos",
    keep_failed: bool = False,
    steps_after_success: int = 10,
    episode_length: int = METAWORLD_MAX_PATH_LENGTH,
    max_attempts: int | None = None,
    use_videos: bool = False,
    fast_render: bool = True,
) -> LeRobotDataset:
    """Record ``num_episodes`` scripted-expert episodes of ``task`` into a new local dataset at ``root``.

    Attempt k starts from ``reset(seed=seed + k)`` and draws its action noise from a generator seeded
    with the same number, so every episode is reproducible from its ``episode_seed`` alone.

    An episode ends ``steps_after_success`` steps after the first success (so the data also shows the
    robot holding the goal, not only reaching it) or after ``episode_length`` steps. By default only
    successful episodes are kept (``keep_failed=False``): SFT data should show the task being solved.
    Attempts stop after ``max_attempts`` (default ``2 * num_episodes + 10``); if fewer episodes were kept
    a warning says so, and none kept is an error.

    ``root`` must not exist yet (LeRobot refuses to overwrite). Images are stored as PNG frames
    (``use_videos=False``, no encoder needed) unless ``use_videos`` is set. Works offline.
    Returns the dataset re-opened read-only from ``root``.
    """
    task = resolve_metaworld_task(task)
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be at least 1, got {num_episodes}")
    if action_noise < 0:
        raise ValueError(f"action_noise is a standard deviation, got {action_noise}")
    max_attempts = 2 * num_episodes + 10 if max_attempts is None else max_attempts
    root = Path(root)

    env = MetaWorldStateEnv(
        task,
        episode_length=episode_length,
        image_size=image_size,
        fast_render=fast_render,
        terminate_on_success=False,  # we keep recording a few steps after the first success
    )
    expert = metaworld_expert(task)
    dataset = LeRobotDataset.create(
        repo_id=repo_id,
        fps=METAWORLD_FPS,
        features=demo_dataset_features(image_size, use_videos),
        root=root,
        robot_type="sawyer",
        use_videos=use_videos,
    )

    kept = attempts = successes = 0
    progress = progress_bar(total=num_episodes, desc=f"{task} expert demos", unit="episode")
    try:
        # MetaWorld's controllers warn whenever their gain saturates; we clip on purpose.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            while kept < num_episodes and attempts < max_attempts:
                episode_seed = seed + attempts
                attempts += 1
                succeeded = _record_one_episode(
                    dataset, env, expert, episode_seed, action_noise, steps_after_success
                )
                successes += succeeded
                if succeeded or keep_failed:
                    dataset.save_episode()
                    kept += 1
                    progress.update(1)
                else:
                    dataset.clear_episode_buffer()
                progress.set_postfix(attempts=attempts, success_rate=f"{successes / attempts:.2f}")
    finally:
        progress.close()
        dataset.finalize()
        env.close()

    if kept == 0:
        raise RuntimeError(
            f"The {task} expert succeeded in none of {attempts} attempts (action_noise={action_noise})"
        )
    if kept < num_episodes:
        warnings.warn(
            f"Kept {kept} of the {num_episodes} requested {task} episodes: the expert succeeded in "
            f"{successes} of {attempts} attempts (action_noise={action_noise})",
            stacklevel=2,
        )
    logger.info("%s: kept %d episodes, expert success %d/%d", task, kept, successes, attempts)
    return LeRobotDataset(repo_id, root=root)


def _record_one_episode(
    dataset: LeRobotDataset,
    env: MetaWorldStateEnv,
    expert: Policy,
    episode_seed: int,
    action_noise: float,
    steps_after_success: int,
) -> bool:
    """Run one expert episode, adding its frames to the dataset's buffer; returns whether it succeeded."""
    rng = np.random.default_rng(episode_seed)
    observation, _ = env.reset(seed=episode_seed)
    first_success_step: int | None = None
    for step in range(env._max_episode_steps):
        action = expert_action(expert, observation["environment_state"], action_noise, rng)  # (4,)
        next_observation, reward, _, truncated, info = env.step(action)
        if info["is_success"] and first_success_step is None:
            first_success_step = step
        done = truncated or (
            first_success_step is not None and step >= first_success_step + steps_after_success
        )
        frame = {
            OBS_STATE: observation["agent_pos"],
            OBS_ENV_STATE: observation["environment_state"],
            ACTION: action,
            "next.reward": np.array([reward], dtype=np.float32),
            "next.success": np.array([info["is_success"]], dtype=bool),
            "next.done": np.array([done], dtype=bool),
            "episode_seed": np.array([episode_seed], dtype=np.int64),
            "task": env.task_description,
        }
        if "pixels" in observation:
            frame[OBS_IMAGE] = observation["pixels"]
        dataset.add_frame(frame)
        observation = next_observation
        if done:
            break
    return first_success_step is not None
