"""Env workers (`--rollout.num_workers`): the same rollouts as in-process collection, and failures that
end in one error instead of a hang."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import close_envs, preprocess_observation

from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.rollout.batch import compact_observation, expand_observation
from lerobot_pirl.rollout.workers import EnvWorkerError, ShardedVectorEnv, shard_bounds
from lerobot_pirl.runtime.config import EvalConfig, RolloutConfig, TrainConfig
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy
from lerobot_pirl.testing.collection import collect_samples
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp
from lerobot_pirl.testing.toy_envs import CountingEnv

NUM_ENVS = 5  # shards of 3 and 2 envs with two workers
TASK = "reach-v3"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_tiny_flow_mlp(tmp_path_factory.mktemp("policy") / "flow_mlp")


def make_cfg(policy_dir: Path, algorithm=None, **rollout) -> TrainConfig:
    policy = PreTrainedConfig.from_pretrained(policy_dir)
    policy.pretrained_path = policy_dir
    env = EnvConfig.get_choice_class("metaworld_state")(task=TASK, episode_length=12, image_size=16)
    return TrainConfig(
        policy=policy,
        env=env,
        algorithm=algorithm or PPOConfig(minibatch_size=8, update_epochs=1),
        rollout=RolloutConfig(num_envs=NUM_ENVS, sparse_reward=False, **rollout),
        eval=EvalConfig(batch_size=NUM_ENVS, num_workers=0),
    )


def collect_everything(cfg: TrainConfig, num_workers: int) -> dict:
    """Two continuous rollouts (episodes end and restart inside them), grouped episodic resets and a
    recorded evaluation round, with the policy's noise drawn in this process from a fixed seed."""
    policy, preprocessor, postprocessor = build_rl_policy(
        cfg, cfg.policy.pretrained_path, torch.device("cpu"), apply_cli_overrides=False
    )
    collector, envs = build_collector(
        cfg,
        policy,
        preprocessor,
        postprocessor,
        num_envs=NUM_ENVS,
        device="cpu",
        seed=11,
        num_workers=num_workers,
    )
    try:
        assert isinstance(collector.vec_env, ShardedVectorEnv) == (num_workers > 0)
        torch.manual_seed(0)
        continuous = [collector.collect(4, "flow_sde") for _ in range(2)]
        episodic = collector.collect_episodes([7, 7, 7, 8, 8], "flow_sde")  # two groups sharing seeds
        evaluation = collector.collect_episodes([100 + i for i in range(NUM_ENVS)], "ode", record=2)
        frames = [np.stack(f) for f in collector.recorded_frames]
        assert collector.recorded_envs == [0, NUM_ENVS // 2]  # spread over the env workers
        for env, env_frames in zip(collector.recorded_envs, frames, strict=True):
            assert len(env_frames) == int(evaluation.episode_lengths[env]) + 1  # reset frame, then each step
        tasks = collector.tasks
    finally:
        close_envs(envs)
    return {"batches": [*continuous, episodic, evaluation], "frames": frames, "tasks": tasks}


def test_two_workers_collect_exactly_what_one_process_collects(policy_dir):
    cfg = make_cfg(policy_dir)
    here, workers = collect_everything(cfg, 0), collect_everything(cfg, 2)
    assert workers["tasks"] == here["tasks"] and len(set(here["tasks"])) == 1 and here["tasks"][0]
    for ours, theirs in zip(here["batches"], workers["batches"], strict=True):
        for key, value in ours.observations.items():  # bit-identical observations, images included
            assert torch.equal(value, theirs.observations[key]), key
        for name in ("rewards", "terminated", "truncated", "mask", "episode_index", "logprobs", "values"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        for name in ("episode_returns", "episode_success", "episode_lengths", "episode_done"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert ours.env_steps == theirs.env_steps
    first, second, grouped, _ = here["batches"]
    assert (~first.mask).any() or (~second.mask).any()  # an episode ended and its env sat one out
    assert first.episode_done.any()
    state = grouped.observations["observation.environment_state"][0]  # (N, 39) first decision
    assert torch.equal(state[0], state[2]) and torch.equal(state[3], state[4])  # groups start alike
    assert not torch.equal(state[0], state[3])
    assert [f.shape for f in workers["frames"]] == [f.shape for f in here["frames"]]
    for ours, theirs in zip(here["frames"], workers["frames"], strict=True):
        assert np.array_equal(ours, theirs)  # the same video frames, reset frame first


def test_rollout_images_are_stored_as_uint8_and_expand_to_lerobots_floats(policy_dir):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    batch = preprocess_observation({"pixels": pixels, "agent_pos": np.zeros((3, 4), dtype=np.float32)})
    compact = compact_observation(batch)
    assert compact["observation.image"].dtype == torch.uint8
    assert compact["observation.state"].dtype == torch.float32  # not an image: kept
    assert torch.equal(expand_observation(compact)["observation.image"], batch["observation.image"])
    normalised = {"observation.image": batch["observation.image"] * 2 - 1}  # not k / 255: kept as is
    assert compact_observation(normalised)["observation.image"].dtype == torch.float32

    cfg = make_cfg(policy_dir)
    policy, preprocessor, postprocessor = build_rl_policy(
        cfg, policy_dir, torch.device("cpu"), apply_cli_overrides=False
    )
    collector, envs = build_collector(
        cfg, policy, preprocessor, postprocessor, num_envs=NUM_ENVS, device="cpu", num_workers=0
    )
    try:
        samples, batches, _ = collect_samples(cfg, collector)
    finally:
        close_envs(envs)
    stored = batches[0].observations["observation.image"]
    assert stored.dtype == torch.uint8 and stored.shape[1:] == (NUM_ENVS, 3, 16, 16)
    # The samples index the rollout's storage (no copy) and hand the policy float32 images.
    assert samples.observations["observation.image"].data_ptr() == stored.data_ptr()
    minibatch = samples.select(torch.arange(3), "cpu")
    rows = samples.observation_rows[:3]
    expected = stored.flatten(0, 1)[rows].float() / 255
    assert torch.equal(minibatch.observations["observation.image"], expected)


def test_shards_are_contiguous_and_balanced():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(32, 3) == [(0, 11), (11, 22), (22, 32)]
    assert shard_bounds(2, 2) == [(0, 1), (1, 2)]


def wait_until_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_worker_ends_the_call_with_one_error_and_no_orphans():
    vec_env = ShardedVectorEnv([CountingEnv] * 4, 2, description="counting envs")
    pids = [p.pid for p in vec_env._processes]
    vec_env.reset(seed=[0, 1, 2, 3])
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EnvWorkerError) as error:
        vec_env.step(np.zeros((4, 2), dtype=np.float32))
    assert str(error.value) == "env worker 1 (envs 2-3 of 4 counting envs) failed: killed by SIGKILL"
    assert all(wait_until_gone(pid) for pid in pids)  # the surviving worker was stopped too
    vec_env.close()  # closing again is harmless


class RaisingEnv(CountingEnv):
    def step(self, action):
        if self._step == 2:
            raise FloatingPointError("the simulator diverged")
        return super().step(action)


def test_an_exception_in_a_worker_names_the_worker_and_the_cause():
    vec_env = ShardedVectorEnv([CountingEnv, CountingEnv, RaisingEnv], 2, description="toy envs")
    pids = [p.pid for p in vec_env._processes]
    vec_env.reset(seed=[0, 1, 2])
    vec_env.step(np.zeros((3, 2), dtype=np.float32))
    vec_env.step(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(
        EnvWorkerError,
        match=r"env worker 1 \(envs 2-2 of 3 toy envs\) failed: "
        r"FloatingPointError: the simulator diverged",
    ):
        vec_env.step(np.zeros((3, 2), dtype=np.float32))
    assert all(wait_until_gone(pid) for pid in pids)


def test_the_trainer_saves_a_checkpoint_and_stops_when_a_worker_dies(policy_dir, tmp_path):
    from lerobot_pirl.runtime.trainer import Trainer

    cfg = make_cfg(
        policy_dir, PPOConfig(minibatch_size=8, update_epochs=1), decisions_per_env=2, num_workers=2
    )
    cfg.output_dir, cfg.iterations, cfg.eval.n_episodes, cfg.eval.videos = tmp_path / "run", 3, NUM_ENVS, 0
    trainer = Trainer(cfg)
    workers = trainer.source.collector.vec_env
    pids = [p.pid for p in workers._processes]
    os.kill(pids[0], signal.SIGKILL)
    result = trainer.run()
    assert result.stopped_by_error == (
        f"env worker 0 (envs 0-2 of {NUM_ENVS} metaworld_state {TASK}) failed: killed by SIGKILL "
        "(in iteration 1)"
    )
    assert result.checkpoint_dir is not None and (result.checkpoint_dir / "pretrained_model").is_dir()
    assert all(wait_until_gone(pid) for pid in pids)
