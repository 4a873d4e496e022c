"""Pure functions of DESIGN.md §3: the denoising grid, ODE/SDE/noise steps, Gaussian log-probs."""

from lerobot_pirl.exploration.likelihood import (
    executed_mask,
    flow_noise_chain_entropy,
    flow_noise_chain_log_prob,
    gaussian_entropy,
    gaussian_log_prob,
)
from lerobot_pirl.exploration.steps import (
    bounded_noise_std,
    ode_step,
    sample_stochastic_step,
    sde_sigma,
    sde_step,
    time_grid,
)

__all__ = [
    "bounded_noise_std",
    "executed_mask",
    "flow_noise_chain_entropy",
    "flow_noise_chain_log_prob",
    "gaussian_entropy",
    "gaussian_log_prob",
    "ode_step",
    "sample_stochastic_step",
    "sde_sigma",
    "sde_step",
    "time_grid",
]
