"""Collection with env workers (`--rollout.num_workers`): env steps/s, start-up, memory, reset stalls.

MetaWorld (default): the main job's policy (the cached few-shot bootstrap) and env, 32 envs. The same
collection with W = 0 (in-process), 1 and 2 workers, alternated, `--repeats` times: env steps/s and
the ratio to W = 0; a random-action chunk loop on the same envs (one message per decision, resets as
in collection) gives the env-only rate; one PPO iteration (collect + update) gives the training
throughput. Start-up seconds and per-worker memory (RSS and PSS) for 32 and 64 envs.

LIBERO (`--libero`): 4 envs of libero_spatial task 0 with random actions: CPU-s per env step, start-up,
and the stall one finished env's reset causes: before the fix (a masked reset before the next decision,
in-process) and with it (the env sits out a decision, frozen, and is reset after that decision's chunk),
in-process and with 2 workers.

    python benchmarks/collection_scaling.py            # MetaWorld, ~5 min on 2 cores
    python benchmarks/collection_scaling.py --libero   # ~5 min on 2 cores, ~10 GB of RAM
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from lerobot.envs.utils import close_envs

from lerobot_pirl.algorithms.base import make_algorithm
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.rollout.workers import ShardedVectorEnv
from lerobot_pirl.runtime.config import TrainConfig
from lerobot_pirl.runtime.envs import WORKER_ENV_TYPES, make_rollout_envs
from lerobot_pirl.runtime.factory import (
    build_collector,
    build_rl_policy,
    resolve_policy_source,
    single_vec_env,
)
from lerobot_pirl_launch.forkserver import start_forkserver


def worker_memory_mib(vec_env) -> dict[str, float]:
    """Mean RSS and PSS (shared pages split between the processes sharing them) per worker."""
    if not isinstance(vec_env, ShardedVectorEnv):
        return {}
    rss, pss = [], []
    for process in vec_env._processes:
        info = psutil.Process(process.pid).memory_full_info()
        rss.append(info.rss / 2**20)
        pss.append(info.pss / 2**20)
    return {"worker_rss_mib": float(np.mean(rss)), "worker_pss_mib": float(np.mean(pss))}


def workers_cpu_s(vec_env) -> float:
    if not isinstance(vec_env, ShardedVectorEnv):
        return 0.0
    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in vec_env._processes)


def random_chunk_sps(collector, decisions: int, seed: int) -> float:
    """Env-only rate: chunks of uniform random actions, finished envs sitting one decision out while
    they reset (as collection does), one message per decision and worker."""
    rng = np.random.default_rng(seed)
    n, chunk = collector.num_envs, collector.policy.n_action_steps
    action_dim = collector.vec_env.single_action_space.shape[0]
    collector.reset(list(range(seed, seed + n)))
    pending: list[int | None] = [None] * n
    no_success = np.zeros(n, dtype=bool)
    steps, next_seed = 0, seed + n
    start = time.perf_counter()
    for _ in range(decisions):
        active = np.array([s is None for s in pending])
        actions = rng.uniform(-1, 1, size=(chunk, n, action_dim)).astype(np.float32)
        _, outcome = collector._run_chunk(actions, active, no_success, pending)
        steps += int(outcome.steps.sum())
        pending = [None] * n
        for env in np.flatnonzero((outcome.terminated | outcome.truncated) & active):
            pending[env], next_seed = next_seed, next_seed + 1
    return steps / (time.perf_counter() - start)


def collection_sps(collector, decisions: int, exploration: str) -> float:
    start = time.perf_counter()
    batch = collector.collect(decisions, exploration)
    return batch.env_steps / (time.perf_counter() - start)


def metaworld(args) -> dict:
    cfg = TrainConfig()  # the main job: pick-place-v3, 32 envs, 200-step episodes, PPO + Flow-SDE
    cfg.rollout.num_envs = args.num_envs
    policy_path = resolve_policy_source(cfg, None)  # the cached few-shot bootstrap
    policy, pre, post = build_rl_policy(cfg, policy_path, torch.device("cpu"), apply_cli_overrides=False)
    exploration = cfg.algorithm.exploration
    # Cold: the forkserver's imports are part of the first start-up (the trainer starts the forkserver
    # before loading the policy, so there they overlap); warm: later start-ups, e.g. each evaluation's.
    startup = []
    for num_envs, label in ((32, "cold"), (32, "warm"), (64, "warm")):
        begin = time.perf_counter()
        if label == "cold":
            start_forkserver(WORKER_ENV_TYPES[cfg.env.type][0])
        envs = make_rollout_envs(cfg.env, num_envs, False, num_workers=2)
        seconds = time.perf_counter() - begin
        startup.append(
            {
                "num_envs": num_envs,
                "num_workers": 2,
                "forkserver": label,
                "start_s": seconds,
                **worker_memory_mib(single_vec_env(envs)),
            }
        )
        close_envs(envs)
        print(f"start-up {num_envs} envs, 2 workers, {label} forkserver: {startup[-1]}")

    collectors = {}
    for w in args.workers:
        collectors[w] = build_collector(
            cfg,
            policy,
            pre,
            post,
            num_envs=args.num_envs,
            device=torch.device("cpu"),
            seed=1000 + w,
            num_workers=w,
        )
        collectors[w][0].collect(2, exploration)  # warm-up (first resets, allocation)
    rows = []
    for repeat in range(args.repeats):  # alternate, so machine load hits every W alike
        for w in args.workers:
            collector = collectors[w][0]
            rl = collection_sps(collector, args.decisions, exploration)
            cpu_before = workers_cpu_s(collector.vec_env)
            rnd = random_chunk_sps(collector, args.decisions, seed=10_000 * (repeat + 1))
            rows.append(
                {
                    "num_workers": w,
                    "repeat": repeat,
                    "collection_sps": rl,
                    "random_sps": rnd,
                    "random_worker_cpu_s": workers_cpu_s(collector.vec_env) - cpu_before,
                }
            )
            print(f"repeat {repeat} W={w}: collection {rl:.0f} steps/s, random actions {rnd:.0f} steps/s")

    # One whole PPO iteration (collect + update) per W, as the trainer runs it.
    algorithm = make_algorithm(cfg.algorithm)
    iterations = []
    for w in args.workers:
        collector = collectors[w][0]
        optimizer = make_optimizer(policy, cfg.algorithm)
        state = {k: v.clone() for k, v in policy.state_dict().items()}
        begin = time.perf_counter()
        batches = algorithm.collect(collector, cfg.rollout, lambda *a: None)
        collect_s = time.perf_counter() - begin
        samples, _ = algorithm.update_samples(batches)
        policy_update(policy, optimizer, samples, cfg.algorithm, torch.device("cpu"))
        total_s = time.perf_counter() - begin
        policy.load_state_dict(state)  # every W starts its iteration from the same policy
        env_steps = sum(b.env_steps for b in batches)
        iterations.append(
            {
                "num_workers": w,
                "env_steps": env_steps,
                "collect_s": collect_s,
                "iteration_s": total_s,
                "iteration_sps": env_steps / total_s,
            }
        )
    for _, envs in collectors.values():
        close_envs(envs)

    summary = []
    base = np.median([r["collection_sps"] for r in rows if r["num_workers"] == 0])
    best_random = max(
        np.median([r["random_sps"] for r in rows if r["num_workers"] == w]) for w in args.workers
    )
    print(
        f"\n{'W':>2s} {'collect SPS':>11s} {'x W=0':>6s} {'random SPS':>10s} {'collect/random':>14s} "
        f"{'iter SPS':>8s} {'iter/best random':>16s}"
    )
    for w in args.workers:
        rl = float(np.median([r["collection_sps"] for r in rows if r["num_workers"] == w]))
        rnd = float(np.median([r["random_sps"] for r in rows if r["num_workers"] == w]))
        it = next(i for i in iterations if i["num_workers"] == w)
        summary.append(
            {
                "num_workers": w,
                "collection_sps": rl,
                "ratio_to_w0": rl / base,
                "random_sps": rnd,
                "collection_over_random": rl / rnd,
                "iteration_sps": it["iteration_sps"],
                "iteration_over_best_random": it["iteration_sps"] / best_random,
            }
        )
        print(
            f"{w:2d} {rl:11.0f} {rl / base:6.2f} {rnd:10.0f} {rl / rnd:14.2f} {it['iteration_sps']:8.0f} "
            f"{it['iteration_sps'] / best_random:16.2f}"
        )
    return {"startup": startup, "rows": rows, "iterations": iterations, "summary": summary}


def libero(args) -> dict:
    from lerobot.envs.configs import LiberoEnv

    from lerobot_pirl.rollout.chunks import RewardRules, reset_envs, run_chunk
    from lerobot_pirl.runtime.envs import start_env_worker_server

    env_cfg = LiberoEnv(task="libero_spatial", task_ids=[0], hard_reset=False)
    num_envs, chunk, decisions = 4, 5, args.libero_decisions
    rules = RewardRules()
    start_env_worker_server(env_cfg)
    time.sleep(args.forkserver_wait_s)  # start-up below is the workers' own (envs built in parallel)
    results = []
    for w in (0, 2):
        begin = time.perf_counter()
        envs = make_rollout_envs(env_cfg, num_envs, False, num_workers=w)
        vec_env = single_vec_env(envs)
        if w == 0:
            from lerobot_pirl.rollout.collector import freeze_finished_episodes

            vec_env = freeze_finished_episodes(vec_env)
        reset_envs(vec_env, list(range(num_envs)))
        start_s = time.perf_counter() - begin
        memory = worker_memory_mib(vec_env) or {"process_rss_mib": psutil.Process().memory_info().rss / 2**20}
        rng = np.random.default_rng(0)
        active, succeeded = np.ones(num_envs, dtype=bool), np.zeros(num_envs, dtype=bool)

        def chunk_s(reset_seeds=None, vec_env=vec_env, active=active, succeeded=succeeded, rng=rng):
            actions = rng.uniform(-1, 1, size=(chunk, num_envs, 7)).astype(np.float32)
            begin = time.perf_counter()
            if isinstance(vec_env, ShardedVectorEnv):
                vec_env.run_chunk(actions, active, succeeded, rules, reset_seeds)
            else:
                run_chunk(vec_env, actions, active, succeeded, rules, reset_seeds)
            return time.perf_counter() - begin

        chunk_s()  # warm-up
        cpu_before = time.process_time() + workers_cpu_s(vec_env)
        plain = [chunk_s() for _ in range(decisions)]
        cpu_per_step = (time.process_time() + workers_cpu_s(vec_env) - cpu_before) / (
            decisions * chunk * num_envs
        )
        # Env 0's episode ends: frozen as FreezeAfterEpisodeEnd freezes it (no sim work until its reset).
        frozen = (vec_env.single_observation_space.sample(), 0.0, True, False, {})
        stalls, stalls_before = [], []
        for i in range(args.libero_resets):
            if w == 0:
                # Before the fix: a masked reset of env 0 between two decisions, while every env waits.
                begin = time.perf_counter()
                reset_envs(vec_env, [100 + i, None, None, None], np.array([True, False, False, False]))
                stalls_before.append(time.perf_counter() - begin)
                chunk_s()
            # The fix: env 0 sits out a decision, frozen, and is reset right after that decision's chunk
            # (in its worker with W = 2, while the other worker steps its envs). The stall is what this
            # chunk takes beyond a chunk of four running envs.
            vec_env.set_attr("_frozen", [frozen, None, None, None])
            active[0] = False
            stalls.append(chunk_s([100 + i, None, None, None]) - float(np.median(plain)))
            active[0] = True
            chunk_s()
        results.append(
            {
                "num_workers": w,
                "num_envs": num_envs,
                "start_s": start_s,
                **memory,
                "chunk_s": float(np.median(plain)),
                "cpu_s_per_env_step": cpu_per_step,
                "reset_stall_s": float(np.median(stalls)),
                "reset_stalls_s": stalls,
                **({"reset_stall_before_fix_s": float(np.median(stalls_before))} if stalls_before else {}),
            }
        )
        print(results[-1])
        close_envs(envs)
    return {"libero": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_envs", type=int, default=32)
    parser.add_argument("--decisions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forkserver_wait_s", type=float, default=20.0)
    parser.add_argument("--libero", action="store_true")
    parser.add_argument("--libero_decisions", type=int, default=6)
    parser.add_argument("--libero_resets", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/collection_scaling{'_libero' if args.libero else ''}.json")
    result = libero(args) if args.libero else metaworld(args)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **result}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
