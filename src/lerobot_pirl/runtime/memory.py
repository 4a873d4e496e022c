"""A run's GPU memory and host RAM, estimated at start-up from the policy and the config (issue 15).

The per-sample figures come from measurements (BENCHMARKS.md "VLA update cost", REFERENCE.md §5): full
π0 on one H200 under bf16 autocast, its expert trained in float32, chunk 50. Other models scale them by
their expert's size; float32 (no autocast) doubles activations. It is an estimate, meant to say before
any env starts that a run cannot fit, not to replace a measurement.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass

from lerobot.configs.types import FeatureType

logger = logging.getLogger(__name__)
GIB = 1024**3
GB = 1e9

# Full π0, one H200, bf16 autocast (BENCHMARKS.md): update peaks 15.3 / 17.4 GiB (Flow-SDE, micro-batch
# 16 / 32) and 23.0 / 31.0 GiB (Flow-Noise, K = 4) give 0.123 GiB per sample and expert pass (forward
# kept for backward) and 0.008 GiB per sample for the prefix pass; rollout of 64 observations 2.7 GiB
# above the weights.
EXPERT_PASS_GIB = 0.123
PREFIX_PASS_GIB = 0.008
ROLLOUT_GIB_PER_OBSERVATION = 0.042
PI0_EXPERT_SIZE = 1024 * 18 * 50  # width x depth x chunk of the measured expert pass
# Host RAM (REFERENCE.md §5): per LIBERO env once its simulator is built (one env per worker measured);
# per env worker of the other envs, whose simulators are small.
LIBERO_ENV_GB = 2.2
WORKER_GB = 0.6
METAWORLD_TASK_GB = 0.022  # one MetaWorld task simulator; a suite sub-env keeps several (issue 14)
MAIN_PROCESS_GB = 2.5  # torch, LeRobot and the simulators imported, before any model


@dataclass(frozen=True)
class PolicyProfile:
    """What the estimate needs to know about a policy."""

    trained_params: int  # float32, with gradients and two AdamW moments
    frozen_bytes: int  # every other parameter, in its own dtype
    expert_scale: float  # activations of one expert pass relative to full π0's (width x depth x chunk)
    prefix_kv_bytes: int  # keys and values of one sample's prefix (0: no prefix to cache)
    num_steps: int | None = None  # K of the policy; None: the run's --rollout.num_inference_steps


# Full-size policies, for configs that name a hub checkpoint (tests and the example configs).
# π0: 4,028 M parameters, 315 M trained (measured); π0.5 has π0's backbone and expert (not measured apart).
# Prefix: 18 layers x 1 KV head x 256 x (keys, values) x bf16 = 18,432 B per token; at LIBERO's two
# cameras 560 tokens for π0 (48-token prompt), 712 for π0.5 (200-token prompt).
FULL_SIZE_PROFILES = {
    policy_type: PolicyProfile(
        trained_params=314_713_120,
        frozen_bytes=2 * (4_028_019_472 - 314_713_120),
        expert_scale=1.0,
        prefix_kv_bytes=18_432 * prefix_tokens,
    )
    for policy_type, prefix_tokens in (("pi0", 560), ("pi05", 712))
}


@dataclass(frozen=True)
class MemoryEstimate:
    gpu_gib: float  # peak GPU memory of the update or the rollout, whichever is larger
    host_gb: float  # main process, env workers and the rollout's stored observations
    parts: dict[str, float]

    def summary(self) -> str:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in self.parts.items())
        return f"GPU ≈ {self.gpu_gib:.0f} GiB, host RAM ≈ {self.host_gb:.0f} GB ({parts})"


def profile_of(policy) -> PolicyProfile:
    """The profile of a built FlowRLPolicy."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    trained_ids = {id(p) for p in trained}
    frozen = sum(p.numel() * p.element_size() for p in policy.parameters() if id(p) not in trained_ids)
    adapter, sizes = policy.adapter, policy.adapter.sizes
    depth = _expert_depth(adapter)
    return PolicyProfile(
        trained_params=sum(p.numel() for p in trained),
        frozen_bytes=frozen,
        expert_scale=sizes.hidden_dim * depth * sizes.chunk_size / PI0_EXPERT_SIZE,
        prefix_kv_bytes=_prefix_kv_bytes(adapter),
        num_steps=sizes.num_steps,
    )


def decisions_per_iteration(cfg) -> int:
    """M, the samples of one update (GRPO: every episode at its longest)."""
    rollout = cfg.rollout
    if cfg.algorithm.type == "grpo":
        episode_length = getattr(cfg.env, "episode_length", None) or 0
        per_episode = math.ceil(episode_length / (rollout.n_action_steps or 1)) if episode_length else 0
        return rollout.num_envs * rollout.episodes_per_env * per_episode
    return rollout.num_envs * rollout.decisions_per_env


