import gymnasium as gym
import numpy as np
import pytest
import torch

from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.testing.toy_adapter import toy_rl_policy
from lerobot_pirl.testing.toy_envs import CountingEnv

# CountingEnv: seeds that are multiples of 3 succeed at step 5, the others truncate at step 9.
# The toy policy executes C = 2 actions per decision, so success lands in decision 2 (steps 5-6)
# and truncation in decision 4 (steps 9-10).


def make_collector(num_envs=2, **kwargs) -> ChunkCollector:
    vec_env = gym.vector.SyncVectorEnv([CountingEnv for _ in range(num_envs)])
    policy = toy_rl_policy("flow_sde")
    with torch.no_grad():  # a critic whose value depends on the observation, to see what it bootstraps on
        policy.value_head[-1].weight.normal_()
        policy.value_head[-1].bias.fill_(0.3)
    return ChunkCollector(vec_env, policy, **kwargs)


def value_of(collector: ChunkCollector, step: float, seed: float) -> float:
    return float(collector.policy.value({"observation.state": torch.tensor([[step, seed, 0.0]])})[0])


def test_episodic_rollout_sums_rewards_masks_after_the_end_and_bootstraps_only_truncations():
    collector = make_collector(sparse_reward=False)
    batch = collector.collect_episodes([0, 1], "flow_sde")
    assert batch.chains.shape[:2] == (5, 2)  # env 1 runs 5 decisions, then everything is finished
    assert batch.mask[:, 0].tolist() == [True, True, True, False, False]
    assert batch.mask[:, 1].all()
    # Dense reward 0.1 per step, counted only while the episode runs.
    assert torch.allclose(batch.rewards[:3, 0], torch.tensor([0.2, 0.2, 0.1]))
    assert torch.allclose(batch.rewards[:, 1], torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1]))
    assert batch.terminated[:, 0].tolist() == [False, False, True, False, False]  # success ends it
    assert batch.truncated[:, 1].tolist() == [False, False, False, False, True]
    assert not batch.truncated[:, 0].any() and not batch.terminated[:, 1].any()
    assert batch.next_values[2, 0] == 0.0  # termination: no bootstrap
    assert batch.next_values[4, 1] == pytest.approx(value_of(collector, 9.0, 1.0), abs=1e-6)
    assert torch.allclose(batch.next_values[:2, 0], batch.values[1:3, 0])  # inside the episode: V(o_t+1)
    assert batch.episode_success.tolist() == [True, False]
    assert batch.episode_lengths.tolist() == [5, 9]
    assert torch.allclose(batch.episode_returns, torch.tensor([0.5, 0.9]))
    assert batch.env_steps == 14
    assert batch.episode_index[:, 0].tolist() == [0, 0, 0, -1, -1]
    # The truncated env froze: the simulator never ran the rest of its last chunk.
    assert len(collector.vec_env.envs[1].unwrapped.actions) == 9


def test_dense_rewards_are_scaled():
    collector = make_collector(sparse_reward=False, reward_scale=0.5)
    batch = collector.collect_episodes([0, 1], "flow_sde")
    assert torch.allclose(batch.rewards[:3, 0], torch.tensor([0.1, 0.1, 0.05]))


