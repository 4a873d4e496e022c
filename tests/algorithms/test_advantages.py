import pytest
import torch

from lerobot_pirl.algorithms.advantages import compute_gae, group_relative_advantages


def test_gae_by_hand_with_a_termination_and_a_truncation():
    gamma, lam = 0.9, 0.8
    # env 0: decisions 0,1 then terminated at decision 1; decision 2 starts a new episode (rollout end).
    # env 1: truncated (time limit) at decision 0, bootstrap with the final observation's value 0.7.
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2], [0.6, 0.3], [0.4, 0.1]])
    next_values = torch.tensor([[0.6, 0.7], [9.9, 0.1], [0.45, 0.25]])  # 9.9: a final obs after termination
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, True], [False, False], [False, False]])
    advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    # env 0
    d2 = 0.0 + gamma * 0.45 - 0.4
    d1 = 1.0 + 0.0 - 0.6  # terminated: no bootstrap
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2, a1 = d2, d1  # the episode boundary at decision 1 stops the recursion
    a0 = d0 + gamma * lam * a1
    # env 1
    e2 = 0.0 + gamma * 0.25 - 0.1
    e1 = 0.5 + gamma * 0.1 - 0.3
    e0 = 0.0 + gamma * 0.7 - 0.2  # truncated: bootstrap with V(final obs) = 0.7, recursion stops
    b2, b1 = e2, e1 + gamma * lam * e2
    b0 = e0
    expected = torch.tensor([[a0, b0], [a1, b1], [a2, b2]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + values, atol=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.3], [0.2], [0.1]])
    next_values = torch.tensor([[0.2], [0.1], [5.0]])
    no = torch.zeros(3, 1, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, next_values, no, no, gamma=0.5, gae_lambda=1.0)
    expected_returns = torch.tensor(
        [[1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 5], [2 + 0.5 * 3 + 0.25 * 5], [3 + 0.5 * 5]]
    )
    assert torch.allclose(returns, expected_returns)
    assert torch.allclose(advantages, expected_returns - values)


def test_group_relative_advantages_by_hand_and_equal_groups_are_dropped():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    advantages, keep = group_relative_advantages(scores, group_size=3, eps=0.0)
    # group 0: mean 1/3, squared deviations 4/9 + 1/9 + 1/9 = 2/3; Bessel-corrected std sqrt((2/3) / 2)
    # (the reference's torch.std), 1.07x... here 1.22x the population std sqrt(2/9) at G = 3
    std = ((2 / 3) / 2) ** 0.5
    expected0 = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std
    assert torch.allclose(advantages[:3], expected0, atol=1e-6)
    assert keep.tolist() == [True, True, True, False, False, False, True, True, True]
    assert torch.all(advantages[3:6] == 0)
    assert torch.allclose(advantages[6:], torch.tensor([-2 / 3, 1 / 3, 1 / 3]) / std, atol=1e-6)
    with pytest.raises(ValueError):
        group_relative_advantages(scores[:4], group_size=3)
