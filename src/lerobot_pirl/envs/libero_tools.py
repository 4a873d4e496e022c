"""LIBERO vector envs for RL: reproducible (group) resets, fast rendering that survives resets,
training defaults.

Everything here builds on LeRobot's own LIBERO env (`lerobot.envs.configs.LiberoEnv` config,
`lerobot.envs.libero.LiberoEnv` gym env, `create_libero_envs`); call
`lerobot_pirl.envs.libero_setup.ensure_libero_ready()` before this module is imported, because
importing `lerobot.envs.libero` imports `libero`.

Facts about LeRobot's env these helpers rely on (lerobot 0.6.1, `lerobot/envs/libero.py`):
- Sub-env `i` is built with `episode_index=i`; its attribute `init_state_id` starts at `i`. Each
  `reset()` loads `_init_states[init_state_id % len(_init_states)]`, then adds `_reset_stride`
  (= n_envs) to `init_state_id`, so by default the sub-envs cycle through disjoint init states.
- `reset(seed=s)` calls LIBERO's `seed(s)`, which is `np.random.seed(s)` (process-global; with
  `seed=None` it reseeds numpy's global generator from entropy, in the main process for sync envs).
- After loading the init state, `reset()` takes `num_steps_wait` (10) no-op steps to let objects
  settle; their outcome depends on the grippers' command state, which a soft reset
  (`hard_reset=False`) keeps from the previous episode: see `forget_gripper_command`.
- `step()` never truncates (`truncated` is always False); `_max_episode_steps` (`episode_length`, else
  280/280/300/520 for Spatial/Object/Goal/Long) is only the bound of `lerobot-eval`'s loop.
- The async vector env LeRobot builds (`_LazyAsyncVectorEnv`) starts its workers on first use, wraps
  each sub-env in `FreezeAfterEpisodeEnd` (a finished sub-env replays its last transition, autoreset
  included, until a reset carrying `options={NEW_ROLLOUT_OPTION: True}`) and offers `call`/`get_attr`
  but no `set_attr`. The sync one does neither.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from lerobot.envs.configs import LiberoEnv as LiberoEnvConfig
from lerobot.envs.libero import LiberoEnv, create_libero_envs, get_task_init_states
from lerobot.envs.utils import NEW_ROLLOUT_OPTION, _LazyAsyncVectorEnv
from libero.libero import benchmark
from robosuite.environments.base import MujocoEnv

# Training defaults on top of LeRobot's LIBERO config. A hard reset rebuilds the MuJoCo model and
# renderer at every episode (6-10 s on CPU); a soft reset restores the init state in ~1 s.
TRAINING_ENV_DEFAULTS: dict[str, Any] = {"hard_reset": False}

# Render features that fast rendering turns off (with offsamples = 0: measured 2.6-2.8x more env
# steps/s on a 2-core CPU, see benchmarks/libero_speed.py). Reflections off changes the look of the
# table: keep the default rendering for pretrained policies.
FAST_RENDER_OFF_FLAGS = (
    mujoco.mjtRndFlag.mjRND_SHADOW,
    mujoco.mjtRndFlag.mjRND_REFLECTION,
    mujoco.mjtRndFlag.mjRND_SKYBOX,
)


def libero_training_config(**overrides: Any) -> LiberoEnvConfig:
    """LeRobot's `LiberoEnv` config with `TRAINING_ENV_DEFAULTS` (soft resets); overrides win."""
    return LiberoEnvConfig(**{**TRAINING_ENV_DEFAULTS, **overrides})


# ---------------------------------------------------------------------------------------------
# Fast rendering
# ---------------------------------------------------------------------------------------------
# robosuite creates the offscreen render context inside `MujocoEnv._reset_internal` when a sim has
# none, i.e. when the env is built and after every hard reset (which rebuilds the sim and drops the
# settings). MuJoCo reads `model.vis.quality.offsamples` only when that context is created, so it must
# be set just before; the scene flags live on the context's scene and are set just after. We wrap
# `MujocoEnv._reset_internal` once per process; the wrapper acts only in a thread inside
# `fast_render_scope()`, so default-render envs in the same process are untouched.
_fast_render_state = threading.local()
_install_lock = threading.Lock()


@contextmanager
def fast_render_scope():
    """Within this block (this thread only), robosuite sims built or reset get fast rendering."""
    _install_fast_render_hook()
    previous = getattr(_fast_render_state, "active", False)
    _fast_render_state.active = True
    try:
        yield
    finally:
        _fast_render_state.active = previous


def _install_fast_render_hook() -> None:
    with _install_lock:
        if getattr(MujocoEnv._reset_internal, "_lerobot_pirl_fast_render", False):
            return
        original_reset_internal = MujocoEnv._reset_internal

        def reset_internal_with_fast_render(self: MujocoEnv) -> None:
            if not getattr(_fast_render_state, "active", False):
                return original_reset_internal(self)
            self.sim.model.vis.quality.offsamples = 0  # before robosuite creates the render context
            original_reset_internal(self)
            render_context = self.sim._render_context_offscreen
            if render_context is not None:  # None when the env renders nothing offscreen
                for flag in FAST_RENDER_OFF_FLAGS:
                    render_context.scn.flags[flag] = 0

        reset_internal_with_fast_render._lerobot_pirl_fast_render = True
        MujocoEnv._reset_internal = reset_internal_with_fast_render


