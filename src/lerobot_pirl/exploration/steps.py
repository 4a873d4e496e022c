"""One denoising step of a flow policy, deterministic (ODE) or stochastic (Flow-SDE, Flow-Noise).

Shape legend
    B  batch
    H  chunk_size (actions per model output)
    A  model action width
    K  denoising steps; grid t_k = 1 - k/K, k = 0..K, step Δ = 1/K

Time follows LeRobot: t = 1 is noise, t = 0 is the action, so a step goes from t_k to t_k - Δ.
Every function here is pure; the formulas are those of DESIGN.md §3. Equation numbers cite πRL
(arXiv 2510.25889v3) and Flow-GRPO (arXiv 2505.05470v5). Flow-GRPO's t is ours (t = 1 noise); πRL's τ
runs from noise (0) to action (1), yet its Eqs. 8-9 are Flow-GRPO's with t written as τ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def time_grid(num_steps: int, device: torch.device | str = "cpu") -> Tensor:
    """t_k = 1 - k/K for k = 0..K, shape (K+1,), float32 (LeRobot's `1.0 + step * dt` with dt = -1/K)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = -1.0 / num_steps
    # Built as LeRobot's euler_integrate builds it so our ODE matches its sampler to the last bit.
    return torch.tensor([1.0 + k * dt for k in range(num_steps + 1)], dtype=torch.float32, device=device)


def ode_step(x_t: Tensor, velocity: Tensor, delta: float) -> Tensor:
    """Euler step x_{k+1} = x_k - Δ·v_k (Flow-GRPO Eq. 6, πRL Eq. 6 discretised). x_t, velocity: (B, H, A)."""
    # Written as x + dt·v with dt = -Δ, the exact float ops of LeRobot's euler_integrate.
    return x_t + (-delta) * velocity


def sde_sigma(t: Tensor, delta: float, noise_level: float) -> Tensor:
    """Flow-SDE diffusion scale σ_k = a·sqrt(t_k / (1 - t_k)) (Flow-GRPO, after Eq. 9).  t: (B,) -> (B,).

    At t_0 = 1 the ratio is infinite; DESIGN.md §3 uses 1 - t_1 = Δ in the denominator there,
    so σ_0 = a·sqrt(K). For every other grid point 1 - t_k >= Δ already, hence the clamp.
    """
    return noise_level * torch.sqrt(t / torch.clamp(1.0 - t, min=delta))


def sde_step(
    x_t: Tensor, velocity: Tensor, t: Tensor, delta: float, noise_level: float
) -> tuple[Tensor, Tensor]:
    """Mean and std of the marginal-preserving Flow-SDE transition (DESIGN.md §3).

    The SDE is Flow-GRPO Eq. 8 (πRL Eq. 8); its Euler-Maruyama step (Flow-GRPO Eq. 9, πRL Eq. 9) is
    mean = x_k - Δ·[v_k + σ_k²/(2 t_k)·(x_k + (1 - t_k)·v_k)],  std = σ_k·sqrt(Δ).
    x_t, velocity: (B, H, A); t: (B,) with t > 0 (the last grid point t_K = 0 is never a step start).
    Returns mean (B, H, A) and std (B, 1, 1), broadcastable against the mean.
    """
    t_ = t.view(-1, 1, 1)
    sigma = sde_sigma(t, delta, noise_level).view(-1, 1, 1)
    drift = velocity + sigma**2 / (2.0 * t_) * (x_t + (1.0 - t_) * velocity)
    mean = x_t - delta * drift
    std = sigma * math.sqrt(delta)
    return mean, std


def bounded_noise_std(raw: Tensor, std_min: float, std_max: float) -> Tensor:
    """Squash a noise-head output into [std_min, std_max] through the log-variance (DESIGN.md §3): the
    bounded σ_θ' of πRL's Flow-Noise transition (πRL Eq. 4; the bounds are given in its §5.3.3).

    s = exp(½·(ℓmin + (ℓmax - ℓmin)·(tanh(h) + 1)/2)),  ℓ = log s².  Any shape.
    """
    log_var_min = 2.0 * math.log(std_min)
    log_var_max = 2.0 * math.log(std_max)
    log_var = log_var_min + (log_var_max - log_var_min) * (torch.tanh(raw) + 1.0) / 2.0
    return torch.exp(0.5 * log_var)


def sample_stochastic_step(
    batch_size: int,
    num_steps: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hybrid Flow-SDE (πRL §4.2.3): the one stochastic step k* of each decision, uniform on {0..K-1}.

    Returns (B,) int64."""
    return torch.randint(0, num_steps, (batch_size,), device=device, generator=generator)
