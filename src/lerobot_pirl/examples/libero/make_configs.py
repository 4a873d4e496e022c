"""Write the ready LIBERO configs of this folder: π0 / π0.5 × Spatial / Object / Goal / Long ×
PPO + Flow-SDE, PPO + Flow-Noise, GRPO (Flow-SDE), each as the reference recipe and as a one-GPU variant.

    python src/lerobot_pirl/examples/libero/make_configs.py    # rewrites {pi0,pi05}/*.yaml beside it

Use a config with
`lerobot-pirl-train --config_path=$(python -m lerobot_pirl.examples)/libero/pi0/spatial_ppo_flow_sde.yaml`;
flags after it override its values (e.g. `--env.task_ids='[3]'`, `--policy.path=<your checkpoint>`).

Reference values (RLinf's πRL configs for LIBERO, RLinf/RLinf examples/embodiment/config):
- K denoising steps: π0 4 on every suite; π0.5 3 / 5 / 5 / 5 (Spatial / Object / Goal / Long).
- C executed actions per decision: 5, and 10 on LIBERO-Long (both policies).
- Flow-SDE noise level a = 0.5; π0.5 0.3 on Object and Goal. Flow-Noise std in [0.08, 0.16] with
  entropy bonus 0.005.
- Episode length 240 / 240 / 320 / 480 steps (`env.episode_length`; LeRobot's own defaults,
  280 / 280 / 300 / 520, apply when it is unset).
- 64 envs × 8 rollout epochs per iteration: PPO collects 8 episode budgets of decisions per env
  (`rollout.decisions_per_env` = 8 × episode_length / C), GRPO 8 episodes per env in groups of 8.
- Update epochs: PPO π0 4, π0.5 1 / 1 / 4 / 4; GRPO π0 2, π0.5 1, both 4 on Long. Global batch 2048,
  micro-batch 128.
- AdamW lr 5e-6 (actor) / 1e-4 (critic), β 0.9 / 0.95, eps 1e-8, weight decay 0.01, grad clip 1.0.
- PPO clip 0.2, value clip 0.2, Huber δ 10, γ 0.99, λ 0.95 per chunk, advantages normalised, no KL.
- GRPO: advantages standardised within each group only (Bessel std), every episode weighing the same
  in the loss (`loss_weighting: episode`, RLinf's `masked_mean_ratio`).
- Only the action expert (+ projections and the new heads) trains; the critic reads pooled expert
  features for π0 (ReLU MLP 512-256-128, its value the mean over the denoising steps) and the pooled
  VLM prefix for π0.5 (ReLU MLP 1024-512-256).

One-GPU variant (one 80 GB GPU): 16 envs, 4 rollout epochs, global batch 512, the largest micro-batch of
128 / 64 / 32 whose memory estimate fits 70 GiB (128 for all of them), bf16 autocast; the recipe is
otherwise unchanged. Both scales run under bf16
autocast (trained weights stay float32), and Flow-Noise with gradient checkpointing: in float32 its
micro-batch of 128 would need ≈ 140 GiB. Each header states the start-up memory estimate. Measured on an
H200 with the full pi0 (benchmarks/vla_gpu.py, bf16 frozen weights): update peak 17 GiB (Flow-SDE) /
31 GiB (Flow-Noise) at micro-batch 32, rollout of 64 observations 12 GiB. Both scales keep the frozen
prefix of every update sample across the update epochs within 40 GiB (`algorithm.prefix_cache_gib`):
10.3 MB per sample for pi0 at two cameras, 30 GiB for the 3,072 decisions of a one-GPU iteration and
39 GiB for Goal's 4,096.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lerobot_pirl.algorithms.config import VALUE_HEAD_DEFAULTS

HERE = Path(__file__).parent
EXAMPLES = HERE.parent  # what `python -m lerobot_pirl.examples` prints

# LeRobot's published LIBERO fine-tunes (hub ids, not downloaded here). Override with --policy.path.
POLICY_PATHS = {"pi0": "lerobot/pi0_libero_finetuned", "pi05": "lerobot/pi05_libero_finetuned"}
SUITES = {  # short name -> (LeRobot suite name, episode length, C)
    "spatial": ("libero_spatial", 240, 5),
    "object": ("libero_object", 240, 5),
    "goal": ("libero_goal", 320, 5),
    "long": ("libero_10", 480, 10),
}
DENOISING_STEPS = {  # K per policy and suite
    "pi0": {"spatial": 4, "object": 4, "goal": 4, "long": 4},
    "pi05": {"spatial": 3, "object": 5, "goal": 5, "long": 5},
}
NOISE_LEVELS = {  # Flow-SDE a per policy and suite
    "pi0": dict.fromkeys(SUITES, 0.5),
    "pi05": {"spatial": 0.5, "object": 0.3, "goal": 0.3, "long": 0.5},
}
PPO_UPDATE_EPOCHS = {
    "pi0": {"spatial": 4, "object": 4, "goal": 4, "long": 4},
    "pi05": {"spatial": 1, "object": 1, "goal": 4, "long": 4},
}
GRPO_UPDATE_EPOCHS = {
    "pi0": {"spatial": 2, "object": 2, "goal": 2, "long": 4},
    "pi05": {"spatial": 1, "object": 1, "goal": 1, "long": 4},
}
VALUE_HEADS = {  # the reference's critics (algorithms/config.py VALUE_HEAD_DEFAULTS), written out
    policy: {k: list(v) if isinstance(v, tuple) else v for k, v in VALUE_HEAD_DEFAULTS[policy].items()}
    for policy in ("pi0", "pi05")
}
ALGORITHMS = ("ppo_flow_sde", "ppo_flow_noise", "grpo")
# The frozen prefix of every update sample, kept across epochs: 10.3 MB per sample for pi0 at LIBERO's
# two cameras (bf16), so a one-GPU iteration's 3,072 decisions take 30 GiB, Goal's 4,096 39 GiB (a
# reference-scale rank of 8 the same); more than this budget recomputes the prefix every epoch.
PREFIX_CACHE_GIB = 40.0
SCALES = {  # envs, rollout epochs, global batch, micro-batch
    "reference": {"num_envs": 64, "rollout_epochs": 8, "minibatch": 2048, "micro_batch": 128},
    "1gpu": {"num_envs": 16, "rollout_epochs": 4, "minibatch": 512, "micro_batch": None},  # sized below
}
ONE_GPU_MICRO_BATCHES = (128, 64, 32)  # the largest whose estimate fits ONE_GPU_GIB is taken
ONE_GPU_GIB = 70  # of an 80 GB card: room for the allocator's reserve and the CUDA context


def make_config(policy: str, suite: str, algorithm: str, scale: str) -> dict:
    suite_name, episode_length, executed = SUITES[suite]
    sizes = SCALES[scale]
    decisions_per_episode = -(-episode_length // executed)
    is_grpo = algorithm == "grpo"
    exploration = "flow_noise" if algorithm == "ppo_flow_noise" else "flow_sde"
    algorithm_cfg = {
        "type": "grpo" if is_grpo else "ppo",
        "exploration": exploration,
        "noise_level": NOISE_LEVELS[policy][suite],
        "noise_std_min": 0.08,
        "noise_std_max": 0.16,
        "entropy_coef": 0.005,  # Flow-Noise only
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "actor_lr": 5.0e-6,
        "critic_lr": 1.0e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_eps": 1.0e-8,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "update_epochs": (GRPO_UPDATE_EPOCHS if is_grpo else PPO_UPDATE_EPOCHS)[policy][suite],
        "minibatch_size": sizes["minibatch"],
        "micro_batch_size": sizes["micro_batch"],
        "prefix_cache_gib": PREFIX_CACHE_GIB,
        "clip_ratio": 0.2,
        # GRPO: Â standardised per group only, every episode weighing the same (DESIGN.md §4)
        "normalize_advantages": not is_grpo,
        "loss_weighting": "episode" if is_grpo else "decision",
    }
    if is_grpo:
        algorithm_cfg["group_size"] = 8
    else:
        algorithm_cfg.update(value_clip=0.2, huber_delta=10.0, **VALUE_HEADS[policy])
    one_gpu = scale == "1gpu"
    return {
        "policy": {"path": POLICY_PATHS[policy]},
        "env": {
            "type": "libero",
            "task": suite_name,
            "task_ids": [0],  # one task per run: --env.task_ids='[k]' for task k
            "episode_length": episode_length,
            "hard_reset": False,  # soft resets: ~1 s instead of 6-10 s, same observations
            "observation_height": 256,  # the camera size of LeRobot's LIBERO datasets
            "observation_width": 256,
        },
        "algorithm": algorithm_cfg,
        "rollout": {
            "num_envs": sizes["num_envs"],
            "num_workers": None,  # env workers: one per core, at most one per env
            "decisions_per_env": sizes["rollout_epochs"] * decisions_per_episode,  # PPO
            "episodes_per_env": sizes["rollout_epochs"],  # GRPO
            "n_action_steps": executed,
            "num_inference_steps": DENOISING_STEPS[policy][suite],
            "sparse_reward": True,
            "fast_render": False,  # pretrained policies must see LeRobot's default rendering
        },
        "eval": {"freq": 10, "n_episodes": 50, "batch_size": 25 if not one_gpu else 10, "videos": 2},
        "policy_options": {
            "train_vlm": False,
            "lora_rank": 0,  # e.g. 16 to train LoRA factors of the expert instead
            # bf16 activations, and Flow-Noise's K expert passes recomputed in backward: without them
            # Flow-Noise at micro-batch 128 needs ≈ 140 GiB (runtime/memory.py), more than one GPU has.
            "autocast_dtype": "bfloat16",
            "gradient_checkpointing": exploration == "flow_noise",  # Flow-SDE's one pass gains nothing
        },
        "iterations": 300,
        "save_freq": 10,
        "job_name": f"{policy}_{suite_name}_{algorithm}" + ("_1gpu" if one_gpu else ""),
    }


def config_path(policy: str, suite: str, algorithm: str, scale: str) -> Path:
    suffix = "_1gpu" if scale == "1gpu" else ""
    return HERE / policy / f"{suite}_{algorithm}{suffix}.yaml"


def estimate(config: dict, policy: str):
    """The start-up memory estimate (runtime/memory.py) of a config for the full-size policy."""
    import draccus

    from lerobot_pirl.runtime.config import TrainConfig
    from lerobot_pirl.runtime.memory import FULL_SIZE_PROFILES, estimate_memory

    cfg = draccus.decode(TrainConfig, {key: value for key, value in config.items() if key != "policy"})
    cfg.algorithm = cfg.algorithm.resolved(policy)
    return estimate_memory(cfg, FULL_SIZE_PROFILES[policy])


def sized_for_one_gpu(config: dict, policy: str) -> dict:
    """The config with the largest micro-batch of ONE_GPU_MICRO_BATCHES whose estimate fits one GPU."""
    for micro in ONE_GPU_MICRO_BATCHES:
        config["algorithm"]["micro_batch_size"] = micro
        if estimate(config, policy).gpu_gib <= ONE_GPU_GIB:
            return config
    raise ValueError(
        f"{config['job_name']}: no micro-batch of {ONE_GPU_MICRO_BATCHES} fits {ONE_GPU_GIB} GiB"
    )


def memory_line(config: dict, policy: str) -> str:
    """What the config needs, by the start-up estimate for the full-size policy."""
    needs = estimate(config, policy)
    return f"# Needs {MEMORY_FORMAT.format(gpu=needs.gpu_gib, host=needs.host_gb)}\n"


# Stated in every config's header; tests read it back with this format.
MEMORY_FORMAT = (
    "GPU ≈ {gpu:.0f} GiB, host RAM ≈ {host:.0f} GB (runtime/memory.py estimate, one env worker per env)."
)


def header(policy: str, suite: str, algorithm: str, scale: str, config: dict) -> str:
    where = "one 80 GB GPU" if scale == "1gpu" else "the reference scale (64 envs x 8 rollout epochs)"
    name = config_path(policy, suite, algorithm, scale).relative_to(EXAMPLES)
    distributed = (
        "# Reference scale: its 89 LIBERO envs need more host RAM than one machine usually has; run it as a\n"
        "# learner with actors (docs/distributed.md), each actor holding part of the envs.\n"
        if scale == "reference"
        else ""
    )
    return (
        f"# {policy} on LIBERO {suite} ({SUITES[suite][0]}), {algorithm}, {where}.\n"
        "# Written by lerobot_pirl/examples/libero/make_configs.py (its docstring: where values come from).\n"
        f"#   lerobot-pirl-train --config_path=$(python -m lerobot_pirl.examples)/{name}\n"
        + memory_line(config, policy)
        + distributed
    )


def all_configs() -> dict[Path, str]:
    """{path: file text} of every config this script writes."""
    files = {}
    for policy in POLICY_PATHS:
        for suite in SUITES:
            for algorithm in ALGORITHMS:
                for scale in SCALES:
                    config = make_config(policy, suite, algorithm, scale)
                    if scale == "1gpu":
                        config = sized_for_one_gpu(config, policy)
                    body = yaml.safe_dump(config, sort_keys=False)
                    files[config_path(policy, suite, algorithm, scale)] = (
                        header(policy, suite, algorithm, scale, config) + body
                    )
    return files


def main() -> None:
    for path, text in all_configs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(all_configs())} configs under {HERE}")


if __name__ == "__main__":
    main()