def read_render_settings(env: gym.Env) -> dict[str, int]:
    """Render settings of a LeRobot LIBERO env's live sim (builds the sim if it does not exist yet)."""
    libero_env = env.unwrapped
    if not isinstance(libero_env, LiberoEnv):
        raise TypeError(f"expected LeRobot's LIBERO env, got {type(libero_env).__name__}")
    libero_env._ensure_env()
    sim = libero_env._env.sim
    context = sim._render_context_offscreen
    return {
        "offsamples_model": int(sim.model.vis.quality.offsamples),
        "offsamples_context": int(context.con.offSamples),  # what the framebuffer was built with
        "shadow": int(context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW]),
        "reflection": int(context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION]),
        "skybox": int(context.scn.flags[mujoco.mjtRndFlag.mjRND_SKYBOX]),
    }


def forget_gripper_command(libero_env: LiberoEnv) -> None:
    """Zero the grippers' command state, as a hard reset (which rebuilds the grippers) does.

    robosuite grippers integrate their command (`current_action`, e.g. PandaGripper moves it by 0.01
    per control call) and a soft reset keeps it, so the settle steps of LeRobot's reset start from
    whatever the previous episode left: measured, two soft resets to the same init state and seed gave
    images 11 grey levels apart. With this state zeroed first, soft resets are bit-identical to each
    other and to hard resets.
    """
    if libero_env._env is None:  # not built yet: the fresh grippers start at zero
        return
    for robot in libero_env._env.robots:
        grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
        for gripper in grippers:
            gripper.current_action = np.zeros(gripper.dof)


class LiberoRolloutEnv(gym.Wrapper):
    """LeRobot's LIBERO env with reproducible resets and, optionally, fast rendering.

    - Every reset starts from zeroed gripper command state (`forget_gripper_command`), so the same
      init state and seed give bit-identical observations whatever the sub-env did before.
    - With `fast_render`, every call that can build or rebuild the sim (LeRobot's env builds it lazily
      on first reset/step/render; robosuite rebuilds it on a hard reset) runs inside
      `fast_render_scope()`, in whatever process the env lives in (an async worker included).
    - An episode is truncated after `_max_episode_steps` steps (`--env.episode_length`, else LeRobot's
      per-suite default). LeRobot's env never truncates, its `lerobot-eval` loop just stops there; a
      rollout collector needs the signal to end (and bootstrap) the episode at the same step.
    """

    def __init__(self, env: gym.Env, fast_render: bool = False):
        super().__init__(env)
        if not isinstance(env.unwrapped, LiberoEnv):
            raise TypeError(f"expected LeRobot's LIBERO env, got {type(env.unwrapped).__name__}")
        self.fast_render = fast_render
        self.elapsed_steps = 0

    def _render_scope(self):
        return fast_render_scope() if self.fast_render else nullcontext()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        forget_gripper_command(self.env.unwrapped)
        self.elapsed_steps = 0
        with self._render_scope():
            return self.env.reset(seed=seed, options=options)

    def step(self, action):
        with self._render_scope():
            observation, reward, terminated, truncated, info = self.env.step(action)
        self.elapsed_steps += 1
        out_of_time = self.elapsed_steps >= self.env.unwrapped._max_episode_steps
        return observation, reward, terminated, bool(truncated or (out_of_time and not terminated)), info

    def render(self):
        with self._render_scope():
            return self.env.render()

    def render_settings(self) -> dict[str, int]:
        """Read back through `vector_env.call("render_settings")` to check a worker's renderer."""
        with self._render_scope():
            return read_render_settings(self.env)


def make_libero_rollout_env(env_fn: Callable[[], gym.Env], fast_render: bool) -> LiberoRolloutEnv:
    """Env factory step that runs where the env is built (module-level so async workers can load it)."""
    return LiberoRolloutEnv(env_fn(), fast_render=fast_render)


# ---------------------------------------------------------------------------------------------
# Vector envs
# ---------------------------------------------------------------------------------------------
class _LiberoVectorEnvBuilder:
    """`env_cls` for `create_libero_envs`: LeRobot's own vector-env choice over `LiberoRolloutEnv`s.

    Mirrors `LiberoEnv.create_envs` (lerobot/envs/configs.py): async (LeRobot's lazy AsyncVectorEnv)
    only when asked for and n_envs > 1, else SyncVectorEnv with NEXT_STEP autoreset.
    """

    def __init__(self, use_async_envs: bool, fast_render: bool, worker_env_cls=None):
        self.use_async_envs = use_async_envs
        self.fast_render = fast_render
        self.worker_env_cls = worker_env_cls  # env workers (rollout/workers.py) instead of either

    def __call__(self, env_fns: Sequence[Callable[[], gym.Env]]):
        env_fns = [partial(make_libero_rollout_env, env_fn, self.fast_render) for env_fn in env_fns]
        if self.worker_env_cls is not None:
            return self.worker_env_cls(env_fns)
        if self.use_async_envs and len(env_fns) > 1:
            return _LazyAsyncVectorEnv(env_fns)
        return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def libero_vector_env_builder(fast_render: bool = False, worker_env_cls=None):
    """The vector env `make_libero_envs` would build over LeRobot's LIBERO env factories (in-process,
    or stepped by env workers), for factories gathered across tasks."""
    return _LiberoVectorEnvBuilder(False, fast_render, worker_env_cls)