def test_sparse_reward_is_paid_once_at_the_first_success():
    collector = make_collector()  # sparse by default
    batch = collector.collect_episodes([0, 3], "flow_sde")
    assert batch.rewards[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert batch.episode_returns.tolist() == [1.0, 1.0]


def test_continuous_rollout_restarts_finished_envs_with_fresh_seeds_one_decision_later():
    collector = make_collector(seed=0)
    first = collector.collect(6, "flow_sde")
    state = first.observations["observation.state"]  # (T, N, 3): (step, seed, 0)
    # env 0: seed 0 succeeds in decision 2, sits out decision 3 while it is reset with seed 2, and runs
    # its new episode from decision 4.
    assert state[:, 0, 1].tolist() == [0, 0, 0, 0, 2, 2]
    assert state[:, 0, 0].tolist() == [0, 2, 4, 6, 0, 2]  # decision 3 sees the frozen final obs
    # env 1: seed 1 truncates in decision 4, sits out decision 5 (reset with seed 3 after it).
    assert state[:, 1, 1].tolist() == [1, 1, 1, 1, 1, 1]
    expected_mask = torch.ones(6, 2, dtype=torch.bool)
    expected_mask[3, 0] = expected_mask[5, 1] = False
    assert torch.equal(first.mask, expected_mask)
    assert first.terminated[2, 0] and first.truncated[4, 1]
    assert not (first.terminated | first.truncated)[~first.mask].any()  # a sat-out row ends nothing
    assert first.rewards[3, 0] == 0.0 and first.rewards[5, 1] == 0.0
    assert first.next_values[4, 1] == pytest.approx(value_of(collector, 9.0, 1.0), abs=1e-6)
    # the last decision bootstraps on the observation the rollout stopped at
    assert first.next_values[5, 0] == pytest.approx(value_of(collector, 4.0, 2.0), abs=1e-6)
    assert first.episode_done.tolist() == [True, True, False, False]
    assert first.episode_index[:, 0].tolist() == [0, 0, 0, -1, 2, 2]
    assert first.episode_index[:, 1].tolist() == [1, 1, 1, 1, 1, -1]
    assert first.env_steps == int(first.episode_lengths.sum())

    # The running episodes continue in the next rollout with their partial returns and lengths.
    second = collector.collect(3, "flow_sde")
    assert second.observations["observation.state"][0, 1].tolist() == [0.0, 3.0, 0.0]
    assert second.observations["observation.state"][0, 0].tolist() == [4.0, 2.0, 0.0]
    # seed 3 succeeds at its step 5, i.e. in the third decision of this rollout
    assert second.terminated[2, 1] and second.episode_success[1]
    assert second.truncated[2, 0] and second.episode_lengths.tolist()[:2] == [9, 5]  # 4 steps + 5 now
    assert second.mask.all()


def test_actions_reach_the_env_postprocessed_and_chunked():
    def postprocessor(actions):
        return actions * 0 + 0.25  # every env action becomes 0.25

    collector = make_collector(num_envs=1, postprocessor=postprocessor)
    collector.collect_episodes([1], "ode")
    actions = np.stack(collector.vec_env.envs[0].unwrapped.actions)
    assert actions.shape == (9, 2) and np.all(actions == 0.25)


def test_a_vector_env_that_cannot_freeze_is_refused():
    class Opaque(gym.vector.VectorEnv):
        num_envs = 1

    with pytest.raises(TypeError, match="freeze"):
        ChunkCollector(Opaque(), toy_rl_policy())


def test_seeded_episodes_draw_their_initial_noise_from_their_own_generator():
    # Reproducible evaluation (issue 17): an episode's chains do not depend on the batch it runs in or on
    # the global RNG, only on its env seed and noise seed.
    pair = make_collector(num_envs=2).collect_episodes([0, 1], "ode", noise_seeds=[10, 11])
    torch.manual_seed(1234)
    alone = make_collector(num_envs=1).collect_episodes([1], "ode", noise_seeds=[11])
    torch.testing.assert_close(alone.chains[:, 0], pair.chains[:, 1], rtol=0, atol=0)
    chunk_size, action_dim = pair.chains.shape[-2:]
    generator = torch.Generator().manual_seed(11)
    first_two = torch.stack([torch.randn((chunk_size, action_dim), generator=generator) for _ in range(2)])
    torch.testing.assert_close(pair.chains[:2, 1, 0], first_two, rtol=0, atol=0)  # x_0 of decisions 0, 1
    with pytest.raises(ValueError, match="one noise seed per env"):
        make_collector(num_envs=2).collect_episodes([0, 1], "ode", noise_seeds=[10])
