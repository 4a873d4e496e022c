"""FlowRLPolicy: a LeRobot flow policy driven as a stochastic policy, plus the RL heads.

Shape legend
    B  batch (observations / decisions)
    H  chunk_size, C executed actions per decision (C <= H)
    A  model action width, D real action dim (D <= A)
    K  denoising steps, chain = (x_0, ..., x_K), x_0 ~ N(0, I), x_K the action chunk
    F  pooled feature width (critic input), W expert hidden width (noise-head input)

Modes (DESIGN.md §3):
    "ode"         deterministic Euler chain; evaluation and deployment.
    "flow_sde"    hybrid Flow-SDE: one stochastic step k* per decision, the rest ODE; the decision's
                  log-prob is that transition's. At update time only step k* is recomputed.
    "flow_noise"  every step Gaussian with a learned, bounded std; log-prob of the whole chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lerobot_pirl.adapters.base import FlowAdapter, FlowContext
from lerobot_pirl.exploration import (
    bounded_noise_std,
    executed_mask,
    flow_noise_chain_entropy,
    flow_noise_chain_log_prob,
    gaussian_entropy,
    gaussian_log_prob,
    ode_step,
    sample_stochastic_step,
    sde_step,
    time_grid,
)

SampleMode = Literal["ode", "flow_sde", "flow_noise"]
EXPLORATION_MODES = ("flow_sde", "flow_noise")


@dataclass
class PolicySample:
    actions: Tensor  # (B, C, D) executed actions, in the policy's normalised action space
    chain: Tensor  # (B, K+1, H, A) the denoising chain, x_K = the whole chunk
    step_index: Tensor  # (B,) int64, the stochastic step k* (Flow-SDE); 0 otherwise
    logprob: Tensor  # (B,) float32; 0 in "ode" mode
    value: Tensor  # (B,) float32; 0 without a value head
    context: FlowContext | None = None  # the encoded observation, when `sample(keep_context=True)`


@dataclass
class PolicyEvaluation:
    logprob: Tensor  # (B,) float32, grad-enabled
    entropy: Tensor  # (B,) float32 entropy per executed element, the mean over the chain's terms
    value: Tensor  # (B,) float32, grad-enabled (zeros without a value head)
    noise_std: Tensor  # (B,) mean std of the stochastic transition(s) over executed elements


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class FlowRLPolicy(nn.Module):
    """Adapter + exploration + value/noise heads.

    The settings come from the algorithm config (`AlgorithmConfig.policy_settings()`, validated there).

    Args:
        adapter: the wrapped LeRobot policy.
        exploration: "flow_sde" or "flow_noise", the stochastic mode used for rollouts and updates.
        noise_level: Flow-SDE level a (reference 0.5).
        noise_std_min, noise_std_max: Flow-Noise std bounds (reference [0.08, 0.16]).
        noise_head_hidden: hidden widths of the Flow-Noise head (reference 128, 64, tanh).
        n_action_steps: C, actions executed per decision; None = the policy config's.
        value_head_hidden: hidden widths of the critic MLP; None = no critic (GRPO).
        value_head_activation: "relu", "gelu" or "tanh", between the critic's layers.
        value_features: "prefix" (pooled observation features) or "expert" (pooled expert hidden states:
            V is the mean of the values of the K denoising steps at rollout, as the reference's π0 critic).
        detach_value_input: stop critic gradients at its input so the critic does not move the trunk.
        freeze_trunk, freeze_expert: exclude those adapter parameters from training.
    """

    def __init__(
        self,
        adapter: FlowAdapter,
        *,
        exploration: str,
        noise_level: float,
        noise_std_min: float,
        noise_std_max: float,
        n_action_steps: int | None,
        value_head_hidden: tuple[int, ...] | None,
        value_features: str,
        detach_value_input: bool,
        value_head_activation: str = "gelu",
        noise_head_hidden: tuple[int, ...] = (128, 64),
        freeze_trunk: bool = False,
        freeze_expert: bool = False,
    ):
        super().__init__()
        self.adapter = adapter
        self.exploration = exploration
        self.noise_level = noise_level
        self.noise_std_min = noise_std_min
        self.noise_std_max = noise_std_max
        self.value_features = value_features
        self.detach_value_input = detach_value_input

        sizes = adapter.sizes
        self.num_steps = sizes.num_steps
        self.delta = 1.0 / sizes.num_steps
        self.n_action_steps = n_action_steps or sizes.n_action_steps
        self.register_buffer(
            "action_mask",
            executed_mask(sizes.chunk_size, sizes.action_dim, self.n_action_steps, sizes.real_action_dim),
            persistent=False,
        )  # (H, A)
        self.register_buffer("grid", time_grid(sizes.num_steps), persistent=False)  # (K+1,)

        self.noise_head: nn.Module | None = None
        if exploration == "flow_noise":
            self.noise_head = _mlp([sizes.hidden_dim, *noise_head_hidden, sizes.action_dim], nn.Tanh)
            # Zero last layer: the std starts at the geometric middle of its bounds for every input.
            nn.init.zeros_(self.noise_head[-1].weight)
            nn.init.zeros_(self.noise_head[-1].bias)

        self.value_head: nn.Module | None = None
        if value_head_hidden is not None:
            in_dim = sizes.pooled_dim if value_features == "prefix" else sizes.hidden_dim
            self.value_head = _mlp([in_dim, *value_head_hidden, 1], ACTIVATIONS[value_head_activation])
            nn.init.zeros_(self.value_head[-1].weight)
            nn.init.zeros_(self.value_head[-1].bias)

        for p in adapter.trunk_parameters() if freeze_trunk else []:
            p.requires_grad_(False)
        for p in adapter.expert_parameters() if freeze_expert else []:
            p.requires_grad_(False)

    @property
    def policy_type(self) -> str | None:
        """The wrapped LeRobot policy's registered type ("pi0", "flow_mlp", ...): picks per-type defaults."""
        return getattr(getattr(self.adapter.policy, "config", None), "type", None)

    # ---- parameters -------------------------------------------------------------------------------

    def actor_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        if self.noise_head is not None:
            params += list(self.noise_head.parameters())
        return params

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.value_head is None else list(self.value_head.parameters())

    def heads_state_dict(self) -> dict[str, Tensor]:
        """The RL-only tensors (noise and value heads); the policy itself saves as a LeRobot checkpoint."""
        heads = {}
        for name, head in (("noise_head", self.noise_head), ("value_head", self.value_head)):
            if head is not None:
                heads.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
        return heads

    def load_heads_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, head in (("noise_head", self.noise_head), ("value_head", self.value_head)):
            if head is not None:
                prefix = f"{name}."
                head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    # ---- pieces -----------------------------------------------------------------------------------

    def _noise_std(self, hidden: Tensor) -> Tensor:
        """hidden (B, H, W) -> std (B, H, A) in [noise_std_min, noise_std_max]."""
        return bounded_noise_std(self.noise_head(hidden.float()), self.noise_std_min, self.noise_std_max)

    def _value_from(self, features: Tensor) -> Tensor:
        if self.value_head is None:
            return torch.zeros(features.shape[0], device=features.device)
        if self.detach_value_input:
            features = features.detach()
        return self.value_head(features.float()).squeeze(-1)

    def _value(self, context: FlowContext, step_hidden: list[Tensor]) -> Tensor:
        """V(o), (B,): of the pooled prefix features, or the mean over `step_hidden` (each (B, H, W), the
        expert hidden states of the denoising steps run) of the value of their pooled expert features."""
        if self.value_head is None:
            return torch.zeros(context.pooled.shape[0], device=context.pooled.device)
        if self.value_features == "prefix":
            return self._value_from(context.pooled)
        return torch.stack([self._value_from(hidden.mean(1)) for hidden in step_hidden]).mean(0)

    # ---- public API -------------------------------------------------------------------------------

    def initial_noise(self, generators: list[torch.Generator]) -> Tensor:
        """x_0 of one chain per generator, (B, H, A), drawn on the CPU so that a generator's draws do not
        depend on the device or on the other rows of the batch."""
        sizes = self.adapter.sizes
        shape = (sizes.chunk_size, sizes.action_dim)
        return torch.stack([torch.randn(shape, generator=generator) for generator in generators])

    @torch.no_grad()
    def sample(
        self,
        batch: dict[str, Tensor],
        mode: SampleMode,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        keep_context: bool = False,
    ) -> PolicySample:
        """Roll the denoising chain once per observation. `batch` is the policy-preprocessed observation;
        `keep_context` returns its encoded context too (`adapters.prefix_cache`)."""
        if mode not in ("ode", *EXPLORATION_MODES):
            raise ValueError(f"mode must be 'ode', 'flow_sde' or 'flow_noise', got {mode!r}")
        if mode == "flow_noise" and self.noise_head is None:
            raise ValueError("flow_noise sampling needs a policy built with exploration='flow_noise'")
        sizes = self.adapter.sizes
        context = self.adapter.encode(batch)
        batch_size = context.pooled.shape[0]
        device = context.pooled.device
        shape = (batch_size, sizes.chunk_size, sizes.action_dim)

        def gaussian(like_shape):
            return torch.randn(like_shape, device=device, dtype=torch.float32, generator=generator)

        x = (
            noise.to(device=device, dtype=torch.float32) if noise is not None else gaussian(shape)
        )  # (B, H, A)
        chain = [x]
        step_index = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        logprob = torch.zeros(batch_size, device=device)  # (B,)
        if mode == "flow_sde":
            step_index = sample_stochastic_step(batch_size, self.num_steps, device, generator)
        means, stds, step_hidden = [], [], []
        for k in range(self.num_steps):
            t = self.grid[k].expand(batch_size)  # (B,)
            velocity, hidden = self.adapter.velocity(context, x, t)
            step_hidden.append(hidden)
            ode_next = ode_step(x, velocity, self.delta)
            if mode == "ode":
                x = ode_next
            elif mode == "flow_sde":
                mean, std = sde_step(x, velocity, t, self.delta, self.noise_level)
                sde_next = mean + std * gaussian(shape)
                is_stochastic = step_index == k  # (B,)
                logprob = torch.where(
                    is_stochastic, gaussian_log_prob(sde_next, mean, std, self.action_mask), logprob
                )
                x = torch.where(is_stochastic.view(-1, 1, 1), sde_next, ode_next)
            else:
                std = self._noise_std(hidden)  # (B, H, A)
                x = ode_next + std * gaussian(shape)
                means.append(ode_next)
                stds.append(std)
            chain.append(x)
        chain_t = torch.stack(chain, dim=1)  # (B, K+1, H, A)
        if mode == "flow_noise":
            logprob = flow_noise_chain_log_prob(
                chain_t, torch.stack(means, 1), torch.stack(stds, 1), self.action_mask
            )
        actions = x[:, : self.n_action_steps, : sizes.real_action_dim]  # (B, C, D)
        value = self._value(context, step_hidden)
        return PolicySample(actions, chain_t, step_index, logprob, value, context if keep_context else None)

    def evaluate(
        self,
        batch: dict[str, Tensor],
        chain: Tensor,
        step_index: Tensor,
        context: FlowContext | None = None,
    ) -> PolicyEvaluation:
        """Grad-enabled log-prob, entropy and value of stored chains under the current parameters.

        chain: (B, K+1, H, A) from `sample`; step_index: (B,) its k*. Flow-SDE recomputes only
        the transition k* -> k*+1 (one expert pass per sample); Flow-Noise recomputes all K. An expert-
        feature critic reads the steps recomputed (the reference's: step k* for Flow-SDE, all K for
        Flow-Noise). The entropy is per executed element (the reference's normalisation): Flow-SDE's of
        its one transition, Flow-Noise's the mean over the K+1 chain terms, the prior N(0, I) included.
        `context`: `adapter.encode(batch)` computed before (`adapters.prefix_cache`), else computed here.
        """
        if context is None:
            context = self.adapter.encode(batch)
        batch_size = chain.shape[0]
        chain = chain.float()
        if self.exploration == "flow_sde":
            rows = torch.arange(batch_size, device=chain.device)
            x_k = chain[rows, step_index]  # (B, H, A)
            x_next = chain[rows, step_index + 1]  # (B, H, A)
            t = self.grid[step_index]  # (B,)
            velocity, hidden = self.adapter.velocity(context, x_k, t)
            step_hidden = [hidden]
            mean, std = sde_step(x_k, velocity, t, self.delta, self.noise_level)
            logprob = gaussian_log_prob(x_next, mean, std, self.action_mask)
            entropy = gaussian_entropy(std, self.action_mask)
            noise_std = std.view(-1)
        else:
            means, stds, step_hidden = [], [], []
            for k in range(self.num_steps):
                t = self.grid[k].expand(batch_size)
                velocity, hidden = self.adapter.velocity(context, chain[:, k], t)
                step_hidden.append(hidden)
                means.append(ode_step(chain[:, k], velocity, self.delta))
                stds.append(self._noise_std(hidden))
            means_t, stds_t = torch.stack(means, 1), torch.stack(stds, 1)  # (B, K, H, A)
            logprob = flow_noise_chain_log_prob(chain, means_t, stds_t, self.action_mask)
            entropy = flow_noise_chain_entropy(stds_t, self.action_mask)
            noise_std = (stds_t * self.action_mask).flatten(2).sum(-1).mean(1) / self.action_mask.sum()
        value = self._value(context, step_hidden)
        return PolicyEvaluation(logprob, entropy, value, noise_std)

    @torch.no_grad()
    def value(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """V(o), (B,): the bootstrap value of an observation (e.g. the final one of a truncated episode).

        An expert-feature critic runs the deterministic chain from `noise` (drawn when None) and averages
        its K steps' values, as at rollout; a prefix-feature critic reads the observation only."""
        context = self.adapter.encode(batch)
        if self.value_head is None or self.value_features == "prefix":
            return self._value(context, [])
        sizes = self.adapter.sizes
        shape = (context.pooled.shape[0], sizes.chunk_size, sizes.action_dim)
        x = noise.to(context.pooled.device).float() if noise is not None else torch.randn(shape)
        x = x.to(context.pooled.device)  # (B, H, A)
        step_hidden = []
        for k in range(self.num_steps):
            velocity, hidden = self.adapter.velocity(context, x, self.grid[k].expand(shape[0]))
            step_hidden.append(hidden)
            x = ode_step(x, velocity, self.delta)
        return self._value(context, step_hidden)
