"""Env worker processes: W workers, each stepping a contiguous shard of a vector env's sub-envs.

`ShardedVectorEnv` is a gymnasium vector env over N sub-env factories. Worker w builds its shard's
sub-envs as a `SyncVectorEnv` of its own (the shards build in parallel) and runs whole decisions there:
one message per decision carries its (C, n_w, D) actions and the resets due after them
(`rollout.chunks.run_chunk`, the function the in-process path runs), and the observations come back
through one shared-memory block rather than pickled. Only small per-env arrays travel by pipe.

Start-up: workers are forked from a forkserver that has imported torch, LeRobot, gymnasium and the
env's modules once, so a worker costs seconds and shares those pages instead of re-importing them
(issue 13: 4 MetaWorld workers 60 s -> 16 s, 554 -> 183 MiB each).

A worker that dies or raises ends the call with `EnvWorkerError` naming the worker, its envs and the
cause; `close()` then stops every worker, and a worker whose parent died exits on its own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import CloudpickleWrapper

from lerobot_pirl.rollout.chunks import ChunkOutcome, RewardRules, render_frames, reset_envs, run_chunk
from lerobot_pirl_launch.forkserver import start_forkserver

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # building a LIBERO shard can take minutes on a loaded machine


class EnvWorkerError(RuntimeError):
    """An env worker died or raised; the message names the worker, its envs and the cause."""


def shard_bounds(num_envs: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) env ranges, sizes differing by at most one, first shards larger."""
    sizes = np.full(num_workers, num_envs // num_workers)
    sizes[: num_envs % num_workers] += 1
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(edges[w]), int(edges[w + 1])) for w in range(num_workers)]


# ---- the observation block in shared memory ----------------------------------------------------------


def _leaves(space: spaces.Space, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], spaces.Box]]:
    """(path, Box) of every array in a (nested) Dict observation space."""
    if isinstance(space, spaces.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in _leaves(sub, (*prefix, key))]
    if isinstance(space, spaces.Box):
        return [(prefix, space)]
    raise TypeError(f"env workers support Dict/Box observations, not {type(space).__name__} at {prefix}")


