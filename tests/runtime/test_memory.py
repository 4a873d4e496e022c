"""The start-up memory estimate (issue 15): what it counts, and that it warns before a run that cannot fit."""

import logging

import pytest
from lerobot.envs.configs import LiberoEnv

from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.runtime.config import PolicyOptionsConfig, RolloutConfig, TrainConfig
from lerobot_pirl.runtime.memory import (
    EXPERT_PASS_GIB,
    FULL_SIZE_PROFILES,
    GIB,
    LIBERO_ENV_GB,
    PREFIX_PASS_GIB,
    MemoryEstimate,
    estimate_memory,
    profile_of,
    warn_if_it_cannot_fit,
)
from lerobot_pirl.testing.toy_adapter import toy_rl_policy


def libero_run(exploration: str, micro: int, epochs: int = 4, **options) -> TrainConfig:
    algorithm = PPOConfig(
        exploration=exploration, micro_batch_size=micro, update_epochs=epochs, prefix_cache_gib=40
    )
    return TrainConfig(
        env=LiberoEnv(task="libero_spatial", task_ids=[0], observation_height=256, observation_width=256),
        algorithm=algorithm.resolved("pi0"),
        rollout=RolloutConfig(num_envs=16, decisions_per_env=192, n_action_steps=5, num_inference_steps=4),
        policy_options=PolicyOptionsConfig(**options),
    )


def test_activations_count_the_expert_passes_kept_for_backward_and_the_precision():
    pi0 = FULL_SIZE_PROFILES["pi0"]
    parts = {
        (exploration, dtype, checkpointing): estimate_memory(
            libero_run(exploration, 128, autocast_dtype=dtype, gradient_checkpointing=checkpointing), pi0
        ).parts["update activations GiB"]
        for exploration in ("flow_sde", "flow_noise")
        for dtype in ("bfloat16", None)
        for checkpointing in (False, True)
    }
    one_pass = 128 * (PREFIX_PASS_GIB + EXPERT_PASS_GIB)
    assert parts["flow_sde", "bfloat16", False] == pytest.approx(one_pass)
    assert parts["flow_noise", "bfloat16", False] == pytest.approx(
        128 * (PREFIX_PASS_GIB + 4 * EXPERT_PASS_GIB)
    )
    assert parts["flow_noise", "bfloat16", True] == pytest.approx(one_pass)  # K passes recomputed
    assert parts["flow_noise", None, False] == pytest.approx(2 * parts["flow_noise", "bfloat16", False])
    # The case: Flow-Noise in float32 at micro-batch 128 does not fit one 80 GB GPU (≈ 140 GiB).
    assert estimate_memory(libero_run("flow_noise", 128), pi0).gpu_gib > 80


def test_the_prefix_cache_and_the_envs_are_counted_where_they_apply():
    pi0 = FULL_SIZE_PROFILES["pi0"]
    cfg = libero_run("flow_sde", 32, autocast_dtype="bfloat16")
    estimate = estimate_memory(cfg, pi0)
    decisions = 16 * 192
    assert estimate.parts["prefix cache GiB"] == pytest.approx(decisions * 18_432 * 560 / GIB)  # ≈ 29.5
    assert estimate.parts["envs GB"] == pytest.approx((16 + 10) * LIBERO_ENV_GB)  # training + eval envs
    # one epoch (the cache would never be read), a budget too small, a VLM that trains: no cache
    for changed in (
        libero_run("flow_sde", 32, epochs=1, autocast_dtype="bfloat16"),
        libero_run("flow_sde", 32, autocast_dtype="bfloat16", train_vlm=True),
    ):
        assert estimate_memory(changed, pi0).parts["prefix cache GiB"] == 0
    cfg.algorithm.prefix_cache_gib = 20
    assert estimate_memory(cfg, pi0).parts["prefix cache GiB"] == 0


def test_a_built_policy_is_profiled_by_its_parameters():
    policy = toy_rl_policy("flow_noise")
    profile = profile_of(policy)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert profile.trained_params == trained > 0
    assert profile.prefix_kv_bytes == 0  # no VLM prefix to cache
    assert profile.num_steps == policy.num_steps


def test_a_run_that_cannot_fit_is_warned_about(caplog):
    import torch

    with caplog.at_level(logging.INFO, logger="lerobot_pirl.runtime.memory"):
        warn_if_it_cannot_fit(MemoryEstimate(gpu_gib=1.0, host_gb=1.0, parts={}), torch.device("cpu"))
        assert "memory estimate: GPU ≈ 1 GiB, host RAM ≈ 1 GB" in caplog.text
        assert "WARNING" not in caplog.text
        warn_if_it_cannot_fit(MemoryEstimate(gpu_gib=1.0, host_gb=1e6, parts={}), torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "needs ≈ 1000000 GB of host RAM" in warnings[0]
