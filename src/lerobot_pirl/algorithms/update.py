"""The policy-gradient update shared by PPO and GRPO: epochs × minibatches × micro-batches.

Shape legend
    M  valid decisions of the rollout (rows whose mask is True), flattened over (T, N)
    K  denoising steps, H chunk_size, A model action width

Batch variables are prefixed `b_`, minibatch ones `mb_` (CleanRL). Diagnostics use stable keys:
`losses/{policy_loss, value_loss, entropy, approx_kl, clipfrac, explained_variance}`, plus the
flow-specific `policy/{logprob_min, logprob_max, logprob_mean, noise_std}` and
`policy/clipfrac_step_{k}` (Flow-SDE: clip fraction by the denoising step that was stochastic).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from lerobot_pirl.algorithms.config import AlgorithmConfig, PPOConfig
from lerobot_pirl.algorithms.losses import clipped_surrogate_loss, explained_variance, value_loss
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.rollout.batch import RolloutBatch


@dataclass
class UpdateSamples:
    """The valid decisions of a rollout, flattened, with their advantages and critic targets."""

    observations: dict[str, Tensor]  # each (M, ...)
    chains: Tensor  # (M, K+1, H, A)
    step_index: Tensor  # (M,)
    old_logprobs: Tensor  # (M,)
    old_values: Tensor  # (M,)
    advantages: Tensor  # (M,)
    returns: Tensor  # (M,)

    @classmethod
    def from_rollout(
        cls, batch: RolloutBatch, advantages: Tensor, returns: Tensor, keep: Tensor | None = None
    ) -> UpdateSamples:
        """advantages, returns: (T, N); keep: optional (T, N) bool further restricting batch.mask."""
        valid = batch.mask if keep is None else batch.mask & keep
        return cls(
            observations={k: v[valid] for k, v in batch.observations.items()},
            chains=batch.chains[valid],
            step_index=batch.step_index[valid],
            old_logprobs=batch.logprobs[valid],
            old_values=batch.values[valid],
            advantages=advantages[valid],
            returns=returns[valid],
        )

    @classmethod
    def concatenate(cls, parts: list[UpdateSamples]) -> UpdateSamples:
        return cls(
            observations={k: torch.cat([p.observations[k] for p in parts]) for k in parts[0].observations},
            chains=torch.cat([p.chains for p in parts]),
            step_index=torch.cat([p.step_index for p in parts]),
            old_logprobs=torch.cat([p.old_logprobs for p in parts]),
            old_values=torch.cat([p.old_values for p in parts]),
            advantages=torch.cat([p.advantages for p in parts]),
            returns=torch.cat([p.returns for p in parts]),
        )

    def __len__(self) -> int:
        return self.chains.shape[0]

    def select(self, index: Tensor, device: torch.device | str) -> UpdateSamples:
        return UpdateSamples(
            observations={k: v[index].to(device) for k, v in self.observations.items()},
            chains=self.chains[index].to(device),
            step_index=self.step_index[index].to(device),
            old_logprobs=self.old_logprobs[index].to(device),
            old_values=self.old_values[index].to(device),
            advantages=self.advantages[index].to(device),
            returns=self.returns[index].to(device),
        )


def make_optimizer(policy: FlowRLPolicy, cfg: AlgorithmConfig) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: actor (policy + noise head) and critic (value head)."""
    cfg = cfg.resolved(policy.policy_type)
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