def _layout(space: spaces.Space, num_envs: int) -> tuple[list[tuple], int]:
    """[(path, (N, *shape), dtype str, byte offset)] and the block size for N envs' observations."""
    layout, offset = [], 0
    for path, box in _leaves(space):
        shape = (num_envs, *box.shape)
        layout.append((path, shape, np.dtype(box.dtype).str, offset))
        offset += int(np.prod(shape)) * np.dtype(box.dtype).itemsize
        offset = -(-offset // 64) * 64  # cache-line aligned
    return layout, max(offset, 1)


def _views(buffer, layout: list[tuple]) -> dict[tuple[str, ...], np.ndarray]:
    return {
        path: np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)
        for path, shape, dtype, offset in layout
    }


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict | np.ndarray:
    if list(flat) == [()]:
        return flat[()]
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def _get(observation: Any, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        observation = observation[key]
    return observation


# ---- the worker process -----------------------------------------------------------------------------


def _worker_main(
    index: int,
    env_fns: CloudpickleWrapper,
    vector_kwargs: dict,
    start: int,
    pipe: mp.connection.Connection,
    parent_pipe: mp.connection.Connection,
) -> None:
    parent_pipe.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes us
    block = None
    try:
        from lerobot.envs.utils import FreezeAfterEpisodeEnd

        vec_env = gym.vector.SyncVectorEnv(env_fns.fn, **vector_kwargs)
        vec_env.envs = [  # finished episodes freeze until a new rollout resets them (see collector)
            env if isinstance(env, FreezeAfterEpisodeEnd) else FreezeAfterEpisodeEnd(env)
            for env in vec_env.envs
        ]
        pipe.send(("ok", (vec_env.single_observation_space, vec_env.single_action_space, vec_env.metadata)))
        block_name, layout = pipe.recv()
        # The trainer owns and unlinks the block; workers share its resource tracker, so attaching here
        # registers nothing new.
        block = shared_memory.SharedMemory(name=block_name)
        stop = start + vec_env.num_envs
        views = {path: view[start:stop] for path, view in _views(block.buf, layout).items()}

        def publish(observation: Any) -> None:
            for path, view in views.items():
                view[...] = _get(observation, path)

        while True:
            command, payload = pipe.recv()
            if command == "chunk":
                observation, outcome = run_chunk(vec_env, **payload)
                publish(observation)
                pipe.send(("ok", outcome))
            elif command == "reset":
                publish(reset_envs(vec_env, **payload))
                pipe.send(("ok", None))
            elif command == "render":
                pipe.send(("ok", render_frames(vec_env, payload)))
            elif command == "call":
                name, args, kwargs = payload
                pipe.send(("ok", vec_env.call(name, *args, **kwargs)))
            elif command == "get_attr":
                pipe.send(("ok", vec_env.get_attr(payload)))
            elif command == "set_attr":
                vec_env.set_attr(*payload)
                pipe.send(("ok", None))
            elif command == "close":
                vec_env.close()
                pipe.send(("ok", None))
                return
            else:
                raise RuntimeError(f"unknown command {command!r}")
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the trainer is gone: nothing to report to
    except BaseException as error:  # noqa: BLE001 - reported to the trainer, which raises it there
        where = traceback.extract_tb(error.__traceback__)[-1]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            pipe.send(("error", f"{type(error).__name__}: {error} (at {where.filename}:{where.lineno})"))
    finally:
        if block is not None:
            block.close()


# ---- the vector env ---------------------------------------------------------------------------------


class ShardedVectorEnv(gym.vector.VectorEnv):
    """N sub-envs stepped by W worker processes, each over a contiguous shard (see module docstring).

    Args:
        env_fns: the N sub-env factories (as LeRobot's env builders hand them to a vector env class).
        num_workers: W, at most N.
        description: what these envs are, for error messages (e.g. "metaworld_state pick-place-v3").
        preload: modules the forkserver imports before forking any worker (the env's own modules).
        autoreset_mode: of every shard's SyncVectorEnv (as the in-process vector env would have).
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        num_workers: int,
        *,
        description: str = "envs",
        preload: Sequence[str] = (),
        autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    ):
        if not 1 <= num_workers <= len(env_fns):
            raise ValueError(f"num_workers must be in [1, {len(env_fns)}], got {num_workers}")
        self.num_envs = len(env_fns)
        self.description = description
        self.bounds = shard_bounds(self.num_envs, num_workers)
        self._processes: list[mp.Process] = []
        self._pipes: list[mp.connection.Connection] = []
        self._block: shared_memory.SharedMemory | None = None
        self._closed = False
        start_time = time.perf_counter()
        start_forkserver(preload)
        context = mp.get_context("forkserver")
        try:
            for index, (start, stop) in enumerate(self.bounds):
                parent_pipe, child_pipe = context.Pipe()
                process = context.Process(
                    target=_worker_main,
                    name=f"env-worker-{index}",
                    args=(
                        index,
                        CloudpickleWrapper(list(env_fns[start:stop])),
                        {"autoreset_mode": autoreset_mode},
                        start,
                        child_pipe,
                        parent_pipe,
                    ),
                    daemon=True,
                )
                process.start()
                child_pipe.close()
                self._processes.append(process)
                self._pipes.append(parent_pipe)
            spec = self._answers(set(range(num_workers)), timeout=START_TIMEOUT_S)[0]
            self.single_observation_space, self.single_action_space, self.metadata = spec
            layout, size = _layout(self.single_observation_space, self.num_envs)
            self._block = shared_memory.SharedMemory(create=True, size=size)
            self._views = _views(self._block.buf, layout)
            for pipe in self._pipes:
                pipe.send((self._block.name, layout))
        except BaseException:
            self.close(terminate=True)
            raise
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.start_s = time.perf_counter() - start_time
        logger.info(
            "%d env workers up for %d %s in %.1f s", num_workers, self.num_envs, description, self.start_s
        )

    @property
    def num_workers(self) -> int:
        return len(self.bounds)

    # ---- messaging --------------------------------------------------------------------------------

    def _worker_label(self, index: int) -> str:
        start, stop = self.bounds[index]
        return f"env worker {index} (envs {start}-{stop - 1} of {self.num_envs} {self.description})"

    def _roundtrip(self, messages: Sequence[tuple[str, Any] | None], timeout: float | None = None) -> list:
        """Send message w to worker w (None: skip it) and return the answers, None for skipped workers.

        EnvWorkerError at the first worker that is dead, dies or raises, or gives no answer in time.
        """
        for index, message in enumerate(messages):
            if message is None:
                continue
            try:
                self._pipes[index].send(message)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._fail(index)
        return self._answers({i for i, message in enumerate(messages) if message is not None}, timeout)

    def _broadcast(self, message: tuple[str, Any]) -> list:
        return self._roundtrip([message] * self.num_workers)

    def _answers(self, waiting: set[int], timeout: float | None = None) -> list:
        results: list[Any] = [None] * self.num_workers
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            ready = mp.connection.wait(
                [self._pipes[i] for i in waiting] + [self._processes[i].sentinel for i in waiting],
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                raise self._error(min(waiting), f"no answer within {timeout:.0f} s")
            for index in sorted(waiting):
                pipe = self._pipes[index]
                if pipe in ready or (self._processes[index].sentinel in ready and pipe.poll()):
                    try:
                        status, payload = pipe.recv()
                    except (EOFError, ConnectionResetError):
                        self._fail(index)
                    if status == "error":
                        raise self._error(index, payload)
                    results[index] = payload
                    waiting.discard(index)
                elif self._processes[index].sentinel in ready:
                    self._fail(index)
        return results

    def _fail(self, index: int):
        process = self._processes[index]
        process.join(timeout=1.0)
        code = process.exitcode
        if code is not None and code < 0:
            cause = f"killed by {signal.Signals(-code).name}"
        elif code is not None:
            cause = f"exited with code {code}"
        else:
            cause = "its pipe closed"
        raise self._error(index, cause)

    def _error(self, index: int, cause: str) -> EnvWorkerError:
        self.close(terminate=True)
        return EnvWorkerError(f"{self._worker_label(index)} failed: {cause}")

    def _observation(self) -> dict | np.ndarray:
        """A copy of the N envs' observations in shared memory (workers overwrite it at the next step)."""
        return _nest({path: view.copy() for path, view in self._views.items()})

    def _split(self, values: Sequence[Any] | np.ndarray | None) -> list[Any]:
        if values is None:
            return [None] * self.num_workers
        return [values[start:stop] for start, stop in self.bounds]

    def _local_envs(self, envs: Sequence[int]) -> list[list[int]]:
        """Sub-env indices (increasing) -> each shard's own indices of them."""
        if list(envs) != sorted(envs):
            raise ValueError(f"env indices must increase, got {list(envs)}")
        return [[env - start for env in envs if start <= env < stop] for start, stop in self.bounds]

    # ---- the vector-env API -----------------------------------------------------------------------

    def run_chunk(
        self,
        env_actions: np.ndarray,
        active: np.ndarray,
        succeeded: np.ndarray,
        rules: RewardRules,
        reset_seeds: Sequence[int | None] | None = None,
        render_envs: Sequence[int] = (),
    ) -> tuple[dict, ChunkOutcome]:
        """`rollout.chunks.run_chunk` over every shard at once; (C, N, D) actions, (N,) flags, and the
        rendered envs in increasing order."""
        messages = []
        shard_render_envs = self._local_envs(render_envs)
        for (start, stop), seeds, local_envs in zip(
            self.bounds, self._split(reset_seeds), shard_render_envs, strict=True
        ):
            payload = {
                "env_actions": env_actions[:, start:stop],
                "active": active[start:stop],
                "succeeded": succeeded[start:stop],
                "rules": rules,
                "reset_seeds": None if seeds is None else list(seeds),
                "render_envs": local_envs,
            }
            messages.append(("chunk", payload))
        parts = self._roundtrip(messages)
        outcome = ChunkOutcome.concatenate(parts)
        if any(envs and part.frames is None for envs, part in zip(shard_render_envs, parts, strict=True)):
            outcome.frames = None  # a shard does not render: no videos
        return self._observation(), outcome

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict | None = None):
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        messages = []
        for seeds, shard_mask in zip(self._split(seed), self._split(mask), strict=True):
            if shard_mask is not None and not np.any(shard_mask):
                messages.append(None)  # nothing to reset in this shard
            else:
                shard_seeds = None if seeds is None else list(seeds)
                messages.append(("reset", {"seeds": shard_seeds, "mask": shard_mask}))
        self._roundtrip(messages)
        return self._observation(), {}

    def step(self, actions):
        """One env step of every sub-env (for callers outside the collector; the collector runs chunks)."""
        actions = np.asarray(actions)
        observation, outcome = self.run_chunk(
            actions[None],
            np.ones(self.num_envs, dtype=bool),
            np.zeros(self.num_envs, dtype=bool),
            RewardRules(sparse_reward=False),
        )
        info = {"is_success": outcome.success}
        return observation, outcome.reward, outcome.terminated, outcome.truncated, info

    def render_frames(self, envs: Sequence[int]) -> list[np.ndarray] | None:
        """Frames of the sub-envs `envs` (in increasing order)."""
        shard_envs = self._local_envs(envs)
        parts = self._roundtrip([("render", local) if local else None for local in shard_envs])
        if any(local and part is None for local, part in zip(shard_envs, parts, strict=True)):
            return None
        return [frame for part in parts if part for frame in part]

    def call(self, name: str, *args, **kwargs) -> tuple:
        return tuple(value for part in self._broadcast(("call", (name, args, kwargs))) for value in part)

    def get_attr(self, name: str) -> tuple:
        return tuple(value for part in self._broadcast(("get_attr", name)) for value in part)

    def set_attr(self, name: str, values: Any) -> None:
        if not isinstance(values, list | tuple | np.ndarray):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"set_attr({name!r}) needs {self.num_envs} values, got {len(values)}")
        self._roundtrip([("set_attr", (name, list(part))) for part in self._split(values)])

    def close(self, terminate: bool = False, **kwargs) -> None:
        if self._closed:
            return
        self._closed = True
        if not terminate:
            for pipe, process in zip(self._pipes, self._processes, strict=True):
                if process.is_alive():
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                        pipe.send(("close", None))
            for pipe, process in zip(self._pipes, self._processes, strict=True):
                if process.is_alive() and pipe.poll(30.0):
                    with contextlib.suppress(EOFError, ConnectionResetError):
                        pipe.recv()
        for process in self._processes:
            process.join(timeout=0 if terminate else 5.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self._pipes:
            pipe.close()
        if self._block is not None:
            self._views = {}
            self._block.close()
            self._block.unlink()
            self._block = None

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close(terminate=True)


class ShardedVectorEnvBuilder:
    """An `env_cls` for LeRobot's env builders (a callable over the N sub-env factories) that returns a
    ShardedVectorEnv with `num_workers` workers (at most one per env)."""

    def __init__(
        self,
        num_workers: int,
        *,
        description: str,
        preload: Sequence[str] = (),
        autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    ):
        self.num_workers = num_workers
        self.description = description
        self.preload = tuple(preload)
        self.autoreset_mode = autoreset_mode

    def __call__(self, env_fns: Sequence[Callable[[], gym.Env]]) -> ShardedVectorEnv:
        return ShardedVectorEnv(
            env_fns,
            min(self.num_workers, len(env_fns)),
            description=self.description,
            preload=self.preload,
            autoreset_mode=self.autoreset_mode,
        )
