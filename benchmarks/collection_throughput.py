"""Env-steps/s of RL collection vs a random-action loop on the same vector env, in the same run.

Both loops step the same MetaWorld state vector env in chunks of C actions and restart finished
episodes at chunk boundaries, so the ratio measures what collection adds: LeRobot's observation
processing, the policy's processors, the denoising chain (K velocity calls) and the bookkeeping.
Episodes run to the time limit in both loops (no early end at success), so both reset equally often;
the "as trained" row adds success termination to collection alone, for reference.

    python benchmarks/collection_throughput.py --task=reach-v3 --num_envs=8 --decisions=64
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import close_envs

import lerobot_pirl.envs  # noqa: F401
from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.runtime.config import RolloutConfig, TrainConfig
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp


def random_loop_sps(collector, decisions: int, chunk: int, seed: int) -> float:
    """The collector's env loop with uniform random actions instead of the policy."""
    vec_env = collector.vec_env
    rng = np.random.default_rng(seed)
    collector.reset(list(range(seed, seed + collector.num_envs)))
    steps, next_seed = 0, seed + collector.num_envs
    start = time.perf_counter()
    for _ in range(decisions):
        ended = np.zeros(collector.num_envs, dtype=bool)
        for _ in range(chunk):
            actions = rng.uniform(-1, 1, size=(collector.num_envs, 4)).astype(np.float32)
            _, _, terminated, truncated, _ = vec_env.step(actions)
            steps += int((~ended).sum())
            ended |= terminated | truncated
        if ended.any():
            seeds = [None] * collector.num_envs
            for env in np.flatnonzero(ended):
                seeds[env], next_seed = next_seed, next_seed + 1
            collector.reset(seeds, mask=ended)
    return steps / (time.perf_counter() - start)


def collection_sps(collector, decisions: int, exploration: str) -> float:
    collector.collect(2, exploration)  # warm-up
    start = time.perf_counter()
    batch = collector.collect(decisions, exploration)
    return batch.env_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--num_envs", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=64)
    parser.add_argument("--episode_length", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--policy_path", default=None, help="default: a fresh tiny flow_mlp (same cost as any)"
    )
    parser.add_argument("--out", default="benchmarks/results/collection_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy_path = args.policy_path or save_tiny_flow_mlp(
        Path("/tmp/lerobot_pirl_bench_policy"),
        chunk_size=8,
        num_inference_steps=4,
        hidden_dim=256,
        feature_dim=256,
        num_layers=3,
        encoder_num_layers=2,
    )

    rows = []
    for label, terminate in (("same episodes", False), ("as trained (ends at success)", True)):
        env = EnvConfig.get_choice_class("metaworld_state")(
            task=args.task, episode_length=args.episode_length, terminate_on_success=terminate
        )
        for exploration in ("flow_sde", "flow_noise"):
            cfg = TrainConfig(
                env=env,
                algorithm=PPOConfig(exploration=exploration),
                rollout=RolloutConfig(num_envs=args.num_envs, end_on_success=terminate),
            )
            policy, pre, post = build_rl_policy(
                cfg, policy_path, torch.device("cpu"), apply_cli_overrides=False
            )
            collector, envs = build_collector(
                cfg, policy, pre, post, num_envs=args.num_envs, device=torch.device("cpu")
            )
            chunk = policy.n_action_steps
            for repeat in range(args.repeats):  # alternate, so machine load hits both loops alike
                random_sps = random_loop_sps(collector, args.decisions, chunk, seed=1000 * repeat)
                rl_sps = collection_sps(collector, args.decisions, exploration)
                rows.append(
                    {
                        "episodes": label,
                        "exploration": exploration,
                        "repeat": repeat,
                        "random_sps": random_sps,
                        "collection_sps": rl_sps,
                        "ratio": rl_sps / random_sps,
                    }
                )
            close_envs(envs)

    print(f"{'episodes':30s} {'exploration':11s} {'random SPS':>10s} {'collect SPS':>11s} {'ratio':>6s}")
    for label in dict.fromkeys(r["episodes"] for r in rows):
        for exploration in ("flow_sde", "flow_noise"):
            subset = [r for r in rows if r["episodes"] == label and r["exploration"] == exploration]
            random_sps = float(np.median([r["random_sps"] for r in subset]))
            rl_sps = float(np.median([r["collection_sps"] for r in subset]))
            ratio = float(np.median([r["ratio"] for r in subset]))
            print(f"{label:30s} {exploration:11s} {random_sps:10.0f} {rl_sps:11.0f} {ratio:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch_threads": 1, "args": vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