def policy_update(
    policy: FlowRLPolicy,
    optimizer: torch.optim.Optimizer,
    samples: UpdateSamples,
    cfg: AlgorithmConfig,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Clipped-surrogate update over `samples`; the critic is trained too when `cfg` uses one (PPO).

    Returns the mean diagnostics of the update. Raises NonFiniteLossError on NaN/inf.
    """
    cfg = cfg.resolved(policy.policy_type)
    num_samples = len(samples)
    if num_samples == 0:
        return {"losses/num_samples": 0.0}
    b_advantages = samples.advantages
    if cfg.normalize_advantages and num_samples > 1:
        b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
    samples = UpdateSamples(**{**samples.__dict__, "advantages": b_advantages})
    use_critic = cfg.uses_critic and policy.value_head is not None
    entropy_coef = cfg.entropy_coef if policy.exploration == "flow_noise" else 0.0
    minibatch_size = min(cfg.minibatch_size, num_samples)
    micro_batch_size = min(cfg.micro_batch_size or minibatch_size, minibatch_size)
    actor_params = policy.actor_parameters()
    critic_params = policy.critic_parameters()

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    clip_by_step = torch.zeros(policy.num_steps)
    count_by_step = torch.zeros(policy.num_steps)
    logprob_min, logprob_max = math.inf, -math.inf
    epochs_run = 0
    policy.train()
    for epoch in range(cfg.update_epochs):
        epochs_run += 1
        epoch_kl, epoch_kl_count = 0.0, 0
        order = torch.randperm(num_samples, generator=generator)
        for mb_number, start in enumerate(range(0, num_samples, minibatch_size)):
            mb_index = order[start : start + minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            for micro_start in range(0, len(mb_index), micro_batch_size):
                micro_index = mb_index[micro_start : micro_start + micro_batch_size]
                mb = samples.select(micro_index, device)
                weight = len(micro_index) / len(mb_index)  # gradient accumulation averages over the minibatch
                evaluation = policy.evaluate(mb.observations, mb.chains, mb.step_index)
                pg_loss, pg_stats = clipped_surrogate_loss(
                    evaluation.logprob, mb.old_logprobs, mb.advantages, cfg.clip_ratio
                )
                loss = pg_loss - entropy_coef * evaluation.entropy.mean()
                if use_critic:
                    assert isinstance(cfg, PPOConfig)
                    v_loss = value_loss(
                        evaluation.value, mb.old_values, mb.returns, cfg.value_clip, cfg.huber_delta
                    )
                    loss = loss + cfg.value_loss_coef * v_loss
                    sums["losses/value_loss"] += v_loss.item() * len(micro_index)
                _check_finite("loss", loss, epoch, mb_number)
                (loss * weight).backward()

                n = len(micro_index)
                sums["losses/policy_loss"] += pg_loss.item() * n
                sums["losses/entropy"] += evaluation.entropy.mean().item() * n
                sums["losses/approx_kl"] += float(pg_stats["approx_kl"]) * n
                sums["losses/clipfrac"] += float(pg_stats["clipped"].sum())
                sums["policy/noise_std"] += evaluation.noise_std.mean().item() * n
                sums["policy/ratio_max"] = max(sums["policy/ratio_max"], float(pg_stats["ratio"].max()))
                counts["samples"] += n
                epoch_kl += float(pg_stats["approx_kl"]) * n
                epoch_kl_count += n
                logprob_min = min(logprob_min, evaluation.logprob.min().item())
                logprob_max = max(logprob_max, evaluation.logprob.max().item())
                sums["policy/logprob_mean"] += evaluation.logprob.mean().item() * n
                steps = mb.step_index.cpu()
                clip_by_step.index_add_(0, steps, pg_stats["clipped"].cpu())
                count_by_step.index_add_(0, steps, torch.ones_like(steps, dtype=torch.float32))

            actor_norm = torch.nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
            _check_finite("actor gradient norm", actor_norm, epoch, mb_number)
            sums["grad/actor_norm"] += float(actor_norm)
            if critic_params and use_critic:
                critic_norm = torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm)
                _check_finite("critic gradient norm", critic_norm, epoch, mb_number)
                sums["grad/critic_norm"] += float(critic_norm)
            counts["optimizer_steps"] += 1
            optimizer.step()
        if cfg.target_kl is not None and epoch_kl / max(1, epoch_kl_count) > cfg.target_kl:
            break

    n = max(1, counts["samples"])
    steps_taken = max(1, counts["optimizer_steps"])
    metrics = {
        "losses/policy_loss": sums["losses/policy_loss"] / n,
        "losses/entropy": sums["losses/entropy"] / n,
        "losses/approx_kl": sums["losses/approx_kl"] / n,
        "losses/clipfrac": sums["losses/clipfrac"] / n,
        "losses/num_samples": float(num_samples),
        "losses/epochs": float(epochs_run),
        "losses/early_stopped": float(epochs_run < cfg.update_epochs),
        "policy/logprob_min": logprob_min,
        "policy/logprob_max": logprob_max,
        "policy/logprob_mean": sums["policy/logprob_mean"] / n,
        "policy/noise_std": sums["policy/noise_std"] / n,
        "policy/ratio_max": sums["policy/ratio_max"],
        "grad/actor_norm": sums["grad/actor_norm"] / steps_taken,
    }
    if use_critic:
        metrics["losses/value_loss"] = sums["losses/value_loss"] / n
        metrics["grad/critic_norm"] = sums["grad/critic_norm"] / steps_taken
        metrics["losses/explained_variance"] = explained_variance(samples.old_values, samples.returns)
    if policy.exploration == "flow_sde":
        for k in range(policy.num_steps):
            if count_by_step[k] > 0:
                metrics[f"policy/clipfrac_step_{k}"] = float(clip_by_step[k] / count_by_step[k])
    return metrics