def estimate_memory(cfg, profile: PolicyProfile) -> MemoryEstimate:
    """The estimate for `cfg` (a TrainConfig, its algorithm resolved; unresolved worker counts count as
    one worker per env, the most the defaults start)."""
    alg = cfg.algorithm
    options = cfg.policy_options
    precision = 1.0 if options.autocast_dtype else 2.0  # activations in bf16 or float32
    num_steps = profile.num_steps or cfg.rollout.num_inference_steps or 4
    passes = 1 if alg.exploration == "flow_sde" or options.gradient_checkpointing else num_steps
    per_sample = PREFIX_PASS_GIB + passes * EXPERT_PASS_GIB * profile.expert_scale
    num_samples = decisions_per_iteration(cfg)
    micro = min(alg.micro_batch_size or alg.minibatch_size or num_samples, num_samples or 1)
    cache = num_samples * profile.prefix_kv_bytes / GIB
    kept = 0 < cache <= alg.prefix_cache_gib and alg.update_epochs > 1 and not options.train_vlm
    cache = cache if kept else 0.0  # as adapters/prefix_cache.py decides
    weights = (profile.trained_params * 4 + profile.frozen_bytes) / GIB
    optimizer = profile.trained_params * (4 + 8) / GIB  # gradients, AdamW moments
    update = micro * per_sample * precision + cache
    rollout_gib = cfg.rollout.num_envs * ROLLOUT_GIB_PER_OBSERVATION * profile.expert_scale * precision
    from lerobot_pirl.runtime.envs import resolve_eval_batch_size

    eval_envs = resolve_eval_batch_size(cfg.env, copy.copy(cfg.eval))  # the default when unset
    envs = cfg.rollout.num_envs + eval_envs  # training and evaluation envs at once
    if cfg.env.type == "libero":
        env_gb = envs * LIBERO_ENV_GB
    else:
        workers = [cfg.rollout.num_workers, cfg.eval.num_workers]
        env_gb = sum(cfg.rollout.num_envs if w is None else w for w in workers) * WORKER_GB
        if cfg.env.type == "metaworld_state":
            from lerobot_pirl.envs.metaworld_state import MAX_CACHED_TASKS

            simulators = min(len(cfg.env.tasks), MAX_CACHED_TASKS)  # per training sub-env
            env_gb += cfg.rollout.num_envs * simulators * METAWORLD_TASK_GB
    stored = num_samples * _observation_bytes(cfg) / GB
    parts = {
        "weights GiB": weights,
        "gradients+AdamW GiB": optimizer,
        "update activations GiB": micro * per_sample * precision,
        "prefix cache GiB": cache,
        "envs GB": env_gb,
        "stored rollout GB": stored,
    }
    return MemoryEstimate(
        gpu_gib=weights + optimizer + max(update, rollout_gib),
        host_gb=MAIN_PROCESS_GB + env_gb + stored,
        parts=parts,
    )


def warn_if_it_cannot_fit(estimate: MemoryEstimate, device) -> None:
    """Log the estimate; warn when it exceeds the GPU's memory or the machine's RAM."""
    import torch

    logger.info("memory estimate: %s", estimate.summary())
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        if estimate.gpu_gib > total:
            logger.warning(
                "the run needs ≈ %.0f GiB of GPU memory, the GPU has %.0f: lower "
                "--algorithm.micro_batch_size, or use --policy_options.autocast_dtype=bfloat16 or "
                "--policy_options.gradient_checkpointing=true",
                estimate.gpu_gib,
                total,
            )
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    if estimate.host_gb > host:
        logger.warning(
            "the run needs ≈ %.0f GB of host RAM, the machine has %.0f: fewer --rollout.num_envs or env "
            "workers (--rollout.num_workers, --eval.num_workers)",
            estimate.host_gb,
            host,
        )


def _observation_bytes(cfg) -> int:
    """One stored observation: cameras as uint8 (`rollout.batch.compact_observation`), the rest float32
    (the prompt's few hundred bytes left out)."""
    from lerobot_pirl.runtime.envs import env_policy_features

    total = 0
    for feature in env_policy_features(cfg.env).values():
        if feature.type is FeatureType.ACTION:
            continue
        size = math.prod(feature.shape)
        total += size if feature.type is FeatureType.VISUAL else 4 * size
    return total


def _expert_depth(adapter) -> int:
    prefix = getattr(adapter, "_expert_module_prefix", None)
    if prefix is None:
        return 1
    module = adapter.policy.get_submodule(prefix())
    return len(getattr(module, "layers", [])) or 1


def _prefix_kv_bytes(adapter) -> int:
    """Keys and values of one sample's prefix for pi0/pi05 (PaliGemma), 0 for other policies."""
    model = getattr(adapter.policy, "model", None)
    paligemma = getattr(getattr(model, "paligemma_with_expert", None), "paligemma", None)
    if paligemma is None:
        return 0
    text, vision = paligemma.config.text_config, paligemma.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    config = adapter.policy.config
    cameras = sum(f.type is FeatureType.VISUAL for f in config.input_features.values())
    tokens = cameras * image_tokens + config.tokenizer_max_length
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    dtype_bytes = 2 if getattr(adapter, "autocast_dtype", None) is not None else 4
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype_bytes * tokens
