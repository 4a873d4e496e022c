"""Chunked collection over LeRobot vector envs (DESIGN.md §4).

Shape legend
    N  parallel envs
    T  decisions per env in one rollout
    C  actions executed per decision, D real action dim

One decision = one action chunk of C env steps. Observations go through exactly LeRobot's eval path
(`preprocess_observation`, the task text, the env's processors, then the policy's preprocessor), so
rollout and update see the same inputs and `lerobot-eval` sees what we trained on.

Episode boundaries are aligned to chunks: every sub-env is wrapped in LeRobot's
`FreezeAfterEpisodeEnd`, so once an episode ends inside a chunk the rest of the chunk replays its
terminal transition (reward 0) instead of running stale actions in a new episode; at the chunk
boundary the finished sub-envs are reset explicitly. The frozen observation is the episode's final
observation, whose value bootstraps a time-limit truncation.

A multi-task env (`TaskSet.by_seed`) plays, in each episode, the task its reset seed picks
(`suite_task_of_seed`); the collector hands out consecutive seeds, so over an iteration every task starts
an equal share of episodes (within one), and knows each sub-env's task from its seed without asking the
env: the task text the policy reads and the task each episode is counted under.

In the continuous (PPO) mode a finished sub-env sits out the next decision (its row is masked) and is
reset right after that decision's chunk, in its env worker when there are workers. The reset then runs
while the policy computes and the other envs step, instead of every env waiting for it (issue 13: one
LIBERO reset took 6-7 s against a 1 s vector step). It costs each episode one decision slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from lerobot.envs.utils import FreezeAfterEpisodeEnd, preprocess_observation
from lerobot.utils.constants import ACTION
from torch import Tensor

from lerobot_pirl.adapters.prefix_cache import KEPT_PREFIX, can_cache, context_gib, keep_context
from lerobot_pirl.envs.metaworld_state import suite_task_of_seed
from lerobot_pirl.rl_policy import FlowRLPolicy, SampleMode
from lerobot_pirl.rollout.batch import PER_DECISION_DTYPES, RolloutBatch, compact_observation
from lerobot_pirl.rollout.chunks import ChunkOutcome, RewardRules, render_frames, reset_envs, run_chunk
from lerobot_pirl.rollout.workers import ShardedVectorEnv

logger = logging.getLogger(__name__)

Pipeline = Callable[[Any], Any]
# The (T, N) fields of RolloutBatch written per decision; next_values is derived from them at the end.
COLLECTED_PER_DECISION = tuple(name for name in PER_DECISION_DTYPES if name != "next_values")


def _identity(x: Any) -> Any:
    return x


def freeze_finished_episodes(vec_env: gym.vector.VectorEnv) -> gym.vector.VectorEnv:
    """Make sure every sub-env freezes at the end of its episode (see module docstring).

    Sync vector envs are wrapped here in place; async ones must have been built from factories wrapped
    with `lerobot.envs.utils.freeze_after_episode_end` (LeRobot's async envs and ours are).
    """
    if isinstance(vec_env, gym.vector.SyncVectorEnv):
        vec_env.envs = [
            e if isinstance(e, FreezeAfterEpisodeEnd) else FreezeAfterEpisodeEnd(e) for e in vec_env.envs
        ]
        return vec_env
    try:
        vec_env.get_attr("is_frozen")  # only FreezeAfterEpisodeEnd has it
    except (AttributeError, NotImplementedError) as error:
        raise TypeError(
            f"the sub-envs of this {type(vec_env).__name__} do not freeze finished episodes; use a "
            "SyncVectorEnv or build the async env from factories wrapped with "
            "lerobot.envs.utils.freeze_after_episode_end"
        ) from error
    return vec_env


@dataclass(frozen=True)
class TaskSet:
    """The tasks of a run's env, in the order metrics and the policy's task vocabulary index them.

    names: labels of the metrics (`eval/<name>/success_rate`), e.g. "push-v3".
    descriptions: the instruction of each task, what the policy reads as `task`.
    by_seed: every sub-env plays each episode's task from its reset seed (`suite_task_of_seed`); False:
        each sub-env keeps the one task it was built with (a single-task run).
    """

    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    by_seed: bool = False

    def __post_init__(self):
        if not self.names or len(self.names) != len(self.descriptions):
            raise ValueError(f"a TaskSet needs one description per task name, got {self}")


@dataclass
class EpisodeStats:
    """Per-episode accumulators of one rollout, indexed by the episode's slot."""

    returns: list[float] = field(default_factory=list)
    success: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)  # into TaskSet.names

    def start(self, returns: float = 0.0, success: bool = False, length: int = 0, task: int = 0) -> int:
        self.returns.append(returns)
        self.success.append(success)
        self.lengths.append(length)
        self.done.append(False)
        self.tasks.append(int(task))
        return len(self.returns) - 1


