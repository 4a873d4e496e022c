from dataclasses import dataclass, field

import draccus
import pytest
import torch

from lerobot_pirl.algorithms.config import AlgorithmConfig, GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.grpo import grpo_samples
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import NonFiniteLossError, make_optimizer, policy_update
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.testing.toy_adapter import toy_rl_policy

T, N = 3, 4


def update(policy: FlowRLPolicy, samples, cfg: AlgorithmConfig) -> dict[str, float]:
    """policy_update with the config resolved for the policy's type, as the trainer's builder does."""
    cfg = cfg.resolved(policy.policy_type)
    return policy_update(policy, make_optimizer(policy, cfg), samples, cfg, "cpu")


def toy_rollout(policy: FlowRLPolicy, rewards: torch.Tensor, seed: int = 0) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(T, N, 3, generator=generator)
    samples = [
        policy.sample({"observation.state": states[t]}, policy.exploration, generator=generator)
        for t in range(T)
    ]
    terminated = torch.zeros(T, N, dtype=torch.bool)
    terminated[-1] = True  # one episode per env, ending at the last decision
    return RolloutBatch(
        observations={"observation.state": states},
        chains=torch.stack([s.chain for s in samples]),
        step_index=torch.stack([s.step_index for s in samples]),
        logprobs=torch.stack([s.logprob for s in samples]),
        values=torch.stack([s.value for s in samples]),
        rewards=rewards,
        terminated=terminated,
        truncated=torch.zeros(T, N, dtype=torch.bool),
        next_values=torch.zeros(T, N),
        mask=torch.ones(T, N, dtype=torch.bool),
        episode_index=torch.arange(N).expand(T, N).clone(),
        episode_returns=rewards.sum(0),
        episode_success=rewards.sum(0) > 0,
        episode_lengths=torch.full((N,), T * 2),
        episode_done=torch.ones(N, dtype=torch.bool),
    )


def sparse_rewards() -> torch.Tensor:
    rewards = torch.zeros(T, N)
    rewards[-1, :2] = 1.0  # envs 0 and 1 succeed
    return rewards


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_first_minibatch_ratio_is_one(exploration):
    cfg = PPOConfig(exploration=exploration, update_epochs=1, minibatch_size=T * N, micro_batch_size=None)
    policy = toy_rl_policy(exploration)
    batch = toy_rollout(policy, sparse_rewards())
    metrics = update(policy, ppo_samples(batch, cfg), cfg)
    # One minibatch, one epoch: every ratio was measured before the optimiser step.
    assert metrics["losses/approx_kl"] < 1e-10
    assert metrics["losses/clipfrac"] == 0.0
    assert abs(metrics["policy/ratio_max"] - 1.0) < 1e-5
    assert metrics["update/num_samples"] == T * N


def test_update_raises_log_prob_of_positive_advantage_decisions():
    cfg = PPOConfig(update_epochs=8, minibatch_size=T * N, micro_batch_size=4, actor_lr=3e-3, clip_ratio=10.0)
    policy = toy_rl_policy("flow_sde", value_head_hidden=None)
    batch = toy_rollout(policy, sparse_rewards())
    samples = ppo_samples(batch, cfg)
    before = batch.logprobs.flatten()
    update(policy, samples, cfg)
    with torch.no_grad():
        after = policy.evaluate(samples.observations, samples.chains, samples.step_index).logprob
    positive = samples.advantages > 0
    gain = after - before
    assert gain[positive].mean() > gain[~positive].mean() + 0.1


def test_non_finite_loss_stops_the_update_with_a_message():
    cfg = PPOConfig(update_epochs=1, minibatch_size=T * N, micro_batch_size=None)
    policy = toy_rl_policy("flow_sde")
    rewards = sparse_rewards()
    rewards[0, 0] = float("nan")
    batch = toy_rollout(policy, rewards)
    with pytest.raises(NonFiniteLossError, match="epoch 0, minibatch 0"):
        update(policy, ppo_samples(batch, cfg), cfg)


def test_target_kl_stops_the_epoch_loop_early():
    cfg = PPOConfig(
        update_epochs=20, minibatch_size=T * N, micro_batch_size=None, actor_lr=0.05, target_kl=1e-4
    )
    policy = toy_rl_policy("flow_sde")
    batch = toy_rollout(policy, sparse_rewards())
    metrics = update(policy, ppo_samples(batch, cfg), cfg)
    assert metrics["update/early_stopped"] == 1.0 and metrics["update/epochs"] < 20