def make_libero_envs(
    env_cfg: LiberoEnvConfig,
    n_envs: int,
    use_async_envs: bool = False,
    *,
    fast_render: bool = False,
    worker_env_cls=None,
    env_cls=None,
) -> dict[str, dict[int, Any]]:
    """LeRobot's LIBERO vector envs, `{suite: {task_id: vector_env}}`, for rollouts.

    The same envs and vector-env types as `env_cfg.create_envs(n_envs, use_async_envs)`, each sub-env
    wrapped in `LiberoRolloutEnv` (reproducible resets; fast rendering when asked). Fast rendering is
    off by default because it changes what pretrained policies see. `env_cls` replaces that vector env
    by what it makes of LeRobot's factories (`list`: the factories themselves, unwrapped).
    """
    if env_cfg.task is None:
        raise ValueError("LiberoEnv requires a task to be specified")
    # The same arguments LiberoEnv.create_envs passes; only env_cls differs.
    return create_libero_envs(
        task=env_cfg.task,
        n_envs=n_envs,
        camera_name=env_cfg.camera_name,
        init_states=env_cfg.init_states,
        gym_kwargs=env_cfg.gym_kwargs,
        env_cls=env_cls or _LiberoVectorEnvBuilder(use_async_envs, fast_render, worker_env_cls),
        control_mode=env_cfg.control_mode,
        episode_length=env_cfg.episode_length,
        camera_name_mapping=env_cfg.camera_name_mapping,
        is_libero_plus=env_cfg.is_libero_plus,
    )


# ---------------------------------------------------------------------------------------------
# Init states and group resets
# ---------------------------------------------------------------------------------------------
def num_init_states(suite_name: str, task_id: int, *, is_libero_plus: bool = False) -> int:
    """Number of init states LeRobot's env cycles through for one task (50 for the standard suites)."""
    suite = benchmark.get_benchmark_dict()[suite_name]()
    return len(get_task_init_states(suite, task_id, is_libero_plus=is_libero_plus))


def cycling_init_state_ids(round_index: int, n_groups: int, n_init_states: int) -> list[int]:
    """Init state per group for one rollout round: disjoint within a round, cycling over rounds.

    For PPO (groups of one) this is LeRobot's own default order: env i, reset r -> i + r * n_envs.
    """
    return [(round_index * n_groups + group) % n_init_states for group in range(n_groups)]


def _vector_env_with_set_attr(vec_env: Any) -> Any:
    if hasattr(vec_env, "set_attr"):
        return vec_env
    if isinstance(vec_env, _LazyAsyncVectorEnv):
        # LeRobot's lazy async wrapper forwards call/get_attr but not set_attr: reach the real one.
        vec_env._ensure()
        return vec_env._env
    raise TypeError(f"{type(vec_env).__name__} offers no set_attr")


def set_init_state_ids(vec_env: Any, init_state_ids: Sequence[int]) -> None:
    """Make the next reset of sub-env i load init state `init_state_ids[i]`."""
    _vector_env_with_set_attr(vec_env).set_attr("init_state_id", [int(i) for i in init_state_ids])


def reset_groups(
    vec_env: Any,
    group_size: int,
    init_state_ids: Sequence[int],
    seeds: Sequence[int],
) -> tuple[Any, dict[str, Any]]:
    """Reset so that each block of `group_size` consecutive sub-envs starts identically (GRPO).

    Group g (sub-envs g*G .. g*G+G-1) gets init state `init_state_ids[g]` and seed `seeds[g]`.
    With `group_size=1` this is a plain per-env reset (PPO). The reset also thaws sub-envs that
    LeRobot's async wrapper froze at the end of the previous episode.
    """
    n_groups = len(init_state_ids)
    if len(seeds) != n_groups:
        raise ValueError(f"{n_groups} init states but {len(seeds)} seeds: give one of each per group")
    if n_groups * group_size != vec_env.num_envs:
        raise ValueError(f"{n_groups} groups of {group_size} != {vec_env.num_envs} sub-envs")
    per_env_init_state_ids = np.repeat(np.asarray(init_state_ids, dtype=np.int64), group_size)  # (n_envs,)
    per_env_seeds = np.repeat(np.asarray(seeds, dtype=np.int64), group_size)  # (n_envs,)
    set_init_state_ids(vec_env, per_env_init_state_ids)
    return vec_env.reset(seed=[int(s) for s in per_env_seeds], options={NEW_ROLLOUT_OPTION: True})
