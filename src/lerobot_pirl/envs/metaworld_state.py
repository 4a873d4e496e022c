"""MetaWorld v3 with its full state vector, as a LeRobot env plugin: ``--env.type=metaworld_state``.

LeRobot's own ``--env.type=metaworld`` exposes only 480×480 pixels and the 4-d hand position (its
``obs_type="state"`` raises NotImplementedError). State-based policies (``flow_mlp``) and fast RL need
MetaWorld's 39-d observation, which holds the object and goal positions, and optionally a small camera
image rendered with cheap settings (no shadows or reflections), far faster than MetaWorld's defaults.

Observation of one sub-env (keys chosen so that ``lerobot.envs.utils.preprocess_observation`` maps them):
    agent_pos          (4,)      float32  hand xyz + gripper opening           -> observation.state
    environment_state  (39,)     float32  MetaWorld's goal-observable state   -> observation.environment_state
                                          [0:3] hand xyz, [3] gripper opening, [4:18] object(s) pos+quat
                                          (zero padded), [18:36] the same 18 values one step earlier,
                                          [36:39] goal xyz
    pixels             (S, S, 3) uint8    camera image, only when image_size S > 0 -> observation.image
Action: (4,) float32 in [-1, 1]: hand xyz displacement, gripper effort.

Seeding (measured on all 50 v3 tasks, see tests/envs/test_metaworld_state.py):
    ``reset(seed=s)`` reseeds the generator MetaWorld draws object and goal positions from, so the initial
    state is bit-identical for the same seed, whatever the env did before, in a fresh or a used env, and
    so are whole trajectories under the same actions (MuJoCo is deterministic on one machine). It also
    gives the same object/goal positions as LeRobot's ``metaworld`` env for the same seed.
    ``reset()`` without a seed continues that generator, so a vector env's autoresets after
    ``reset(seed=s)`` are reproducible too. What MetaWorld itself does NOT do, and why this wrapper
    exists: its ``reset(seed=...)`` ignores the seed (only its ``seed()`` method seeds), and unless
    ``seeded_rand_vec`` is set it draws positions from the global ``np.random``, or, with MetaWorld's
    default frozen task vector, never changes them at all.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

# MuJoCo picks its OpenGL backend when it is first imported; EGL renders headless (no X server).
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.envs.metaworld import TASK_DESCRIPTIONS
from lerobot.envs.utils import freeze_after_episode_end
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, MT10_V3, MT50_V3

ENV_STATE_DIM = 39
AGENT_POS_DIM = 4
ACTION_DIM = 4
# Every MetaWorld task raises if stepped past this many steps without a reset.
METAWORLD_MAX_PATH_LENGTH = 500
DEFAULT_EPISODE_LENGTH = 200  # room for the scripted experts' 50-150 steps, and 2.5x faster failures
# MetaWorld runs MuJoCo at 0.0025 s with frame_skip 5: 80 control steps per second.
METAWORLD_FPS = 80
# MetaWorld's models declare a 640×480 offscreen framebuffer; a square image can be at most 480 px.
MAX_IMAGE_SIZE = 480
# LeRobot's metaworld env moves this camera to see the whole table (its datasets were recorded so).
CORNER2_CAMERA_POSITION = (0.75, 0.075, 0.7)

METAWORLD_TASKS: tuple[str, ...] = tuple(MT50_V3.keys())
# MetaWorld's own multi-task benchmarks, in MetaWorld's order: `--env.task=MT10` / `MT50`.
METAWORLD_SUITES: dict[str, tuple[str, ...]] = {"MT10": tuple(MT10_V3.keys()), "MT50": METAWORLD_TASKS}
# A sub-env of a suite keeps at most this many task simulators (about 22 MB each) and rebuilds the others
# (about 65 ms) when an episode needs them: MT10 stays whole, MT50 costs 0.2 GB instead of 1.1 GB per env.
MAX_CACHED_TASKS = 10


def resolve_metaworld_task(task: str) -> str:
    """Return the MetaWorld v3 task name for ``task`` ("push-v3" or LeRobot's "metaworld-push-v3").

    Raises ValueError naming the closest valid tasks when ``task`` is not one of the 50 v3 tasks.
    """
    name = task.strip().removeprefix("metaworld-")
    if name in METAWORLD_TASKS:
        return name
    close = difflib.get_close_matches(name, METAWORLD_TASKS, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"Unknown MetaWorld task {task!r}.{hint} Valid tasks are the 50 v3 tasks: {list(METAWORLD_TASKS)}"
    )


def resolve_metaworld_tasks(spec: str) -> tuple[str, ...]:
    """The v3 task names of ``--env.task``: one task, a suite ("MT10", "MT50") or a comma-separated list.

    Raises ValueError naming the offending task: an unknown name, one named twice, or no task at all.
    """
    name = str(spec).strip()
    if name.upper() in METAWORLD_SUITES:
        return METAWORLD_SUITES[name.upper()]
    names = [part.strip() for part in name.split(",")]
    if not any(names):
        raise ValueError(f"--env.task={spec!r} names no MetaWorld task (give a task, MT10, MT50 or a list)")
    if "" in names:
        raise ValueError(f"--env.task={spec!r} has an empty entry in its comma-separated list")
    tasks = tuple(resolve_metaworld_task(part) for part in names)
    repeated = sorted({task for task in tasks if tasks.count(task) > 1})
    if repeated:
        raise ValueError(f"--env.task={spec!r} names {repeated[0]} more than once")
    return tasks


def suite_task_of_seed(seed: int, num_tasks: int) -> int:
    """The task a suite sub-env plays for an episode reset with `seed`: consecutive seeds (the collector
    hands them out so) cycle through the tasks, so every task gets an equal share of episodes, within
    one, over any run of seeds, and members of a GRPO group (one seed) share their task."""
    return int(seed) % num_tasks


def metaworld_task_description(task: str) -> str:
    """The natural-language instruction LeRobot's MetaWorld datasets and env use for ``task``."""
    name = resolve_metaworld_task(task)
    return TASK_DESCRIPTIONS.get(name, name.removesuffix("-v3").replace("-", " "))


class MetaWorldStateEnv(gym.Env):
    """One MetaWorld v3 task with the full 39-d state, the 4-d agent position and an optional image.

    The episode terminates at the first success when ``terminate_on_success`` (LeRobot's metaworld env
    does the same), and is truncated after ``episode_length`` steps. The reward is MetaWorld's dense
    reward (0..10); sparse rewards are the collector's business.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": METAWORLD_FPS}

    def __init__(
        self,
        task: str = "push-v3",
        episode_length: int = METAWORLD_MAX_PATH_LENGTH,
        image_size: int = 0,
        camera_name: str = "corner2",
        fast_render: bool = True,
        terminate_on_success: bool = True,
        render_size: int = 256,
    ):
        super().__init__()
        self.task = resolve_metaworld_task(task)
        self.task_description = metaworld_task_description(self.task)
        if not 1 <= episode_length <= METAWORLD_MAX_PATH_LENGTH:
            raise ValueError(
                f"episode_length must be in [1, {METAWORLD_MAX_PATH_LENGTH}], got {episode_length}"
            )
        self._max_episode_steps = episode_length
        self.image_size = image_size
        self.camera_name = camera_name
        self.fast_render = fast_render
        self.terminate_on_success = terminate_on_success
        self.render_size = render_size
        self.render_mode = "rgb_array"

        # The goal-observable class is MetaWorld's MT setting (goal xyz in the state) without building
        # MT1's 50 task vectors (0.05 s instead of 0.9 s per env).
        self._sim = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task}-goal-observable"]()
        # Draw new object/goal positions at every reset, from the generator `seed()` controls.
        self._sim._freeze_rand_vec = False
        self._sim.seeded_rand_vec = True
        if camera_name not in {self._sim.model.camera(i).name for i in range(self._sim.model.ncam)}:
            raise ValueError(f"MetaWorld has no camera {camera_name!r}")
        if camera_name == "corner2":
            self._sim.model.cam_pos[self._sim.model.camera("corner2").id] = CORNER2_CAMERA_POSITION
        self._renderers: dict[int, mujoco.Renderer] = {}  # made on first use, inside the worker process
        self._elapsed_steps = 0

        observation_spaces = {
            "agent_pos": spaces.Box(-np.inf, np.inf, shape=(AGENT_POS_DIM,), dtype=np.float32),
            "environment_state": spaces.Box(-np.inf, np.inf, shape=(ENV_STATE_DIM,), dtype=np.float32),
        }
        if image_size > 0:
            observation_spaces["pixels"] = spaces.Box(
                0, 255, shape=(image_size, image_size, 3), dtype=np.uint8
            )
        self.observation_space = spaces.Dict(observation_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # MetaWorld's own reset ignores its seed argument; only seed() reseeds its generator.
            self._sim.seed(seed)
        state, _ = self._sim.reset()
        self._elapsed_steps = 0
        return self._observation(state), {"is_success": False, "task": self.task}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"Expected one action of shape ({ACTION_DIM},), got {action.shape}")
        state, reward, _, _, sim_info = self._sim.step(np.clip(action, -1.0, 1.0))
        self._elapsed_steps += 1
        is_success = bool(sim_info["success"])
        terminated = is_success and self.terminate_on_success
        truncated = self._elapsed_steps >= self._max_episode_steps and not terminated
        info = {**sim_info, "is_success": is_success, "task": self.task}
        return self._observation(state), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray:
        """The camera image at ``render_size`` (for videos), H×W×3 uint8."""
        return self._render_camera(self.render_size)

    def close(self):
        _close_renderers(self._renderers)
        self._sim.close()

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        environment_state = state.astype(np.float32)  # (39,)
        observation = {
            "agent_pos": environment_state[:AGENT_POS_DIM].copy(),
            "environment_state": environment_state,
        }
        if self.image_size > 0:
            observation["pixels"] = self._render_camera(self.image_size)  # (S, S, 3) uint8
        return observation

    def _render_camera(self, size: int) -> np.ndarray:
        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = self._renderers[size] = self._make_renderer(size)
        renderer.update_scene(self._sim.data, camera=self.camera_name)
        image = renderer.render()  # (size, size, 3) uint8
        if self.camera_name == "corner2":
            # This camera is mounted upside down; LeRobot flips its images the same way.
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def _make_renderer(self, size: int) -> mujoco.Renderer:
        if not 1 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"Image size must be in [1, {MAX_IMAGE_SIZE}], got {size}")
        _require_headless_gl()
        if self.fast_render:
            # Multisample anti-aliasing is fixed when the GL context is made, so it must be off before.
            self._sim.model.vis.quality.offsamples = 0
        renderer = mujoco.Renderer(self._sim.model, height=size, width=size)
        if not self._renderers:
            # If close() is never called, free the GL contexts at exit while EGL is still up: MuJoCo
            # terminates EGL in an atexit hook, and hooks run last-registered first.
            atexit.register(_close_renderers_of, weakref.ref(self))
        if self.fast_render:
            # Shadows and reflections cost most of the render time at small sizes.
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return renderer


class MetaWorldSuiteEnv(gym.Env):
    """One sub-env of a multi-task run: each episode plays the task its reset seed picks
    (``suite_task_of_seed``), in that task's own ``MetaWorldStateEnv``; ``reset()`` without a seed goes on
    with the current task. ``task`` and ``task_description`` name the current episode's task.
    """

    metadata = MetaWorldStateEnv.metadata

    def __init__(self, tasks: tuple[str, ...], max_cached_tasks: int = MAX_CACHED_TASKS, **env_kwargs):
        super().__init__()
        self.tasks = tuple(resolve_metaworld_task(task) for task in tasks)
        if not self.tasks:
            raise ValueError("a MetaWorld suite env needs at least one task")
        self.task_descriptions = tuple(metaworld_task_description(task) for task in self.tasks)
        self._env_kwargs = env_kwargs
        self._max_cached_tasks = max(1, max_cached_tasks)
        self._envs: dict[str, MetaWorldStateEnv] = {}  # least recently used first
        self._current = self._env_of(self.tasks[0])
        self.observation_space = self._current.observation_space
        self.action_space = self._current.action_space
        self._max_episode_steps = self._current._max_episode_steps
        self.render_mode = "rgb_array"

    @property
    def task(self) -> str:
        return self._current.task

    @property
    def task_description(self) -> str:
        return self._current.task_description

    def _env_of(self, task: str) -> MetaWorldStateEnv:
        env = self._envs.pop(task, None)
        if env is None:
            if len(self._envs) >= self._max_cached_tasks:
                oldest = next(iter(self._envs))
                self._envs.pop(oldest).close()
            env = MetaWorldStateEnv(task=task, **self._env_kwargs)
        self._envs[task] = env
        return env

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._current = self._env_of(self.tasks[suite_task_of_seed(seed, len(self.tasks))])
        return self._current.reset(seed=seed, options=options)

    def step(self, action: np.ndarray):
        return self._current.step(action)

    def render(self) -> np.ndarray:
        return self._current.render()

    def close(self):
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def _require_headless_gl() -> None:
    """Fail clearly when MuJoCo picked an on-screen GL backend with no display to open it on."""
    backend = getattr(mujoco, "GLContext", None)
    if backend is not None and backend.__module__ == "mujoco.glfw" and not os.environ.get("DISPLAY"):
        raise RuntimeError(
            "MuJoCo was imported before MUJOCO_GL was set, so it chose GLFW, which needs a display. "
            "Set MUJOCO_GL=egl in the environment, or import lerobot_pirl before mujoco/metaworld."
        )


def _close_renderers(renderers: dict[int, mujoco.Renderer]) -> None:
    for renderer in renderers.values():
        renderer.close()
    renderers.clear()


def _close_renderers_of(env_ref: weakref.ref[MetaWorldStateEnv]) -> None:
    env = env_ref()
    if env is not None:
        _close_renderers(env._renderers)


@EnvConfig.register_subclass("metaworld_state")
@dataclass
class MetaWorldStateEnvConfig(EnvConfig):
    """``--env.type=metaworld_state --env.task=push-v3 [--env.image_size=64]``; ``--env.task=MT10``, ``MT50``
    or ``push-v3,reach-v3`` trains one policy over several tasks."""

    # A v3 task name (LeRobot's "metaworld-push-v3" spelling too), MT10, MT50, or a comma-separated list.
    task: str = "push-v3"
    fps: int = METAWORLD_FPS
    # Steps per episode, the same however the env is named (the main job's too). The scripted experts
    # need ~50-150; MetaWorld and LeRobot's metaworld env allow 500 (--env.episode_length=500).
    episode_length: int = DEFAULT_EPISODE_LENGTH
    # Camera image side in pixels; 0 = state only (no rendering at all).
    image_size: int = 0
    camera_name: str = "corner2"
    # Shadows, reflections and anti-aliasing off: much faster offscreen rendering.
    fast_render: bool = True
    terminate_on_success: bool = True
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(AGENT_POS_DIM,)),
            "environment_state": PolicyFeature(type=FeatureType.ENV, shape=(ENV_STATE_DIM,)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {
            ACTION: ACTION,
            "agent_pos": OBS_STATE,
            "environment_state": OBS_ENV_STATE,
            "pixels": OBS_IMAGE,
        }
    )

    def __post_init__(self):
        # Fail on a bad name now, before any simulator or worker process is started.
        tasks = resolve_metaworld_tasks(self.task)
        if len(tasks) == 1 or "," in str(self.task):
            self.task = ",".join(tasks)  # a suite keeps its name (MT10), a list its canonical spelling
        else:
            self.task = str(self.task).strip().upper()
        if not 1 <= self.episode_length <= METAWORLD_MAX_PATH_LENGTH:
            raise ValueError(
                f"episode_length must be in [1, {METAWORLD_MAX_PATH_LENGTH}], got {self.episode_length}"
            )
        if not 0 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be in [0, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if self.image_size > 0:
            self.features["pixels"] = PolicyFeature(
                type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)
            )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The v3 tasks this config selects, in order."""
        return resolve_metaworld_tasks(self.task)

    @property
    def gym_kwargs(self) -> dict:
        """The keyword arguments of one sub-env (a multi-task config's: of its first task's)."""
        return {"task": self.tasks[0], **self._env_kwargs}

    @property
    def _env_kwargs(self) -> dict:
        return {
            "episode_length": self.episode_length,
            "image_size": self.image_size,
            "camera_name": self.camera_name,
            "fast_render": self.fast_render,
            "terminate_on_success": self.terminate_on_success,
        }

    def create_envs(
        self, n_envs: int, use_async_envs: bool = False, env_cls=None, mixed_tasks: bool = False
    ) -> dict[str, dict[int, gym.vector.VectorEnv]]:
        """LeRobot's `{type: {task_index: vector_env}}`, one vector env of `n_envs` per task (what
        `lerobot-eval` reports per task); `mixed_tasks`: one vector env `{type: {0: ...}}` whose sub-envs
        each play every task, one per episode (``MetaWorldSuiteEnv``): how a multi-task run trains.
        `env_cls` (a callable over the n_envs factories, as in LeRobot's own env builders) replaces the
        Sync/Async choice, e.g. by env workers."""
        if n_envs < 1:
            raise ValueError(f"n_envs must be at least 1, got {n_envs}")
        tasks = self.tasks
        if mixed_tasks and len(tasks) > 1:
            make_one = functools.partial(MetaWorldSuiteEnv, tasks, **self._env_kwargs)
            return {self.type: {0: self._vector_env(make_one, n_envs, use_async_envs, env_cls)}}
        return {
            self.type: {
                index: self._vector_env(
                    functools.partial(MetaWorldStateEnv, task=task, **self._env_kwargs),
                    n_envs,
                    use_async_envs,
                    env_cls,
                )
                for index, task in enumerate(tasks)
            }
        }

    @staticmethod
    def _vector_env(make_one, n_envs: int, use_async_envs: bool, env_cls) -> gym.vector.VectorEnv:
        # Sub-envs freeze at the end of an episode until an explicit new rollout (LeRobot's wrapper): the
        # chunk collector relies on it to never run stale chunk actions in a fresh episode.
        env_fns = [freeze_after_episode_end(make_one) for _ in range(n_envs)]
        autoreset_mode = gym.vector.AutoresetMode.SAME_STEP
        if env_cls is not None:
            vector_env = env_cls(env_fns)
        elif use_async_envs and n_envs > 1:
            # forkserver: workers start clean, without the parent's MuJoCo/GL state (as LeRobot does).
            vector_env = gym.vector.AsyncVectorEnv(
                env_fns, context="forkserver", autoreset_mode=autoreset_mode
            )
        else:
            vector_env = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=autoreset_mode)
        return vector_env
