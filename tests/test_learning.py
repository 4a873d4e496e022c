"""The learning test: RL moves a flow policy that starts far from the optimum toward it (issue 2)."""

import pytest

from lerobot_pirl.testing.learning_check import run_learning_check


@pytest.mark.parametrize(
    ("algorithm", "exploration"), [("ppo", "flow_sde"), ("ppo", "flow_noise"), ("grpo", "flow_sde")]
)
def test_rl_at_least_halves_the_squared_error_of_the_deterministic_action(algorithm, exploration):
    result = run_learning_check(algorithm, exploration, iterations=40, seed=0)
    assert result["initial_error"] > 1.5  # the SFT policy acts far from the target (distance² 2)
    assert result["final_error"] < 0.5 * result["initial_error"]
