import math
from dataclasses import dataclass, field

import draccus
import pytest
import torch

from lerobot_pirl.algorithms import update as update_module
from lerobot_pirl.algorithms.base import make_algorithm
from lerobot_pirl.algorithms.config import AlgorithmConfig, GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.grpo import grpo_samples
from lerobot_pirl.algorithms.losses import clipped_surrogate_loss
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import (
    NonFiniteLossError,
    make_optimizer,
    policy_update,
    standardized_advantages,
)
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
        episode_task=torch.zeros(N, dtype=torch.int64),
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
    # returns (1, 0): mean 0.5, Bessel std sqrt(0.5), so Â = ±0.5 / sqrt(0.5) = ±1/sqrt(2)
    expected = torch.tensor([-1.0] * T + [1.0] * T) / 2**0.5
    assert torch.allclose(samples.advantages.sort().values, expected, atol=1e-5)
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


def test_critics_and_loss_conventions_resolve_to_the_reference_per_policy_type():
    critic = ("value_features", "value_head_hidden", "value_head_activation")
    by_type = {kind: [getattr(PPOConfig().resolved(kind), name) for name in critic] for kind in VALUE_HEADS}
    assert by_type == VALUE_HEADS  # RLinf's ValueHead sizes for pi0 (expert, 1024-wide) and pi05 (prefix)
    explicit = PPOConfig(value_features="prefix", value_head_hidden=(64,)).resolved("pi0")
    assert [getattr(explicit, name) for name in critic] == ["prefix", (64,), "relu"]
    with pytest.raises(ValueError, match="resolve the algorithm config"):
        PPOConfig().policy_settings()
    grpo, ppo = GRPOConfig(), PPOConfig()
    assert (grpo.normalize_advantages, grpo.loss_weighting) == (False, "episode")
    assert (ppo.normalize_advantages, ppo.loss_weighting) == (True, "decision")


VALUE_HEADS = {
    "pi0": ["expert", (512, 256, 128), "relu"],
    "pi05": ["prefix", (1024, 512, 256), "relu"],
    "smolvla": ["expert", (512, 256, 128), "relu"],
    "flow_mlp": ["prefix", (256, 256), "gelu"],
}


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        (PPOConfig, "value_features", "foo"),
        (PPOConfig, "noise_level", -1.0),
        (PPOConfig, "noise_level", 0.0),
        (PPOConfig, "noise_level", float("inf")),
        (PPOConfig, "loss_weighting", "token"),
        (PPOConfig, "value_head_activation", "swish"),
        (GRPOConfig, "advantage_eps", -1.0),
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


def episodes_batch(lengths: list[int], returns: list[float]) -> RolloutBatch:
    """One whole episode per env: env n runs lengths[n] decisions (then masked) and returns returns[n]."""
    num_envs, horizon = len(lengths), max(lengths)
    t = torch.arange(horizon).view(-1, 1)  # (T, 1)
    length = torch.tensor(lengths).view(1, -1)  # (1, N)
    mask = t < length  # (T, N)
    last = t == length - 1
    return RolloutBatch(
        observations={"observation.state": torch.zeros(horizon, num_envs, 3)},
        chains=torch.zeros(horizon, num_envs, 5, 4, 3),
        step_index=torch.zeros(horizon, num_envs, dtype=torch.long),
        logprobs=torch.zeros(horizon, num_envs),
        values=torch.zeros(horizon, num_envs),
        rewards=torch.where(last, torch.tensor(returns).view(1, -1), torch.zeros(())),
        terminated=last & (torch.tensor(returns).view(1, -1) > 0),
        truncated=last & (torch.tensor(returns).view(1, -1) <= 0),
        next_values=torch.zeros(horizon, num_envs),
        mask=mask,
        episode_index=torch.where(mask, torch.arange(num_envs).expand(horizon, num_envs), -1),
        episode_returns=torch.tensor(returns),
        episode_success=torch.tensor(returns) > 0,
        episode_lengths=torch.tensor(lengths) * 4,
        episode_done=torch.ones(num_envs, dtype=torch.bool),
        episode_task=torch.zeros(num_envs, dtype=torch.int64),
    )


