"""Env construction and per-episode reset preparation for training and evaluation.

The trainer builds every vector env here, so env-specific needs (LIBERO's offline assets, fast
rendering inside workers, init-state group resets) stay out of the trainer loop.

LIBERO (`--env.type=libero`, LeRobot's own `LiberoEnv` config) specifics:

- Envs come from `lerobot_pirl.envs.libero_tools.make_libero_envs`: LeRobot's vector envs whose
  sub-envs reset reproducibly, truncate at `_max_episode_steps` (LeRobot's env never truncates; its
  `lerobot-eval` loop stops there) and optionally render fast (`--rollout.fast_render`).
- `hard_reset` is taken from the env config as given (LeRobot's default is True). We do not override
  it: the same config then means the same env in training, in-training evaluation, `lerobot-pirl-eval`
  and `lerobot-eval`. The examples and docs pass `--env.hard_reset=false` (soft resets take ~1 s
  instead of 6-10 s and, with the gripper fix of `LiberoRolloutEnv`, start from the same state), and a
  hard-reset config logs a warning.
- Init states: sub-env i loads init state `init_state_id % 50` at each reset, then LeRobot adds its
  stride n_envs. The continuous (PPO) mode resets each finished sub-env on its own, so env i visits
  i, i + n, i + 2n, ...: disjoint across the envs running together. Episodic resets (GRPO groups and
  evaluation) set the init states explicitly through the hooks below.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import gymnasium as gym
import numpy as np
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.envs.factory import make_env
from lerobot.envs.utils import env_to_policy_features

from lerobot_pirl.rollout.collector import TaskSet
from lerobot_pirl.rollout.workers import ShardedVectorEnvBuilder
from lerobot_pirl.runtime.config import ConfigError
from lerobot_pirl_launch.forkserver import ENV_PRELOAD, start_forkserver

logger = logging.getLogger(__name__)

ResetHook = Callable[[gym.vector.VectorEnv, list[int]], None]

LIBERO_ENV_TYPE = "libero"
METAWORLD_STATE_ENV_TYPE = "metaworld_state"
METAWORLD_ENV_TYPE = "metaworld"
# Env types whose vector envs can be stepped by env workers (`--rollout.num_workers`), with the modules
# their forkserver imports once for every worker, and the autoreset mode of their in-process vector env.
WORKER_ENV_TYPES = {
    METAWORLD_STATE_ENV_TYPE: (ENV_PRELOAD[METAWORLD_STATE_ENV_TYPE], gym.vector.AutoresetMode.SAME_STEP),
    METAWORLD_ENV_TYPE: (ENV_PRELOAD[METAWORLD_ENV_TYPE], gym.vector.AutoresetMode.NEXT_STEP),
    LIBERO_ENV_TYPE: (ENV_PRELOAD[LIBERO_ENV_TYPE], gym.vector.AutoresetMode.NEXT_STEP),
}


def is_libero(env_cfg: EnvConfig) -> bool:
    return env_cfg.type == LIBERO_ENV_TYPE


def _libero_tools():
    """`lerobot_pirl.envs.libero_tools`, imported only once LIBERO's first-use setup is done (importing
    `libero` before that asks an interactive question or fails offline)."""
    from lerobot_pirl.envs.libero_setup import ensure_libero_ready

    ensure_libero_ready()
    from lerobot_pirl.envs import libero_tools

    return libero_tools


def default_num_workers(env_cfg: EnvConfig, num_envs: int, use_async_envs: bool = False) -> int:
    """Env workers when `--rollout.num_workers` / `--eval.num_workers` is not given: one per core this
    process may use, at most one per env, for the env types that gain from it (BENCHMARKS.md, "Env
    workers"); 0 (in-process) on one core, with LeRobot's async envs, and for other env types."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if use_async_envs or env_cfg.type not in WORKER_ENV_TYPES or cores < 2:
        return 0
    return min(cores, num_envs)


# Eval envs when --eval.batch_size is not given: a state-only MetaWorld env is a few MB, so one round
# of all the episodes is cheapest (one policy call per decision for all of them).
CHEAP_EVAL_ENV_TYPES = (METAWORLD_STATE_ENV_TYPE,)
MAX_DEFAULT_EVAL_BATCH = 50
DEFAULT_EVAL_BATCH = 10


def resolve_eval_batch_size(env_cfg: EnvConfig, eval_cfg) -> int:
    """Set `eval_cfg.batch_size` to its per-env-type default when it is None, check it, and return it."""
    if eval_cfg.batch_size is None:
        if env_cfg.type in CHEAP_EVAL_ENV_TYPES:
            eval_cfg.batch_size = max(1, min(eval_cfg.n_episodes, MAX_DEFAULT_EVAL_BATCH))
        else:
            eval_cfg.batch_size = DEFAULT_EVAL_BATCH
    if eval_cfg.batch_size < 1:
        raise ConfigError(f"--eval.batch_size={eval_cfg.batch_size} must be >= 1 (parallel eval envs)")
    return eval_cfg.batch_size


def check_num_workers(env_cfg: EnvConfig, num_workers: int, num_envs: int, flag: str) -> None:
    if num_workers < 0:
        raise ConfigError(f"{flag}={num_workers} must be >= 0 (0 = step the envs in this process)")
    if num_workers > num_envs:
        raise ConfigError(f"{flag}={num_workers} is more than the {num_envs} envs it would step")
    if num_workers > 0 and env_cfg.type not in WORKER_ENV_TYPES:
        raise ConfigError(
            f"{flag}={num_workers}: env workers support --env.type in {sorted(WORKER_ENV_TYPES)}, not "
            f"{env_cfg.type}; use {flag}=0 (or --rollout.use_async_envs=true)"
        )


def start_env_worker_server(env_cfg: EnvConfig) -> None:
    """Start the forkserver env workers fork from, importing the env's modules in the background, so
    that this overlaps with loading the policy instead of delaying the first rollout."""
    if is_libero(env_cfg):
        _libero_tools()  # LIBERO's first-use setup before the forkserver imports `libero`
    start_forkserver(WORKER_ENV_TYPES[env_cfg.type][0])


def _worker_env_cls(env_cfg: EnvConfig, num_workers: int) -> ShardedVectorEnvBuilder:
    preload, autoreset_mode = WORKER_ENV_TYPES[env_cfg.type]
    return ShardedVectorEnvBuilder(
        num_workers,
        description=f"{env_cfg.type} {env_cfg.task}",
        preload=preload,
        autoreset_mode=autoreset_mode,
    )


def make_rollout_envs(
    env_cfg: EnvConfig,
    num_envs: int,
    use_async_envs: bool,
    *,
    fast_render: bool = False,
    num_workers: int = 0,
    env_tasks: list[int] | None = None,
) -> dict:
    """LeRobot's {suite: {task_id: vec_env}} for `env_cfg`; `num_workers` > 0: stepped by env workers.

    `env_tasks` (N,): a multi-task LIBERO or LeRobot metaworld config becomes one vector env whose sub-env
    i plays task `env_tasks[i]` (an index into `env_task_set(env_cfg).names`), built by LeRobot's own env
    factories: `{label: {0: vec_env}}`."""
    if num_workers > 0 and use_async_envs:
        raise ConfigError("env workers and --rollout.use_async_envs=true exclude each other; choose one")
    worker_env_cls = _worker_env_cls(env_cfg, num_workers) if num_workers > 0 else None
    if env_tasks is not None:
        return _task_mixture(env_cfg, env_tasks, use_async_envs, fast_render, worker_env_cls)
    if is_libero(env_cfg):
        if env_cfg.hard_reset:
            logger.warning(
                "LIBERO with --env.hard_reset=true rebuilds the simulator at every episode (6-10 s on "
                "CPU); --env.hard_reset=false restores the init state in ~1 s with the same observations"
            )
        return _libero_tools().make_libero_envs(
            env_cfg, num_envs, use_async_envs, fast_render=fast_render, worker_env_cls=worker_env_cls
        )
    if fast_render:
        raise ValueError(f"--rollout.fast_render is not available for --env.type={env_cfg.type}")
    if env_cfg.type == METAWORLD_STATE_ENV_TYPE:
        # A multi-task config trains in one vector env whose sub-envs play every task (TaskSet.by_seed).
        return env_cfg.create_envs(num_envs, use_async_envs, env_cls=worker_env_cls, mixed_tasks=True)
    if worker_env_cls is None:
        return make_env(env_cfg, n_envs=num_envs, use_async_envs=use_async_envs)
    from lerobot.envs.metaworld import create_metaworld_envs

    # The same arguments LeRobot's MetaworldEnv.create_envs passes; only env_cls differs.
    return create_metaworld_envs(env_cfg.task, num_envs, env_cfg.gym_kwargs, env_cls=worker_env_cls)


def _task_mixture(
    env_cfg: EnvConfig, env_tasks: list[int], use_async_envs: bool, fast_render: bool, worker_env_cls
):
    """One vector env over LeRobot's per-task env factories, sub-env i from task `env_tasks[i]`'s.

    LeRobot's builders hand each task's factories to `env_cls`; a list keeps them. Each task's factories
    are made for the most envs any task gets, so that LeRobot's per-task init-state stride keeps the
    envs of one task on disjoint init states."""
    counts = np.bincount(np.asarray(env_tasks), minlength=1)
    per_task_envs = int(counts.max())
    if use_async_envs:
        raise ConfigError(
            "a multi-task LIBERO or metaworld run steps its envs with env workers (--rollout.num_workers), "
            "not --rollout.use_async_envs=true"
        )
    if is_libero(env_cfg):
        tools = _libero_tools()
        factories = tools.make_libero_envs(env_cfg, per_task_envs, env_cls=list)
        finish = tools.libero_vector_env_builder(fast_render, worker_env_cls)
    else:
        if fast_render:
            raise ValueError(f"--rollout.fast_render is not available for --env.type={env_cfg.type}")
        from lerobot.envs.metaworld import create_metaworld_envs

        factories = create_metaworld_envs(env_cfg.task, per_task_envs, env_cfg.gym_kwargs, env_cls=list)
        finish = worker_env_cls or gym.vector.SyncVectorEnv
    per_task = [fns for group in factories.values() for fns in group.values()]  # task order of TaskSet
    taken = [0] * len(per_task)
    mixed = []
    for task in env_tasks:
        mixed.append(per_task[task][taken[task]])
        taken[task] += 1
    return {f"{env_cfg.type} {env_cfg.task}": {0: finish(mixed)}}


def env_policy_features(env_cfg: EnvConfig) -> dict[str, PolicyFeature]:
    """The features a policy receives from this env, i.e. after the env's own processors.

    LeRobot's `env_to_policy_features` lists the raw env features; LIBERO's env processor
    (`LiberoProcessorStep`) replaces its `observation.state.*` entries by one flat `observation.state`
    (eef position, axis-angle, gripper: 8-d), which is what LIBERO policies read.
    """
    features = env_to_policy_features(env_cfg)
    if not is_libero(env_cfg):
        return features
    from lerobot.processor.env_processor import LiberoProcessorStep

    by_type: dict[FeatureType, dict[str, PolicyFeature]] = {}
    for key, feature in features.items():
        by_type.setdefault(feature.type, {})[key] = feature
    if FeatureType.STATE not in by_type:  # obs_type="pixels": nothing for the step to flatten
        return features
    processed = LiberoProcessorStep().transform_features(by_type)
    return {key: feature for group in processed.values() for key, feature in group.items()}


def env_task_set(env_cfg: EnvConfig) -> TaskSet | None:
    """The tasks of a multi-task env config, in the order metrics and a policy's task vocabulary use;
    None for a config that selects one task (the envs then say what it is called).

    metaworld_state sub-envs play every task, one per episode (`TaskSet.by_seed`). A LIBERO or LeRobot
    metaworld sub-env keeps one task: a LIBERO simulator costs 2.2 GB and 6-10 s to rebuild."""
    from lerobot_pirl.envs.metaworld_state import metaworld_task_description

    if env_cfg.type == METAWORLD_STATE_ENV_TYPE:
        tasks = env_cfg.tasks
        if len(tasks) == 1:
            return None
        return TaskSet(tasks, tuple(metaworld_task_description(t) for t in tasks), by_seed=True)
    if is_libero(env_cfg):
        configs = single_task_configs(env_cfg)
        if len(configs) == 1:
            return None
        from lerobot.envs.libero import _get_suite

        names = tuple(f"{suite}_{task_id}" for suite, task_id, _ in configs)
        texts = tuple(_get_suite(suite).get_task(task_id).language for suite, task_id, _ in configs)
        return TaskSet(names, texts)
    if env_cfg.type == METAWORLD_ENV_TYPE:
        tasks = lerobot_metaworld_tasks(env_cfg.task)
        if len(tasks) == 1:
            return None
        names = tuple(task.removeprefix("metaworld-") for task in tasks)
        return TaskSet(names, tuple(metaworld_task_description(t) for t in tasks))
    return None


def lerobot_metaworld_tasks(task: str) -> list[str]:
    """The tasks LeRobot's metaworld env builds for `--env.task` (difficulty groups expanded), in order."""
    from lerobot.envs.metaworld import DIFFICULTY_TO_TASKS

    groups = [t.strip() for t in str(task).split(",") if t.strip()]
    return [name for group in groups for name in DIFFICULTY_TO_TASKS.get(group, [group])]


def fixed_env_tasks(num_envs: int, num_tasks: int, group_size: int = 1) -> list[int]:
    """The task of each env of a fixed-task mixture: consecutive blocks of `group_size` envs (a GRPO group)
    share one task and the blocks cycle over the tasks, so with `num_envs` a multiple of
    `num_tasks * group_size` every task has the same number of envs."""
    return [(env // group_size) % num_tasks for env in range(num_envs)]


def task_group_size(algorithm_cfg) -> int:
    """The envs that must share a task in a fixed-task mixture: a GRPO group, else one."""
    return algorithm_cfg.group_size if algorithm_cfg.type == "grpo" else 1


def check_task_envs(
    env_cfg: EnvConfig, num_envs: int, group_size: int, flag: str = "--rollout.num_envs"
) -> None:
    """Every task of a fixed-task mixture needs an env (a group of them for GRPO)."""
    task_set = env_task_set(env_cfg)
    if task_set is None or task_set.by_seed:
        return
    needed = len(task_set.names) * group_size
    if num_envs < needed:
        raise ConfigError(
            f"{flag}={num_envs}: the {len(task_set.names)} tasks of --env.task={env_cfg.task} need at least "
            f"{needed} envs (one{' group of ' + str(group_size) if group_size > 1 else ''} per task)"
        )
    if num_envs % needed:
        logger.warning(
            "%s=%d is not a multiple of %d: some of the %d tasks get one more env than others",
            flag,
            num_envs,
            needed,
            len(task_set.names),
        )


def env_task_names(env_cfg: EnvConfig) -> tuple[str, ...]:
    """The metric labels of the config's tasks (`eval/<name>/success_rate`); one task: its `--env.task`."""
    task_set = env_task_set(env_cfg)
    return task_set.names if task_set is not None else (str(env_cfg.task),)


# ---------------------------------------------------------------------------------------------
# Init states of episodic resets (LIBERO)
# ---------------------------------------------------------------------------------------------
def libero_single_task(env_cfg: EnvConfig) -> tuple[str, int]:
    """(suite, task_id) of a LIBERO config that selects exactly one task, else a ConfigError."""
    suites = [s.strip() for s in str(env_cfg.task).split(",") if s.strip()]
    task_ids = env_cfg.task_ids
    if len(suites) != 1 or task_ids is None or len(set(task_ids)) != 1:
        raise ConfigError(
            f"--env.task={env_cfg.task} --env.task_ids={task_ids} selects several LIBERO tasks; train "
            "on one task per run, e.g. --env.task=libero_spatial --env.task_ids='[0]'"
        )
    return suites[0], int(task_ids[0])


@lru_cache(maxsize=64)
def _num_init_states(suite: str, task_id: int, is_libero_plus: bool) -> int:
    return _libero_tools().num_init_states(suite, task_id, is_libero_plus=is_libero_plus)


def libero_num_init_states(env_cfg: EnvConfig) -> int:
    """Init states of the one task `env_cfg` selects (50 for the standard suites)."""
    suite, task_id = libero_single_task(env_cfg)
    return _num_init_states(suite, task_id, bool(env_cfg.is_libero_plus))


def _set_init_states(vec_env, init_state_ids: list[int]) -> None:
    _libero_tools().set_init_state_ids(vec_env, init_state_ids)


def group_init_state_ids(seeds: list[int], group_size: int, n_init_states: int) -> list[int]:
    """Per sub-env init state for grouped episodic resets: group g (sub-envs g*G .. g*G+G-1, which all
    carry the group's seed) starts from init state `seed_g % n_init_states`.

    The collector hands out consecutive seeds, so the groups of one round get disjoint init states and
    successive rounds cycle through all of them; the init state follows from the seed, so a resumed run
    (whose next seed is in its checkpoint) continues the same sequence.
    """
    if len(seeds) % group_size:
        raise ValueError(f"{len(seeds)} seeds do not split into groups of {group_size}")
    ids = []
    for start in range(0, len(seeds), group_size):
        group = seeds[start : start + group_size]
        if len(set(group)) != 1:
            raise ValueError(f"the members of a group must share one seed, got {group}")
        ids += [int(group[0]) % n_init_states] * group_size
    return ids


def evaluation_init_state_ids(seeds: list[int], first_seed: int, n_init_states: int) -> list[int]:
    """Evaluation episode i (reset with seed `first_seed + i`, see `runtime.evaluation.evaluate`) starts
    from init state `i % n_init_states`: the same scenes for the SFT baseline and every checkpoint."""
    episodes = [int(seed) - first_seed for seed in seeds]
    if min(episodes) < 0:
        raise ValueError(f"evaluation seeds {seeds} start below the first seed {first_seed}")
    return [episode % n_init_states for episode in episodes]


def episode_reset_hook(env_cfg: EnvConfig, group_size: int) -> ResetHook | None:
    """What to do to the sub-envs before an episodic reset whose seeds come in groups of `group_size`
    (GRPO: members of a group must start from the same initial state). None: the seeds are enough.

    LIBERO: a scene is fixed by its init state AND the seed, so every member of a group gets its
    group's init state (`group_init_state_ids`) on top of the shared seed.
    """
    if not is_libero(env_cfg) or not env_cfg.init_states:
        return None
    configs = single_task_configs(env_cfg)
    if len(configs) > 1:  # a task mixture: each group's init state within its own task's
        counts = [_num_init_states(suite, tid, bool(env_cfg.is_libero_plus)) for suite, tid, _ in configs]

        def set_mixture_init_states(vec_env, seeds: list[int]) -> None:
            tasks = fixed_env_tasks(len(seeds), len(counts), group_size)
            by_count = {n: group_init_state_ids(list(seeds), group_size, n) for n in set(counts)}
            _set_init_states(vec_env, [by_count[counts[task]][env] for env, task in enumerate(tasks)])

        return set_mixture_init_states
    n_init_states = libero_num_init_states(env_cfg)

    def set_group_init_states(vec_env, seeds: list[int]) -> None:
        _set_init_states(vec_env, group_init_state_ids(list(seeds), group_size, n_init_states))

    return set_group_init_states


def evaluation_reset_hook(env_cfg: EnvConfig, first_seed: int) -> ResetHook | None:
    """`before_reset` for `runtime.evaluation.evaluate(..., seed=first_seed)`: on LIBERO, episode i
    starts from init state i (LIBERO's standard protocol: each task x its 50 init states). None for
    envs whose seed alone fixes the episode."""
    if not is_libero(env_cfg) or not env_cfg.init_states:
        return None
    n_init_states = libero_num_init_states(env_cfg)

    def set_episode_init_states(vec_env, seeds: list[int]) -> None:
        _set_init_states(vec_env, evaluation_init_state_ids(list(seeds), first_seed, n_init_states))

    return set_episode_init_states


# ---------------------------------------------------------------------------------------------
# One env config per task (suite evaluation)
# ---------------------------------------------------------------------------------------------
def single_task_configs(env_cfg: EnvConfig) -> list[tuple[str, int, EnvConfig]]:
    """(suite, task_id, env config selecting only that task) for every task `env_cfg` selects.

    LIBERO: each suite of `--env.task` (comma-separated) x its `--env.task_ids` (default: all tasks,
    checked by LeRobot's own `_select_task_ids`). A multi-task metaworld_state config: (its `--env.task`,
    i, the config of its i-th task). Other envs: the config as it is, labelled (env type, 0).
    """
    if env_cfg.type == METAWORLD_STATE_ENV_TYPE and len(env_cfg.tasks) > 1:
        return [
            (str(env_cfg.task), index, replace(env_cfg, task=task))
            for index, task in enumerate(env_cfg.tasks)
        ]
    if env_cfg.type == METAWORLD_ENV_TYPE and len(lerobot_metaworld_tasks(env_cfg.task)) > 1:
        return [
            (str(env_cfg.task), index, replace(env_cfg, task=task))
            for index, task in enumerate(lerobot_metaworld_tasks(env_cfg.task))
        ]
    if not is_libero(env_cfg):
        return [(str(env_cfg.type), 0, env_cfg)]
    _libero_tools()  # LIBERO's first-use setup before `libero` is imported below
    from lerobot.envs.libero import _get_suite, _select_task_ids

    configs = []
    for suite_name in [s.strip() for s in str(env_cfg.task).split(",") if s.strip()]:
        try:
            task_ids = _select_task_ids(len(_get_suite(suite_name).tasks), env_cfg.task_ids)
        except ValueError as error:
            raise ConfigError(
                f"--env.task={suite_name} --env.task_ids={env_cfg.task_ids}: {error}"
            ) from error
        for task_id in task_ids:
            task_cfg = copy.deepcopy(env_cfg)
            task_cfg.task, task_cfg.task_ids = suite_name, [task_id]
            configs.append((suite_name, task_id, task_cfg))
    return configs
