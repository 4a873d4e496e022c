"""One evaluation of the main job's policy: seconds for 50 episodes by eval batch size and video count.

The main job's env (pick-place-v3, 200-step episodes) and policy (the cached few-shot bootstrap),
`--eval.num_workers=2`; each configuration builds its envs, evaluates, closes them, as the trainer does
at every evaluation. Configurations alternate, `--repeats` times.

    python benchmarks/evaluation_speed.py     # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lerobot.envs.utils import close_envs

from lerobot_pirl.runtime.config import TrainConfig
from lerobot_pirl.runtime.envs import WORKER_ENV_TYPES
from lerobot_pirl.runtime.evaluation import evaluate
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy, resolve_policy_source
from lerobot_pirl_launch.forkserver import start_forkserver

CONFIGURATIONS = ((10, 0), (10, 2), (50, 0), (50, 2))  # (eval envs, recorded videos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/evaluation_speed.json")
    args = parser.parse_args()
    cfg = TrainConfig()
    start_forkserver(WORKER_ENV_TYPES[cfg.env.type][0])
    policy, pre, post = build_rl_policy(
        cfg, resolve_policy_source(cfg, None), torch.device("cpu"), apply_cli_overrides=False
    )
    video_dir = Path(tempfile.mkdtemp())
    rows = []
    for repeat in range(args.repeats + 1):  # repeat 0 warms the forkserver and the caches up
        for batch_size, videos in CONFIGURATIONS:
            begin = time.perf_counter()
            collector, envs = build_collector(
                cfg,
                policy,
                pre,
                post,
                num_envs=batch_size,
                device=torch.device("cpu"),
                num_workers=args.num_workers,
            )
            result = evaluate(
                collector, cfg.eval.n_episodes, cfg.eval.seed, video_dir=video_dir, n_videos=videos
            )
            close_envs(envs)
            seconds = time.perf_counter() - begin
            if repeat:
                rows.append(
                    {"batch_size": batch_size, "videos": videos, "repeat": repeat, "seconds": seconds}
                )
            print(f"repeat {repeat} batch {batch_size} videos {videos}: {seconds:.2f} s, {result.summary()}")
    summary = []
    print(f"\n{'eval envs':>9s} {'videos':>6s} {'s (median)':>10s}")
    for batch_size, videos in CONFIGURATIONS:
        median = float(
            np.median([r["seconds"] for r in rows if (r["batch_size"], r["videos"]) == (batch_size, videos)])
        )
        summary.append({"batch_size": batch_size, "videos": videos, "seconds": median})
        print(f"{batch_size:9d} {videos:6d} {median:10.2f}")
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
