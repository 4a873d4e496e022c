import math

import pytest
import torch
from torch.distributions import Normal

from lerobot_pirl.exploration import (
    bounded_noise_std,
    executed_mask,
    flow_noise_chain_entropy,
    flow_noise_chain_log_prob,
    gaussian_entropy,
    gaussian_log_prob,
    ode_step,
    sample_stochastic_step,
    sde_sigma,
    sde_step,
    time_grid,
)


def test_time_grid_runs_from_noise_to_action():
    grid = time_grid(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        time_grid(0)


def test_sde_with_zero_noise_level_is_the_ode_step():
    torch.manual_seed(0)
    x, v = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    for t_value in time_grid(4)[:-1]:
        t = t_value.expand(5)
        mean, std = sde_step(x, v, t, 0.25, noise_level=0.0)
        assert torch.equal(mean, ode_step(x, v, 0.25))
        assert torch.all(std == 0)


def test_sde_sigma_and_mean_match_the_formula_by_hand():
    # K = 4, a = 0.5. At t0 = 1 the denominator is 1 - t1 = 0.25: sigma0 = 0.5 * sqrt(4) = 1.
    t = torch.tensor([1.0, 0.5])
    sigma = sde_sigma(t, 0.25, 0.5)
    assert torch.allclose(sigma, torch.tensor([1.0, 0.5]))
    x = torch.full((2, 1, 1), 2.0)
    v = torch.full((2, 1, 1), -1.0)
    mean, std = sde_step(x, v, t, 0.25, 0.5)
    # t = 1:   drift = v + 1²/2 · (x + 0·v) = -1 + 1 = 0       -> mean = 2
    # t = 0.5: drift = v + 0.25/1 · (x + 0.5·v) = -1 + 0.375 -> mean = 2 + 0.25·0.625 = 2.15625
    assert torch.allclose(mean.flatten(), torch.tensor([2.0, 2.15625]))
    assert torch.allclose(std.flatten(), torch.tensor([0.5, 0.25]))


def test_bounded_noise_std_stays_inside_its_bounds():
    raw = torch.cat([torch.randn(1000) * 100, torch.tensor([-1e9, 1e9, 0.0])])
    std = bounded_noise_std(raw, 0.08, 0.16)
    assert std.min() >= 0.08 - 1e-7 and std.max() <= 0.16 + 1e-7
    assert math.isclose(
        float(bounded_noise_std(torch.tensor(0.0), 0.08, 0.16)), math.sqrt(0.08 * 0.16), rel_tol=1e-6
    )
    assert math.isclose(float(std[-3]), 0.08, rel_tol=1e-5) and math.isclose(
        float(std[-2]), 0.16, rel_tol=1e-5
    )


def test_gaussian_log_prob_and_entropy_equal_torch_normal_on_executed_elements():
    torch.manual_seed(1)
    x, mean = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    std = torch.rand(3, 5, 4) + 0.1
    mask = executed_mask(5, 4, n_executed=2, real_action_dim=3)
    expected = Normal(mean[:, :2, :3], std[:, :2, :3]).log_prob(x[:, :2, :3]).sum((1, 2))
    assert torch.allclose(gaussian_log_prob(x, mean, std, mask), expected, atol=1e-5)
    # The entropy is per executed element (the mean over the C x D = 6), the reference's normalisation.
    expected_entropy = Normal(mean[:, :2, :3], std[:, :2, :3]).entropy().mean((1, 2))
    assert torch.allclose(gaussian_entropy(std, mask), expected_entropy, atol=1e-5)
    scalar_std = torch.full((3, 1, 1), 0.3)
    assert torch.allclose(
        gaussian_entropy(scalar_std, mask), torch.full((3,), 0.5 * math.log(2 * math.pi * math.e * 0.09))
    )


def test_flow_noise_chain_entropy_is_the_reference_mean_over_chain_terms_and_elements():
    # A hand-built chain: K = 2 transitions, std 0.1 then 0.2 on every element; H = 3, A = 2, C = 2, D = 1.
    stds = torch.stack([torch.full((4, 3, 2), 0.1), torch.full((4, 3, 2), 0.2)], 1)  # (B, K, H, A)
    stds[:, :, 2:, :] = 5.0  # the unexecuted tail and the padded dim never count
    stds[:, :, :, 1] = 5.0
    mask = executed_mask(3, 2, n_executed=2, real_action_dim=1)
    # The reference (RLinf's openpi model, joint log-prob): ½·log(2πe·σ²) of the prior N(0, 1) and of each
    # transition, then the mean over the K + 1 = 3 terms and over the C x D elements.
    half_log_2pi_e = 0.5 * math.log(2 * math.pi * math.e)
    expected = half_log_2pi_e + (math.log(0.1) + math.log(0.2)) / 3
    assert torch.allclose(flow_noise_chain_entropy(stds, mask), torch.full((4,), expected), atol=1e-6)
    # Summed over the C x D = 2 elements and averaged over the K transitions only, as before, the same
    # bonus weighed log σ C·D·(K+1)/K = 3 times as much: the gradients differ by that factor.
    stds = stds.requires_grad_()
    flow_noise_chain_entropy(stds, mask).sum().backward()
    assert torch.allclose(stds.grad[:, 0, 0, 0], torch.full((4,), 1 / (3 * 2 * 0.1)))


def test_padded_dims_and_unexecuted_tail_never_change_a_log_prob():
    torch.manual_seed(2)
    x, mean, std = torch.randn(2, 6, 5), torch.randn(2, 6, 5), torch.rand(2, 6, 5) + 0.2
    mask = executed_mask(6, 5, n_executed=3, real_action_dim=2)
    reference = gaussian_log_prob(x, mean, std, mask)
    perturbed = x.clone()
    perturbed[:, 3:] += 100.0  # the unexecuted tail of the chunk
    perturbed[:, :, 2:] -= 100.0  # padded action dims
    assert torch.equal(gaussian_log_prob(perturbed, mean, std, mask), reference)
    changed = x.clone()
    changed[:, 0, 0] += 1.0  # an executed element does change it
    assert not torch.allclose(gaussian_log_prob(changed, mean, std, mask), reference)


def test_flow_noise_chain_log_prob_is_the_mean_over_chain_terms_summed_over_elements():
    torch.manual_seed(3)
    batch, steps, horizon, width = 2, 3, 4, 2
    chain = torch.randn(batch, steps + 1, horizon, width)
    means = torch.randn(batch, steps, horizon, width)
    stds = torch.rand(batch, steps, horizon, width) + 0.1
    mask = executed_mask(horizon, width, n_executed=2, real_action_dim=1)
    terms = [Normal(0.0, 1.0).log_prob(chain[:, 0])]
    terms += [Normal(means[:, k], stds[:, k]).log_prob(chain[:, k + 1]) for k in range(steps)]
    per_element = torch.stack(terms, 1).mean(1)  # mean over K+1 terms
    expected = per_element[:, :2, :1].sum((1, 2))  # summed over executed C×D
    assert torch.allclose(flow_noise_chain_log_prob(chain, means, stds, mask), expected, atol=1e-5)


def test_stochastic_step_is_uniform_over_the_denoising_steps():
    generator = torch.Generator().manual_seed(0)
    steps = sample_stochastic_step(40_000, 4, generator=generator)
    counts = torch.bincount(steps, minlength=4).float() / 40_000
    assert steps.min() == 0 and steps.max() == 3
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)


def test_executed_mask_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        executed_mask(4, 3, n_executed=5, real_action_dim=2)
    with pytest.raises(ValueError):
        executed_mask(4, 3, n_executed=2, real_action_dim=4)
