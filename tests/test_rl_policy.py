import math

import pytest
import torch
from torch.distributions import Normal

from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.exploration import ode_step, sde_step, time_grid
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.testing.toy_adapter import toy_rl_policy

BATCH = 16


def observations(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"observation.state": torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(seed))}


def make_policy(exploration: str, **kwargs) -> FlowRLPolicy:
    return toy_rl_policy(exploration, **kwargs)


def test_ode_sample_is_euler_over_the_adapter_velocity():
    policy = make_policy("flow_sde")
    noise = torch.randn(BATCH, 4, 3)
    sample = policy.sample(observations(), "ode", noise=noise)
    with torch.no_grad():
        context = policy.adapter.encode(observations())
        x = noise
        for t in time_grid(4)[:-1]:
            velocity, _ = policy.adapter.velocity(context, x, t.expand(BATCH))
            x = x - 0.25 * velocity
    assert torch.allclose(sample.chain[:, -1], x, atol=1e-6)
    assert torch.equal(sample.actions, sample.chain[:, -1, :2, :2])  # C = 2 executed, D = 2 real dims
    assert torch.all(sample.logprob == 0)


def test_hybrid_flow_sde_has_exactly_one_stochastic_step_and_its_gaussian_log_prob():
    policy = make_policy("flow_sde", noise_level=0.5)
    generator = torch.Generator().manual_seed(0)
    sample = policy.sample(observations(), "flow_sde", generator=generator)
    grid = time_grid(4)
    with torch.no_grad():
        context = policy.adapter.encode(observations())
        for k in range(4):
            t = grid[k].expand(BATCH)
            velocity, _ = policy.adapter.velocity(context, sample.chain[:, k], t)
            ode_next = ode_step(sample.chain[:, k], velocity, 0.25)
            is_ode = (ode_next - sample.chain[:, k + 1]).abs().flatten(1).max(1).values < 1e-6
            assert torch.equal(is_ode, sample.step_index != k)
            mean, std = sde_step(sample.chain[:, k], velocity, t, 0.25, 0.5)
            rows = sample.step_index == k
            expected = Normal(mean, std).log_prob(sample.chain[:, k + 1])[:, :2, :2].sum((1, 2))
            assert torch.allclose(sample.logprob[rows], expected[rows], atol=1e-5)
    assert set(sample.step_index.tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_recomputed_log_probs_equal_the_rollout_ones(exploration):
    policy = make_policy(exploration)
    sample = policy.sample(observations(), exploration, generator=torch.Generator().manual_seed(1))
    evaluation = policy.evaluate(observations(), sample.chain, sample.step_index)
    ratio = torch.exp(evaluation.logprob - sample.logprob)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    assert torch.allclose(evaluation.value, sample.value)
    assert evaluation.logprob.requires_grad


def test_flow_sde_update_recomputes_one_step_and_flow_noise_all_steps():
    for exploration, expected_calls in (("flow_sde", BATCH), ("flow_noise", 4 * BATCH)):
        policy = make_policy(exploration)
        sample = policy.sample(observations(), exploration)
        policy.adapter.velocity_calls = 0
        policy.evaluate(observations(), sample.chain, sample.step_index)
        assert policy.adapter.velocity_calls == expected_calls


def test_flow_noise_std_stays_in_bounds_even_with_a_wild_noise_head():
    policy = make_policy("flow_noise", noise_std_min=0.05, noise_std_max=0.2)
    with torch.no_grad():
        for p in policy.noise_head.parameters():
            p.normal_(0, 50.0)
    sample = policy.sample(observations(), "flow_noise")
    evaluation = policy.evaluate(observations(), sample.chain, sample.step_index)
    noise_std = evaluation.noise_std.detach()
    assert float(noise_std.min()) >= 0.05 - 1e-6 and float(noise_std.max()) <= 0.2 + 1e-6
    context = policy.adapter.encode(observations())
    _, hidden = policy.adapter.velocity(context, sample.chain[:, 0], torch.ones(BATCH))
    std = policy._noise_std(hidden).detach()
    assert float(std.min()) >= 0.05 - 1e-6 and float(std.max()) <= 0.2 + 1e-6


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_padding_and_unexecuted_tail_of_the_chain_do_not_change_log_probs(exploration):
    policy = make_policy(exploration)
    sample = policy.sample(observations(), exploration)
    # Perturb the padded dim (A - D) and the unexecuted tail (H - C) of the one chain element whose
    # density is measured but which feeds no velocity: x_{k*+1} for Flow-SDE, x_K for Flow-Noise.
    rows = torch.arange(BATCH)
    target = sample.step_index + 1 if exploration == "flow_sde" else torch.full((BATCH,), 4)
    chain = sample.chain.clone()
    chain[rows, target, :, 2:] += 10.0
    chain[rows, target, 2:, :] += 10.0
    evaluation = policy.evaluate(observations(), chain, sample.step_index)
    assert torch.allclose(evaluation.logprob, sample.logprob, atol=1e-5)
    chain[rows, target, 0, 0] += 1.0  # an executed element does change it
    assert not torch.allclose(
        policy.evaluate(observations(), chain, sample.step_index).logprob, sample.logprob
    )


def test_value_head_input_is_detached_by_default():
    policy = make_policy("flow_sde")
    sample = policy.sample(observations(), "flow_sde")
    evaluation = policy.evaluate(observations(), sample.chain, sample.step_index)
    evaluation.value.sum().backward()
    assert all(p.grad is None for p in policy.adapter.parameters())
    assert all(p.grad is not None for p in policy.value_head.parameters())

    attached = make_policy("flow_sde", detach_value_input=False)
    evaluation = attached.evaluate(observations(), sample.chain, sample.step_index)
    evaluation.value.sum().backward()
    assert attached.adapter.policy.encoder.weight.grad is not None


def test_freeze_options_and_parameter_groups():
    policy = make_policy("flow_noise", freeze_trunk=True)
    actor = {id(p) for p in policy.actor_parameters()}
    assert not any(id(p) in actor for p in policy.adapter.policy.encoder.parameters())
    assert all(id(p) in actor for p in policy.noise_head.parameters())
    assert {id(p) for p in policy.critic_parameters()} == {id(p) for p in policy.value_head.parameters()}
    no_critic = make_policy("flow_sde", value_head_hidden=None)
    assert no_critic.critic_parameters() == [] and no_critic.value_head is None
    assert torch.all(no_critic.sample(observations(), "flow_sde").value == 0)


def test_heads_round_trip_through_their_state_dict():
    policy = make_policy("flow_noise")
    with torch.no_grad():
        for p in [*policy.noise_head.parameters(), *policy.value_head.parameters()]:
            p.normal_()
    other = make_policy("flow_noise")
    other.load_heads_state_dict(policy.heads_state_dict())
    for a, b in zip(policy.heads_state_dict().values(), other.heads_state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_options_are_refused():
    with pytest.raises(ValueError):  # the settings are the algorithm config's, validated there
        make_policy("flow_magic")
    with pytest.raises(ValueError):
        PPOConfig(noise_std_min=0.2, noise_std_max=0.1)
    with pytest.raises(ValueError):
        make_policy("flow_sde").sample(observations(), "flow_noise")


def _randomised_value_head(policy: FlowRLPolicy) -> FlowRLPolicy:
    with torch.no_grad():
        for p in policy.value_head.parameters():  # the last layer starts at zero: V = 0 everywhere
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return policy


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_expert_feature_critic_is_the_mean_value_over_the_denoising_steps(exploration):
    """The reference's π0 critic: V = mean over the K steps of the value of the pooled expert states at
    rollout (and for a bootstrap value); at update, of the steps recomputed (k* for Flow-SDE, all K for
    Flow-Noise)."""
    policy = _randomised_value_head(make_policy(exploration, value_features="expert"))
    noise = torch.randn(BATCH, 4, 3, generator=torch.Generator().manual_seed(3))
    sample = policy.sample(
        observations(), exploration, noise=noise, generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        context = policy.adapter.encode(observations())
        grid = time_grid(4)

        def step_value(k: int, x_k: torch.Tensor) -> torch.Tensor:
            _, hidden = policy.adapter.velocity(context, x_k, grid[k].expand(BATCH))
            return policy.value_head(hidden.mean(1)).squeeze(-1)  # (B,)

        by_step = torch.stack([step_value(k, sample.chain[:, k]) for k in range(4)], 1)  # (B, K)
    assert torch.allclose(sample.value, by_step.mean(1), atol=1e-6)
    assert by_step.std(1).min() > 1e-4  # the steps do differ: a mean, not one step's value

    evaluation = policy.evaluate(observations(), sample.chain, sample.step_index)
    if exploration == "flow_sde":
        expected = by_step[torch.arange(BATCH), sample.step_index]
    else:
        expected = by_step.mean(1)
    assert torch.allclose(evaluation.value, expected, atol=1e-6)

    # The bootstrap value runs the deterministic chain from the noise it is given, as an ODE rollout.
    ode = policy.sample(observations(), "ode", noise=noise)
    assert torch.allclose(policy.value(observations(), noise=noise), ode.value, atol=1e-6)


def test_flow_noise_entropy_is_per_element_mean_over_the_chain_terms_in_closed_form():
    # The noise head's zero last layer gives every element the std sqrt(min·max), the geometric middle.
    policy = make_policy("flow_noise", noise_std_min=0.08, noise_std_max=0.16)
    sample = policy.sample(observations(), "flow_noise")
    evaluation = policy.evaluate(observations(), sample.chain, sample.step_index)
    half_log_2pi_e = 0.5 * math.log(2 * math.pi * math.e)
    # mean over the K + 1 = 5 terms: the prior N(0, 1), then K = 4 transitions of std sqrt(0.08 · 0.16)
    expected = half_log_2pi_e + 4 / 5 * math.log(math.sqrt(0.08 * 0.16))
    assert torch.allclose(evaluation.entropy, torch.full((BATCH,), expected), atol=1e-6)
