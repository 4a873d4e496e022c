"""Success rate of MetaWorld's scripted experts in MetaWorldStateEnv, with and without action noise.

Episode k of each (task, noise) cell starts from ``reset(seed=k)`` and ends at the first success or
after the episode length (500 by default); noise is N(0, noise²) added to the clipped expert action.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/metaworld_expert_success.py --episodes 10 \
        --output outputs/benchmarks/metaworld_expert_success.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from lerobot_pirl.envs.metaworld_state import METAWORLD_MAX_PATH_LENGTH, MetaWorldStateEnv
from lerobot_pirl.rollout.scripted_demos import expert_action, metaworld_expert


def steps_to_success(task: str, seed: int, action_noise: float, episode_length: int) -> int | None:
    """Steps until the first success of one expert episode, or None if it never succeeds."""
    env = MetaWorldStateEnv(task, episode_length=episode_length)
    expert, rng = metaworld_expert(task), np.random.default_rng(seed)
    try:
        observation, _ = env.reset(seed=seed)
        for step in range(1, episode_length + 1):
            action = expert_action(expert, observation["environment_state"], action_noise, rng)
            observation, _, terminated, truncated, info = env.step(action)
            if info["is_success"]:
                return step
            if terminated or truncated:
                return None
    finally:
        env.close()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["push-v3", "pick-place-v3", "door-open-v3", "reach-v3"]
    )
    parser.add_argument("--noises", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--episode-length", type=int, default=METAWORLD_MAX_PATH_LENGTH)
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/benchmarks/metaworld_expert_success.json")
    )
    args = parser.parse_args()

    rows = []
    print(f"{'task':16s} {'noise':>5s} {'success':>9s} {'steps mean':>10s} {'median':>6s} {'max':>5s}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        for task in args.tasks:
            for noise in args.noises:
                results = [
                    steps_to_success(task, seed, noise, args.episode_length) for seed in range(args.episodes)
                ]
                steps = [s for s in results if s is not None]
                row = {
                    "task": task,
                    "action_noise": noise,
                    "episodes": args.episodes,
                    "successes": len(steps),
                    "steps_to_success_mean": float(np.mean(steps)) if steps else None,
                    "steps_to_success_median": float(np.median(steps)) if steps else None,
                    "steps_to_success_max": max(steps) if steps else None,
                }
                rows.append(row)
                mean, median, longest = (
                    (f"{np.mean(steps):10.1f}", f"{np.median(steps):6.0f}", f"{max(steps):5d}")
                    if steps
                    else (f"{'-':>10s}", f"{'-':>6s}", f"{'-':>5s}")
                )
                print(
                    f"{task:16s} {noise:5.2f} {len(steps):>4d}/{args.episodes:<4d} {mean} {median} {longest}",
                    flush=True,
                )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"episode_length": args.episode_length, "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