class ChunkCollector:
    """Runs a FlowRLPolicy in a LeRobot vector env, one action chunk per decision.

    Args:
        vec_env: a LeRobot vector env (from `EnvConfig.create_envs` / `make_env`), or a
            `ShardedVectorEnv` whose workers run each chunk (`--rollout.num_workers`).
        policy: the FlowRLPolicy.
        preprocessor, postprocessor: the policy's own LeRobot processor pipelines.
        env_preprocessor, env_postprocessor: the env's processors (`make_env_pre_post_processors`).
        device: where the policy runs; rollout tensors are stored on `storage_device`.
        sparse_reward: reward +1 at the first success and 0 otherwise; else the env's own reward.
        reward_scale: multiplies the env's own (dense) reward, so returns suit the critic's Huber loss.
        end_on_success: the episode ends at its first success (what follows is never used).
        seed: base seed for the resets of the continuous (PPO) mode.
        keep_prefix_gib: > 0 keeps each decision's encoded observation (a VLA's frozen prefix) with the
            stored observation, on `device`, when a rollout's fit this many GiB; the update then reads it
            instead of running the prefix again (`adapters.prefix_cache`).
        task_set: the env's tasks (None: one task, whatever the envs call it).
        env_tasks: (N,) the task each env keeps, into `task_set` (a fixed-task mixture, not by seed).
    """

    def __init__(
        self,
        vec_env: gym.vector.VectorEnv,
        policy: FlowRLPolicy,
        preprocessor: Pipeline | None = None,
        postprocessor: Pipeline | None = None,
        env_preprocessor: Pipeline | None = None,
        env_postprocessor: Pipeline | None = None,
        *,
        device: torch.device | str = "cpu",
        storage_device: torch.device | str = "cpu",
        sparse_reward: bool = True,
        reward_scale: float = 1.0,
        end_on_success: bool = True,
        seed: int = 0,
        keep_prefix_gib: float = 0.0,
        task_set: TaskSet | None = None,
        env_tasks: list[int] | None = None,
    ):
        self.vec_env = freeze_finished_episodes(vec_env)
        self.keep_prefix_gib = keep_prefix_gib if can_cache(policy.adapter) else 0.0
        self.num_envs = vec_env.num_envs
        self.policy = policy
        self.preprocessor = preprocessor or _identity
        self.postprocessor = postprocessor or _identity
        self.env_preprocessor = env_preprocessor or _identity
        self.env_postprocessor = env_postprocessor or _identity
        self.device = torch.device(device)
        self.storage_device = torch.device(storage_device)
        self.rules = RewardRules(sparse_reward, reward_scale, end_on_success)
        self.next_seed = seed
        self.task_set = task_set
        self.env_tasks = np.zeros(self.num_envs, dtype=np.int64)  # (N,) each env's task, into task_set
        if env_tasks is not None:
            if len(env_tasks) != self.num_envs:
                raise ValueError(f"need one task per env ({self.num_envs}), got {len(env_tasks)}")
            self.env_tasks[:] = env_tasks
        if task_set is not None and task_set.by_seed:
            self.tasks = [task_set.descriptions[0]] * self.num_envs  # set per env at its first reset
        else:
            self.tasks = self._task_descriptions()  # the instruction each env's policy input carries
        self._observation: dict | None = None  # raw vector-env observation of the continuous mode
        self._carry: list[tuple[float, bool, int] | None] = []  # running episodes (return, success, length)
        self._pending_seeds: list[int | None] = [None] * self.num_envs  # resets due after the next chunk
        self.recorded_envs: list[int] = []  # the envs collect_episodes recorded, in increasing order
        self.recorded_frames: list[list[np.ndarray]] = []  # per recorded env, after collect_episodes

    # ---- env plumbing -------------------------------------------------------------------------------

    def _task_descriptions(self) -> list[str]:
        for name in ("task_description", "task"):
            try:
                return [str(t) for t in self.vec_env.call(name)]
            except (AttributeError, NotImplementedError):
                continue
        return [""] * self.num_envs

    def take_seeds(self, count: int) -> list[int]:
        seeds = list(range(self.next_seed, self.next_seed + count))
        self.next_seed += count
        return seeds

    def restart_episodes(self) -> None:
        """Drop the episodes in flight: the next continuous rollout resets every env from `next_seed`."""
        self._observation = None

    def reset(self, seeds: list[int] | None = None, mask: np.ndarray | None = None) -> dict:
        """Reset all sub-envs, or those in `mask`, starting genuinely new episodes."""
        observation = reset_envs(self.vec_env, seeds, mask)
        if seeds is not None:
            self._follow_task_seeds([s if mask is None or mask[i] else None for i, s in enumerate(seeds)])
        return observation

    def _follow_task_seeds(self, seeds: list[int | None]) -> None:
        """Record the task each env reset with a seed in `seeds` (None: not reset) plays now."""
        if self.task_set is None or not self.task_set.by_seed:
            return
        num_tasks = len(self.task_set.names)
        for env, seed in enumerate(seeds):
            if seed is not None:
                self.env_tasks[env] = suite_task_of_seed(seed, num_tasks)
                self.tasks[env] = self.task_set.descriptions[self.env_tasks[env]]

    def policy_inputs(self, observation: dict) -> dict[str, Tensor]:
        """Raw vector-env observation -> the policy's preprocessed batch (LeRobot's eval path)."""
        batch = preprocess_observation(observation)
        batch["task"] = list(self.tasks)
        batch = self.env_preprocessor(batch)
        return self.preprocessor(batch)

    def to_env_actions(self, actions: Tensor) -> np.ndarray:
        """(N, C, D) normalised policy actions -> (C, N, D) env actions via the postprocessors."""
        actions = self.postprocessor(actions)
        steps = []
        for c in range(actions.shape[1]):
            step = self.env_postprocessor({ACTION: actions[:, c]})[ACTION]
            steps.append(step.detach().to("cpu", torch.float32).numpy())
        return np.stack(steps)

    @staticmethod
    def _storable(batch: dict) -> dict[str, Tensor]:
        """The tensors of a policy batch as the rollout keeps them (camera images as uint8 where exact)."""
        return compact_observation({k: v for k, v in batch.items() if isinstance(v, Tensor)})

    def _run_chunk(
        self,
        env_actions: np.ndarray,
        active: np.ndarray,
        succeeded: np.ndarray,
        reset_seeds: list[int | None] | None = None,
        render_envs: list[int] | None = None,
    ) -> tuple[dict, ChunkOutcome]:
        """C env steps, then the due resets: in the env workers, or here (rollout/chunks.py)."""
        args = (env_actions, active, succeeded, self.rules, reset_seeds, render_envs or [])
        if isinstance(self.vec_env, ShardedVectorEnv):
            return self.vec_env.run_chunk(*args)
        return run_chunk(self.vec_env, *args)

    def _render(self, envs: list[int]) -> list[np.ndarray] | None:
        if isinstance(self.vec_env, ShardedVectorEnv):
            return self.vec_env.render_frames(envs)
        return render_frames(self.vec_env, envs)

    # ---- rollouts -----------------------------------------------------------------------------------

    def collect(self, num_decisions: int, mode: SampleMode) -> RolloutBatch:
        """Continuous mode (PPO): T decisions per env; finished episodes restart at chunk boundaries.

        Episodes carry over between calls; `episode_*` tensors cover the episodes that started or were
        running during this rollout (`episode_done` False for those still running at its end).
        """
        if self._observation is None:
            self._observation = self.reset(self.take_seeds(self.num_envs))
            self._carry = [(0.0, False, 0)] * self.num_envs
            self._pending_seeds = [None] * self.num_envs
        stats = EpisodeStats()
        # An env whose reset is still pending has no running episode until that reset is done.
        slot = np.array(
            [-1 if c is None else stats.start(*c, task=self.env_tasks[i]) for i, c in enumerate(self._carry)],
            dtype=np.int64,
        )
        batch = self._rollout(num_decisions, mode, stats, slot, continuous=True)
        self._carry = [
            None if i < 0 else (stats.returns[i], stats.success[i], stats.lengths[i]) for i in slot
        ]
        return batch

    def collect_episodes(
        self,
        seeds: list[int],
        mode: SampleMode,
        max_decisions: int | None = None,
        before_reset: Callable[[gym.vector.VectorEnv, list[int]], None] | None = None,
        record: int = 0,
        noise_seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """Episodic mode (GRPO, evaluation): one episode per env from the given seeds, masked after its end.

        `noise_seeds` (one per env) seeds a generator per episode that draws the initial noise of each of
        its chains, so that an ODE episode depends only on its env seed, its noise seed and the policy,
        not on the batch it runs in or on the global RNG (issue 17: reproducible evaluation).
        `before_reset(vec_env, seeds)` may prepare group resets (e.g. LIBERO init states). `record` > 0
        keeps RGB frames of `record` envs spread evenly over the N (so over the env workers, which render
        them in parallel) in `recorded_frames`, their indices in `recorded_envs`: the reset frame, then
        one per env step of the episode (none when the env does not render). Leaves the continuous mode
        to restart from fresh resets.
        """
        if len(seeds) != self.num_envs:
            raise ValueError(f"need one seed per env ({self.num_envs}), got {len(seeds)}")
        if noise_seeds is not None and len(noise_seeds) != self.num_envs:
            raise ValueError(f"need one noise seed per env ({self.num_envs}), got {len(noise_seeds)}")
        if before_reset is not None:
            before_reset(self.vec_env, seeds)
        self._observation = self.reset(list(seeds))
        record = min(record, self.num_envs)
        self.recorded_envs = [i * self.num_envs // record for i in range(record)]
        first_frames = self._render(self.recorded_envs) if record else None
        self.recorded_frames = [[frame] for frame in first_frames] if first_frames else []
        if not self.recorded_frames:
            self.recorded_envs = []
        stats = EpisodeStats()
        slot = np.array([stats.start(task=task) for task in self.env_tasks], dtype=np.int64)
        if max_decisions is None:
            max_steps = int(np.max(self.vec_env.call("_max_episode_steps")))
            max_decisions = -(-max_steps // self.policy.n_action_steps) + 1
        generators = None if noise_seeds is None else [torch.Generator().manual_seed(s) for s in noise_seeds]
        batch = self._rollout(
            max_decisions, mode, stats, slot, False, record=self.recorded_envs, generators=generators
        )
        self._observation = None  # the continuous mode must not resume from these frozen envs
        return batch

    def _rollout(
        self,
        num_decisions: int,
        mode: SampleMode,
        stats: EpisodeStats,
        slot: np.ndarray,
        continuous: bool,
        record: list[int] | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> RolloutBatch:
        """`slot` (N,): each env's running episode in `stats` (-1: none yet), updated as episodes restart.
        `generators` (N): each env's source of initial chain noise (else the global RNG)."""
        active = slot >= 0  # the env's episode is running (episodic mode: until it ends)
        store: dict[str, Any] = {}  # (T, N, ...) storage, allocated at the first decision
        env_steps, decisions = 0, 0
        for t in range(num_decisions):
            if not continuous and not active.any():
                break
            reset_seeds = None
            if continuous:
                reset_seeds = self._pending_seeds
                active = np.array([seed is None for seed in reset_seeds])  # resetting envs sit this one out
                self._pending_seeds = [None] * self.num_envs
            batch = self.policy_inputs(self._observation)
            noise = None if generators is None else self.policy.initial_noise(generators)  # (N, H, A)
            sample = self.policy.sample(batch, mode, noise=noise, keep_context=self.keep_prefix_gib > 0)
            observation = self._storable(batch)
            if sample.context is not None:
                kept = keep_context(self.policy.adapter, sample.context)  # each (N, ...)
                needed_gib = context_gib(kept) * num_decisions
                if not store and needed_gib > self.keep_prefix_gib:
                    logger.info(
                        "prefix not kept from the rollout: %.1f GiB for %d decisions is more than "
                        "--algorithm.prefix_cache_gib=%g",
                        needed_gib,
                        num_decisions * self.num_envs,
                        self.keep_prefix_gib,
                    )
                    self.keep_prefix_gib = 0.0
                else:
                    observation |= kept
            if not store:
                store = self._allocate(num_decisions, observation, sample.chain)
            succeeded = np.array([stats.success[i] if i >= 0 else False for i in slot])
            self._observation, outcome = self._run_chunk(
                self.to_env_actions(sample.actions), active, succeeded, reset_seeds, record
            )
            if reset_seeds is not None:
                self._follow_task_seeds(reset_seeds)
            if record:
                if outcome.frames is None:
                    self.recorded_frames, self.recorded_envs, record = [], [], None  # no videos
                else:
                    for frames, new in zip(self.recorded_frames, outcome.frames, strict=True):
                        frames.extend(new)

            for env in np.flatnonzero(active):
                episode = slot[env]
                stats.returns[episode] += float(outcome.reward[env])
                stats.lengths[episode] += int(outcome.steps[env])
                stats.success[episode] |= bool(outcome.success[env])
            env_steps += int(outcome.steps.sum())
            ended = outcome.terminated | outcome.truncated

            truncated_now = outcome.truncated & active
            if truncated_now.any() and self.policy.value_head is not None:
                final_inputs = self.policy_inputs(self._observation)  # frozen envs show their final obs
                final_value = self.policy.value(final_inputs).float().cpu() * torch.from_numpy(truncated_now)
                store["final_values"][t] = final_value  # V(final obs) where truncated, else 0

            for key, value in observation.items():
                if value.dtype != store["observations"][key].dtype:
                    raise RuntimeError(f"{key} changed dtype during the rollout ({value.dtype})")
                store["observations"][key][t] = value
            store["chains"][t] = sample.chain
            store["step_index"][t] = sample.step_index
            store["logprobs"][t] = sample.logprob
            store["values"][t] = sample.value
            store["rewards"][t] = torch.from_numpy(outcome.reward)
            store["terminated"][t] = torch.from_numpy(outcome.terminated & active)
            store["truncated"][t] = torch.from_numpy(truncated_now)
            store["mask"][t] = torch.from_numpy(active)
            store["episode_index"][t] = torch.from_numpy(np.where(active, slot, -1))
            decisions = t + 1

            finished = ended & active
            for env in np.flatnonzero(finished):
                stats.done[slot[env]] = True
            if continuous:
                for env, seed in enumerate(reset_seeds):
                    if seed is not None:  # reset after this chunk: its new episode starts now
                        slot[env] = stats.start(task=self.env_tasks[env])
                finished_envs = np.flatnonzero(finished)
                for env, seed in zip(finished_envs, self.take_seeds(len(finished_envs)), strict=True):
                    self._pending_seeds[env] = seed
                    slot[env] = -1
            else:
                active &= ~finished

        per_decision = {name: store[name][:decisions] for name in COLLECTED_PER_DECISION}
        # V of the observation each decision led to: the next decision's value inside an episode, the
        # final observation's value at a truncation (0 at a termination), and a bootstrap pass at the end.
        values = per_decision["values"]
        next_values = torch.zeros_like(values)
        next_values[:-1] = values[1:]
        if continuous and self.policy.value_head is not None:
            next_values[-1] = self.policy.value(self.policy_inputs(self._observation)).float().cpu()
        ended_t = per_decision["terminated"] | per_decision["truncated"]
        next_values = torch.where(ended_t, store["final_values"][:decisions], next_values)

        return RolloutBatch(
            observations={k: v[:decisions] for k, v in store["observations"].items()},
            chains=store["chains"][:decisions],
            **per_decision,
            next_values=next_values,
            episode_returns=torch.tensor(stats.returns, dtype=torch.float32),
            episode_success=torch.tensor(stats.success, dtype=torch.bool),
            episode_lengths=torch.tensor(stats.lengths, dtype=torch.int64),
            episode_done=torch.tensor(stats.done, dtype=torch.bool),
            episode_task=torch.tensor(stats.tasks, dtype=torch.int64),
            env_steps=env_steps,
        )

    def _allocate(self, num_decisions: int, observation: dict[str, Tensor], chain: Tensor) -> dict[str, Any]:
        """Storage for up to T = num_decisions decisions: observations and chains on the storage device,
        the (T, N) fields of RolloutBatch on the CPU, in their declared dtypes."""
        T, N = num_decisions, self.num_envs
        on_storage = {"device": self.storage_device}
        return {
            "observations": {  # each (T, N, ...); a kept prefix stays where the update will read it
                key: torch.empty(
                    (T, *value.shape),
                    dtype=value.dtype,
                    device=self.device if key.startswith(KEPT_PREFIX) else self.storage_device,
                )
                for key, value in observation.items()
            },
            "chains": torch.empty((T, *chain.shape), dtype=chain.dtype, **on_storage),  # (T, N, K+1, H, A)
            **{name: torch.empty((T, N), dtype=PER_DECISION_DTYPES[name]) for name in COLLECTED_PER_DECISION},
            "final_values": torch.zeros(T, N),  # (T, N)
        }