def test_masked_decisions_never_enter_the_update():
    cfg = PPOConfig()
    policy = toy_rl_policy("flow_sde")
    batch = toy_rollout(policy, sparse_rewards())
    batch.mask[2, 3] = False
    batch.rewards[2, 3] = 1e6  # would dominate if it leaked
    samples = ppo_samples(batch, cfg)
    assert len(samples) == T * N - 1
    assert samples.returns.abs().max() < 10


def test_grpo_samples_give_each_decision_its_episode_advantage_and_drop_flat_groups():
    cfg = GRPOConfig(group_size=2)
    policy = toy_rl_policy("flow_sde", value_head_hidden=None)
    batch = toy_rollout(policy, sparse_rewards())  # group 0 = envs 0,1 both succeed; group 1 both fail
    samples, stats = grpo_samples(batch, cfg)
    assert len(samples) == 0 and stats["grpo/kept_group_fraction"] == 0.0

    rewards = torch.zeros(T, N)
    rewards[-1, 0] = 1.0  # group 0: one success one failure; group 1: all fail -> dropped
    batch = toy_rollout(policy, rewards)
    samples, stats = grpo_samples(batch, cfg)
    assert len(samples) == 2 * T and stats["grpo/kept_group_fraction"] == 0.5
    assert torch.allclose(samples.advantages.sort().values, torch.tensor([-1.0] * T + [1.0] * T), atol=1e-5)
    metrics = update(policy, samples, cfg)
    assert "losses/value_loss" not in metrics


def test_grpo_statistics_cover_every_batch_of_the_iteration():
    """Trainer and learner both ask the algorithm: the kept-group fraction is over all rounds/actors."""
    from lerobot_pirl.algorithms.base import make_algorithm

    algorithm = make_algorithm(GRPOConfig(group_size=2))
    policy = toy_rl_policy("flow_sde", value_head_hidden=None)
    mixed = torch.zeros(T, N)
    mixed[-1, 0] = 1.0  # one of two groups mixed
    batches = [toy_rollout(policy, mixed), toy_rollout(policy, sparse_rewards(), seed=1)]  # 1/2, then 0/2
    samples, stats = algorithm.update_samples(batches)
    assert stats == {"grpo/kept_group_fraction": 0.25}
    assert len(samples) == 2 * T  # only the mixed group's decisions, from the first batch
    assert algorithm.update_samples([]) == (None, {})


@dataclass
class _Wrapper:
    algorithm: AlgorithmConfig = field(default_factory=PPOConfig)


def test_configs_parse_with_draccus_and_reject_bad_values():
    args = ["--algorithm.type=grpo", "--algorithm.exploration=flow_noise", "--algorithm.group_size=4"]
    cfg = draccus.parse(_Wrapper, args=args).algorithm
    assert isinstance(cfg, GRPOConfig) and cfg.exploration == "flow_noise" and cfg.group_size == 4
    ppo = draccus.parse(_Wrapper, args=["--algorithm.type=ppo"]).algorithm
    reference = (ppo.clip_ratio, ppo.gamma, ppo.gae_lambda, ppo.critic_lr, ppo.noise_level)
    assert reference == (0.2, 0.99, 0.95, 1e-4, 0.5)
    sizes = ("actor_lr", "minibatch_size", "update_epochs")
    reference, small = ppo.resolved("pi0"), ppo.resolved("flow_mlp")
    assert [getattr(reference, name) for name in sizes] == [5e-6, 2048, 4]  # RLinf's π0 LIBERO recipe
    assert [getattr(small, name) for name in sizes] == [3e-5, 400, 10]
    explicit = PPOConfig(actor_lr=1e-3, minibatch_size=64, update_epochs=2).resolved("flow_mlp")
    assert [getattr(explicit, name) for name in sizes] == [1e-3, 64, 2]
    with pytest.raises(ValueError):
        PPOConfig(exploration="flow_magic")
    with pytest.raises(ValueError):
        GRPOConfig(group_size=1)


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        (PPOConfig, "value_features", "foo"),
        (PPOConfig, "noise_level", -1.0),
        (PPOConfig, "clip_ratio", 0.0),
        (PPOConfig, "value_clip", 0.0),
        (PPOConfig, "huber_delta", -1.0),
        (PPOConfig, "noise_std_max", 0.01),
        (PPOConfig, "gae_lambda", 1.5),
        (GRPOConfig, "target_kl", 0.0),
        (GRPOConfig, "micro_batch_size", 0),
    ],
)
def test_every_bad_algorithm_value_names_its_flag(config, field, value):
    with pytest.raises(ValueError, match=f"--algorithm.{field}"):
        config(**{field: value})
