"""LIBERO env steps per second on CPU: default vs fast rendering, 64/128 px, 1/2 envs.

    HF_HUB_OFFLINE=1 MUJOCO_GL=egl .venv/bin/python benchmarks/libero_speed.py
    (options: --task=libero_spatial --task_id=0 --steps=30 --output=benchmarks/results/libero_speed.json)

Each case builds LeRobot's LIBERO env for one task through `make_libero_envs` (training config:
soft resets; both cameras, as LeRobot's LIBERO policies use them; 2 envs run in async workers), resets
once (not timed: it builds the sim), takes `warmup_steps`, then times `steps` vector steps of small
random actions and one soft reset. Prints a table and writes JSON with each case's env-steps/s, its
ratio to the default-render, 1-env, 128 px case, and the 1-minute load average after it (the numbers
are only comparable on an otherwise idle machine).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported; headless CPU rendering

import draccus
import numpy as np

from lerobot_pirl.envs.libero_setup import ensure_libero_ready

BASELINE = {"fast_render": False, "n_envs": 1, "image_size": 128}


@dataclass
class LiberoSpeedConfig:
    task: str = "libero_spatial"
    task_id: int = 0
    image_sizes: list[int] = field(default_factory=lambda: [64, 128])
    n_envs: list[int] = field(default_factory=lambda: [1, 2])
    warmup_steps: int = 3
    steps: int = 30
    seed: int = 0
    output: Path = Path("benchmarks/results/libero_speed.json")


def measure_case(cfg: LiberoSpeedConfig, fast_render: bool, n_envs: int, image_size: int) -> dict:
    from lerobot_pirl.envs.libero_tools import libero_training_config, make_libero_envs, reset_groups

    env_cfg = libero_training_config(
        task=cfg.task, task_ids=[cfg.task_id], observation_height=image_size, observation_width=image_size
    )
    vec_env = make_libero_envs(env_cfg, n_envs, use_async_envs=True, fast_render=fast_render)[cfg.task][
        cfg.task_id
    ]
    rng = np.random.default_rng(cfg.seed)
    try:
        start = time.perf_counter()
        reset_groups(vec_env, 1, list(range(n_envs)), [cfg.seed] * n_envs)
        first_reset_s = time.perf_counter() - start
        for _ in range(cfg.warmup_steps):
            vec_env.step(rng.uniform(-0.3, 0.3, size=(n_envs, 7)).astype(np.float32))
        start = time.perf_counter()
        for _ in range(cfg.steps):
            vec_env.step(rng.uniform(-0.3, 0.3, size=(n_envs, 7)).astype(np.float32))
        step_s = time.perf_counter() - start
        start = time.perf_counter()
        reset_groups(vec_env, 1, list(range(n_envs)), [cfg.seed] * n_envs)
        soft_reset_s = time.perf_counter() - start
    finally:
        vec_env.close()
    return {
        "fast_render": fast_render,
        "n_envs": n_envs,
        "image_size": image_size,
        "env_steps_per_s": n_envs * cfg.steps / step_s,
        "first_reset_s": first_reset_s,
        "soft_reset_s": soft_reset_s,
    }


@draccus.wrap()
def main(cfg: LiberoSpeedConfig) -> None:
    ensure_libero_ready()
    results = []
    # Default and fast side by side, so that a change in machine load between cases biases their
    # ratio as little as possible.
    for n_envs in cfg.n_envs:
        for image_size in cfg.image_sizes:
            for fast_render in (False, True):
                result = measure_case(cfg, fast_render, n_envs, image_size)
                result["load_average_1min"] = os.getloadavg()[0]
                results.append(result)
                print(f"done: {result}", flush=True)

    baseline = next(r for r in results if all(r[k] == v for k, v in BASELINE.items()))
    for result in results:
        result["ratio_vs_baseline"] = result["env_steps_per_s"] / baseline["env_steps_per_s"]

    header = (
        f"{'render':>7} {'envs':>4} {'px':>4} {'env-steps/s':>11} {'ratio':>6} {'1st reset s':>11} "
        f"{'reset s':>7} {'load':>5}"
    )
    print(f"\nLIBERO {cfg.task} task {cfg.task_id}, {cfg.steps} vector steps, CPU ({os.cpu_count()} cores)")
    print(header)
    for r in results:
        print(
            f"{'fast' if r['fast_render'] else 'default':>7} {r['n_envs']:>4} {r['image_size']:>4} "
            f"{r['env_steps_per_s']:>11.2f} {r['ratio_vs_baseline']:>6.2f} {r['first_reset_s']:>11.1f} "
            f"{r['soft_reset_s']:>7.1f} {r['load_average_1min']:>5.1f}"
        )
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "baseline": BASELINE,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    cfg.output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {cfg.output}")


if __name__ == "__main__":
    main()
