"""The policy-gradient update shared by PPO and GRPO: epochs × minibatches × micro-batches.

Shape legend
    M  valid decisions of the rollout, flattened over (T, N) (algorithms/samples.py)
    K  denoising steps, H chunk_size, A model action width

Minibatch variables are prefixed `mb_` (CleanRL). The keys of the update's metrics, all sample means
unless said otherwise:
    losses/policy_loss, losses/value_loss (PPO), losses/entropy (per executed element), losses/approx_kl
    (Schulman's k3, what target_kl reads), losses/approx_kl_k1 (k1, the reference's), losses/clipfrac
    (CleanRL's |r - 1| > ε), losses/clipfrac_active (the reference's: the clipped branch is taken),
    losses/explained_variance (PPO: of the rollout values vs the returns);
    policy/logprob_mean, policy/logprob_min, policy/logprob_max (extremes), policy/noise_std,
    policy/ratio_max (extreme), policy/clipfrac_step_{k} (Flow-SDE: by the stochastic step k*);
    grad/actor_norm, grad/critic_norm (means over optimiser steps, before clipping);
    update/num_samples (M), update/epochs (epochs run), update/early_stopped (1 if target_kl stopped it),
    update/prefix_passes (samples whose observation ran through `encode`: 0 when the rollout kept every
    context, M with the update's prefix cache, M per epoch without).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from torch import Tensor

from lerobot_pirl.adapters.prefix_cache import PrefixCache, kept_context
from lerobot_pirl.algorithms.config import AlgorithmConfig
from lerobot_pirl.algorithms.losses import clipped_surrogate_loss, explained_variance, value_loss
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.rl_policy import FlowRLPolicy, PolicyEvaluation


def make_optimizer(policy: FlowRLPolicy, cfg: AlgorithmConfig) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: actor (policy + noise head) and critic (value head)."""
    require_resolved(cfg)
    groups = [{"params": policy.actor_parameters(), "lr": cfg.actor_lr, "name": "actor"}]
    critic = policy.critic_parameters()
    if critic:
        groups.append({"params": critic, "lr": cfg.critic_lr, "name": "critic"})
    if not groups[0]["params"]:
        raise ValueError("the policy has no trainable actor parameters (everything is frozen)")
    return torch.optim.AdamW(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: AlgorithmConfig, total_iterations: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (one step per rollout): warm-up, then constant, linear or cosine decay."""

    def factor(iteration: int) -> float:
        if iteration < cfg.lr_warmup_iterations:
            return (iteration + 1) / cfg.lr_warmup_iterations
        progress = min(1.0, (iteration - cfg.lr_warmup_iterations) / max(1, total_iterations))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/inf; the message says which quantity and where."""


def _check_finite(name: str, value: Tensor, epoch: int, minibatch: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(f"non-finite {name} in update epoch {epoch}, minibatch {minibatch}")


def require_resolved(cfg: AlgorithmConfig) -> None:
    """The per-policy defaults are filled in once, when the policy is built (`AlgorithmConfig.resolved`)."""
    unset = [name for name in ("actor_lr", "minibatch_size", "update_epochs") if getattr(cfg, name) is None]
    if unset:
        raise ValueError(
            f"resolve the algorithm config for the policy type first (unset: {', '.join(unset)})"
        )


class UpdateStats:
    """The update's diagnostics: sample-weighted sums, extremes, clip fractions by stochastic step."""

    def __init__(self, num_steps: int, by_step: bool):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.extremes = {
            "policy/logprob_min": math.inf,
            "policy/logprob_max": -math.inf,
            "policy/ratio_max": 0.0,
        }
        self.by_step = by_step  # Flow-SDE: clip fractions by the stochastic step k*
        self.clip_by_step = torch.zeros(num_steps)
        self.count_by_step = torch.zeros(num_steps)
        self.epochs = 0
        self.epoch_kl_sum, self.epoch_kl_count = 0.0, 0

    def start_epoch(self) -> None:
        self.epochs += 1
        self.epoch_kl_sum, self.epoch_kl_count = 0.0, 0

    def epoch_kl(self) -> float:
        return self.epoch_kl_sum / max(1, self.epoch_kl_count)

    def add(self, key: str, total: float, count: int = 1) -> None:
        self.sums[key] += total
        self.counts[key] += count

    def mean(self, key: str) -> float:
        return self.sums[key] / max(1, self.counts[key])

    def record(
        self, evaluation: PolicyEvaluation, pg_loss: Tensor, pg_stats: dict, step_index: Tensor
    ) -> None:
        n = len(step_index)
        self.add("losses/policy_loss", pg_loss.item() * n, n)
        self.add("losses/entropy", evaluation.entropy.mean().item() * n, n)
        self.add("losses/approx_kl", float(pg_stats["approx_kl"]) * n, n)
        self.add("losses/approx_kl_k1", float(pg_stats["approx_kl_k1"]) * n, n)
        self.epoch_kl_sum += float(pg_stats["approx_kl"]) * n
        self.epoch_kl_count += n
        self.add("losses/clipfrac", float(pg_stats["clipped"].sum()), n)
        self.add("losses/clipfrac_active", float(pg_stats["clipped_active"].sum()), n)
        self.add("policy/noise_std", evaluation.noise_std.mean().item() * n, n)
        self.add("policy/logprob_mean", evaluation.logprob.mean().item() * n, n)
        self.extremes["policy/ratio_max"] = max(
            self.extremes["policy/ratio_max"], float(pg_stats["ratio"].max())
        )
        self.extremes["policy/logprob_min"] = min(
            self.extremes["policy/logprob_min"], evaluation.logprob.min().item()
        )
        self.extremes["policy/logprob_max"] = max(
            self.extremes["policy/logprob_max"], evaluation.logprob.max().item()
        )
        if self.by_step:
            steps = step_index.cpu()
            self.clip_by_step.index_add_(0, steps, pg_stats["clipped"].cpu())
            self.count_by_step.index_add_(0, steps, torch.ones_like(steps, dtype=torch.float32))

    def metrics(self) -> dict[str, float]:
        metrics = {key: self.mean(key) for key in self.sums}
        metrics.update(self.extremes)
        for k in range(len(self.count_by_step)):
            if self.count_by_step[k] > 0:
                metrics[f"policy/clipfrac_step_{k}"] = float(self.clip_by_step[k] / self.count_by_step[k])
        return metrics


def standardized_advantages(samples: UpdateSamples, cfg: AlgorithmConfig) -> UpdateSamples:
    """The samples with the advantages the loss sees: standardised over the whole batch when
    `normalize_advantages` (PPO's default; GRPO's are standardised per group already), else as given."""
    if not cfg.normalize_advantages or len(samples) <= 1:
        return samples
    advantages = samples.advantages  # (M,)
    return samples.replace(advantages=(advantages - advantages.mean()) / (advantages.std() + 1e-8))


def policy_update(
    policy: FlowRLPolicy,
    optimizer: torch.optim.Optimizer,
    samples: UpdateSamples,
    cfg: AlgorithmConfig,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Clipped-surrogate update over `samples` (PPO trains its critic too); returns the metrics above.

    Raises NonFiniteLossError on NaN/inf.
    """
    require_resolved(cfg)
    num_samples = len(samples)
    if num_samples == 0:
        return {"update/num_samples": 0.0}
    samples = standardized_advantages(samples, cfg)
    critic_loss = None
    if cfg.uses_critic and policy.value_head is not None:
        critic_loss = functools.partial(value_loss, value_clip=cfg.value_clip, huber_delta=cfg.huber_delta)
    entropy_coef = cfg.entropy_coef if policy.exploration == "flow_noise" else 0.0
    minibatch_size = min(cfg.minibatch_size, num_samples)
    micro_batch_size = min(cfg.micro_batch_size or minibatch_size, minibatch_size)
    actor_params, critic_params = policy.actor_parameters(), policy.critic_parameters()
    stats = UpdateStats(policy.num_steps, by_step=policy.exploration == "flow_sde")
    prefix_cache = PrefixCache.for_update(
        policy.adapter, num_samples, cfg.prefix_cache_gib, epochs=cfg.update_epochs
    )
    prefix_passes = 0

    policy.train()
    for epoch in range(cfg.update_epochs):
        stats.start_epoch()
        order = torch.randperm(num_samples, generator=generator)
        for mb_number, mb_index in enumerate(order.split(minibatch_size)):
            optimizer.zero_grad(set_to_none=True)
            for micro_index in mb_index.split(micro_batch_size):
                mb = samples.select(micro_index, device)
                context = kept_context(policy.adapter, mb.observations)  # kept by the rollout
                if context is None and prefix_cache is not None:
                    context, encoded = prefix_cache.context(micro_index, mb.observations)
                    prefix_passes += encoded
                elif context is None:
                    prefix_passes += len(micro_index)
                evaluation = policy.evaluate(mb.observations, mb.chains, mb.step_index, context=context)
                pg_loss, pg_stats = clipped_surrogate_loss(
                    evaluation.logprob, mb.old_logprobs, mb.advantages, cfg.clip_ratio, mb.loss_weights
                )
                loss = pg_loss - entropy_coef * (evaluation.entropy * mb.loss_weights).mean()
                if critic_loss is not None:
                    v_loss = critic_loss(evaluation.value, mb.old_values, mb.returns, weights=mb.loss_weights)
                    loss = loss + cfg.value_loss_coef * v_loss
                    stats.add("losses/value_loss", v_loss.item() * len(micro_index), len(micro_index))
                _check_finite("loss", loss, epoch, mb_number)
                (loss * (len(micro_index) / len(mb_index))).backward()  # the minibatch mean, accumulated
                stats.record(evaluation, pg_loss, pg_stats, mb.step_index)

            actor_norm = torch.nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
            _check_finite("actor gradient norm", actor_norm, epoch, mb_number)
            stats.add("grad/actor_norm", float(actor_norm))
            if critic_loss is not None and critic_params:
                critic_norm = torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm)
                _check_finite("critic gradient norm", critic_norm, epoch, mb_number)
                stats.add("grad/critic_norm", float(critic_norm))
            optimizer.step()
        if cfg.target_kl is not None and stats.epoch_kl() > cfg.target_kl:
            break

    metrics = stats.metrics()
    metrics["update/num_samples"] = float(num_samples)
    metrics["update/epochs"] = float(stats.epochs)
    metrics["update/early_stopped"] = float(stats.epochs < cfg.update_epochs)
    metrics["update/prefix_passes"] = float(prefix_passes)
    if critic_loss is not None:
        metrics["losses/explained_variance"] = explained_variance(samples.old_values, samples.returns)
    return metrics