def test_grpo_advantages_the_loss_sees_keep_the_group_formula_signs():
    # Two groups of 4 sharing a reset each; successes end after 1 decision, failures run all 20.
    # Group 0 = (1, 0, 0, 0), group 1 = (1, 1, 1, 0): Bessel std 0.5 in both, so Â = (1.5, -0.5, -0.5, -0.5)
    # and (0.5, 0.5, 0.5, -1.5). The decision-weighted batch mean is (1.5 - 30 + 1.5 - 30) / 84 = -0.68.
    returns = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    batch = episodes_batch([1 if r > 0 else 20 for r in returns], returns)
    cfg = GRPOConfig(group_size=4)
    samples, _ = make_algorithm(cfg).update_samples([batch])
    group_formula = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5])
    per_decision = group_formula[batch.episode_index.flatten()[samples.observation_rows]]  # (M,)
    assert torch.allclose(samples.advantages, per_decision, atol=1e-5)
    seen = standardized_advantages(samples, cfg.resolved("flow_mlp")).advantages
    assert torch.equal(seen, samples.advantages)  # GRPO's default: the group standardisation only
    assert torch.all(torch.sign(seen) == torch.sign(per_decision))
    # Re-normalised over the batch (the old default), group 0's failures turn positive: -0.5 -> +0.33.
    renormalized = standardized_advantages(samples, GRPOConfig(group_size=4, normalize_advantages=True))
    flipped = torch.sign(renormalized.advantages) != torch.sign(per_decision)
    assert flipped.any() and bool((per_decision[flipped] == -0.5).all())


@pytest.mark.parametrize(("loss_weighting", "expected_ratio"), [("episode", 1.0), ("decision", 4.0)])
def test_episode_weighting_gives_every_episode_the_same_total_weight(loss_weighting, expected_ratio):
    # One 2-decision and one 8-decision episode, |Â| = 1 for both (a group of 2: returns 1 and 0).
    batch = episodes_batch([2, 8], [1.0, 0.0])
    cfg = GRPOConfig(group_size=2, loss_weighting=loss_weighting)
    samples, _ = make_algorithm(cfg).update_samples([batch])
    assert torch.allclose(samples.advantages.abs(), samples.advantages.abs()[0].expand(10))
    assert math.isclose(float(samples.loss_weights.mean()), 1.0, rel_tol=1e-6)
    # The loss's gradient per decision at ratio 1 is -w·Â / M: what each episode pulls with in total.
    logprob = torch.zeros(len(samples), requires_grad=True)
    loss, _ = clipped_surrogate_loss(
        logprob, torch.zeros(len(samples)), samples.advantages, 0.2, samples.loss_weights
    )
    loss.backward()
    episode = batch.episode_index.flatten()[samples.observation_rows]  # (M,)
    pull = torch.zeros(2).index_add_(0, episode, logprob.grad.abs())
    assert torch.allclose(pull[1] / pull[0], torch.tensor(expected_ratio), atol=1e-5)


def test_the_update_passes_the_samples_loss_weights_to_the_loss(monkeypatch):
    policy = toy_rl_policy("flow_sde", value_head_hidden=None)
    rewards = torch.zeros(T, N)
    rewards[0, 0] = 1.0  # group 0 = envs 0 (succeeds) and 1 (fails); group 1 fails and is dropped
    batch = toy_rollout(policy, rewards)
    batch.mask[1:, 0] = False  # env 0's episode: 1 decision, env 1's 3
    batch.episode_index[1:, 0] = -1
    cfg = GRPOConfig(group_size=2, update_epochs=1, minibatch_size=T * N, micro_batch_size=None)
    samples, _ = make_algorithm(cfg).update_samples([batch])
    seen = []

    def recording_loss(logprob, old_logprob, advantages, clip_ratio, weights=None):
        seen.append(weights)
        return clipped_surrogate_loss(logprob, old_logprob, advantages, clip_ratio, weights)

    monkeypatch.setattr(update_module, "clipped_surrogate_loss", recording_loss)
    update(policy, samples, cfg)
    assert len(seen) == 1 and torch.equal(seen[0].sort().values, samples.loss_weights.sort().values)
    assert not torch.allclose(samples.loss_weights, torch.ones(len(samples)))  # 1 vs 3 decisions differ


def test_kl_estimators_and_both_clip_fractions_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 1.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_ratio = ratio.log()
    _, stats = clipped_surrogate_loss(log_ratio, torch.zeros(4), advantages, 0.2)
    assert math.isclose(float(stats["approx_kl_k1"]), float(-log_ratio.mean()), rel_tol=1e-6)
    assert math.isclose(float(stats["approx_kl"]), float(((ratio - 1) - log_ratio).mean()), rel_tol=1e-6)
    # CleanRL: |r - 1| > 0.2 for r = 1.5, 0.5, 1.5. The loss takes the clipped branch only where clipping
    # binds for Â's sign: r = 1.5 with Â > 0 (r = 0.5 with Â > 0 and r = 1.5 with Â < 0 stay unclipped).
    assert stats["clipped"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert stats["clipped_active"].tolist() == [1.0, 0.0, 0.0, 0.0]
