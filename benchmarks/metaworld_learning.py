"""MetaWorld learning benchmark: few-shot SFT baseline vs PPO + Flow-SDE, PPO + Flow-Noise, GRPO + Flow-SDE.

Each run is one `lerobot-pirl-train` process (one torch thread) from the task's cached few-shot flow_mlp,
stopped after `--minutes` of wall time or `--max_env_steps` training env steps, whichever comes first;
the SFT baseline is the trainer's own first evaluation (same protocol, same episodes). Runs go
`--parallel` at a time, so on a 2-core machine with --parallel=2 each run has one core. Prints a table,
writes JSON and a plot; results.json keeps the rows of earlier invocations for the (task, method, seed,
label) runs not made again. `--seeds` are training seeds: every seed starts from the same bootstrap.

    python benchmarks/metaworld_learning.py --tasks pick-place-v3 push-v3 --minutes 30 --parallel 2
    python benchmarks/metaworld_learning.py --tasks pick-place-v3 push-v3 --methods ppo_flow_noise \\
        grpo_flow_sde --seeds 1 2 --max_env_steps 400000 --label after   # at equal env steps
    python benchmarks/metaworld_learning.py --bootstrap-only      # build the SFT policies (cached)
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "ppo_flow_sde": ["--algorithm.type=ppo", "--algorithm.exploration=flow_sde"],
    "ppo_flow_noise": ["--algorithm.type=ppo", "--algorithm.exploration=flow_noise"],
    "grpo_flow_sde": [
        "--algorithm.type=grpo",
        "--algorithm.exploration=flow_sde",
        "--algorithm.group_size=4",
    ],
}


def bootstrap(task: str, demos: int, seed: int, cache_dir: str) -> Path:
    from lerobot.envs.configs import EnvConfig

    import lerobot_pirl.envs  # noqa: F401
    from lerobot_pirl.runtime.bootstrap import bootstrap_flow_policy
    from lerobot_pirl.runtime.config import BootstrapConfig

    env = EnvConfig.get_choice_class("metaworld_state")(task=task)
    return bootstrap_flow_policy(env, BootstrapConfig(num_demos=demos, cache_dir=Path(cache_dir)), seed=seed)


def run_summary(run_dir: Path, target: float = 0.9) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval/success_rate") is not None]
    sft, final = evals[0], evals[-1]
    best = max(evals, key=lambda r: (r["eval/success_rate"], -r["env_steps"]))
    reached = next((r for r in evals[1:] if r["eval/success_rate"] >= target), None)
    return {
        "sft_success": sft["eval/success_rate"],
        "final_success": final["eval/success_rate"],
        "final_ci": [final.get("eval/ci_low"), final.get("eval/ci_high")],
        "final_env_steps": final["env_steps"],
        "final_time_s": final.get("time_s", 0.0),
        "best_success": best["eval/success_rate"],
        "best_env_steps": best["env_steps"],
        "best_time_s": best.get("time_s", 0.0),
        "reached_target_env_steps": None if reached is None else reached["env_steps"],
        "reached_target_time_s": None if reached is None else reached.get("time_s"),
        "eval_episodes": final.get("eval/episodes"),
        "curve": [(r["env_steps"], r["eval/success_rate"]) for r in evals],
        # Update diagnostics averaged over the run's iterations (None where the method has none).
        "mean_noise_std": _mean(rows, "policy/noise_std"),
        "mean_approx_kl": _mean(rows, "losses/approx_kl"),
        "mean_clipfrac": _mean(rows, "losses/clipfrac"),
        "first_updates_approx_kl": _mean(rows[:6], "losses/approx_kl"),  # iterations 0-5: 5 updates
        "first_updates_clipfrac": _mean(rows[:6], "losses/clipfrac"),
        "final_noise_std": next(
            (r["policy/noise_std"] for r in reversed(rows) if "policy/noise_std" in r), None
        ),
        "noise_std_curve": [(r["env_steps"], r["policy/noise_std"]) for r in rows if "policy/noise_std" in r],
    }


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        labels = sorted({r.get("label", "") for r in results})
        for r in (r for r in results if r["task"] == task and "curve" in r):
            steps, success = zip(*r["curve"], strict=True)
            color = f"C{list(METHODS).index(r['method'])}"  # one colour per method in every panel
            style = ("-", "--", ":")[labels.index(r.get("label", "")) % 3]  # one line style per label
            name = " ".join(str(part) for part in (r["method"], r.get("label"), r.get("seed")) if part)
            ax.plot(steps, [100 * s for s in success], style, marker=".", color=color, label=name)
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("deterministic eval success (%)")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["button-press-topdown-v3", "push-v3", "pick-place-v3", "door-open-v3"]
    )
    parser.add_argument(
        "--demos", type=int, nargs="+", default=None, help="demos per task (default: the main job's)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--eval_episodes", type=int, default=50)
    parser.add_argument(
        "--seed", type=int, default=1000, help="bootstrap seed (and training seed by default)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds, one run each")
    parser.add_argument("--max_env_steps", type=int, default=None, help="stop every run at this many steps")
    parser.add_argument("--label", default="", help="names this invocation's rows, e.g. before / after")
    parser.add_argument("--cache_dir", default="~/.cache/lerobot_pirl/bootstrap")
    parser.add_argument("--out_dir", default="outputs/bench_metaworld_learning")
    parser.add_argument(
        "--extra", default="", help='flags for every run, one string: "--env.episode_length=200"'
    )
    parser.add_argument(
        "--skip_existing", action="store_true", help="skip (task, method) pairs already in results.json"
    )
    parser.add_argument("--bootstrap-only", action="store_true")
    parser.add_argument(
        "--summarize_only", action="store_true", help="summarise the runs' existing folders, start none"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from lerobot_pirl.runtime.config import BootstrapConfig

    demos = args.demos or [BootstrapConfig().num_demos] * len(args.tasks)
    policies = {
        task: bootstrap(task, n, args.seed, args.cache_dir) for task, n in zip(args.tasks, demos, strict=True)
    }
    if args.bootstrap_only:
        print(json.dumps({t: str(p) for t, p in policies.items()}, indent=2))
        return

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or [args.seed]
    runs = [(task, method, seed) for task in args.tasks for method in args.methods for seed in seeds]

    def key(row: dict) -> tuple:
        return row["task"], row["method"], row.get("seed", args.seed), row.get("label", "")

    # results.json accumulates over invocations (e.g. the default method at a longer budget first): rows of
    # runs not made now are kept, the others replaced.
    results_path = out_dir / "results.json"
    kept = []
    if results_path.exists():
        previous = json.loads(results_path.read_text())["results"]
        if args.skip_existing:
            done = {key(r) for r in previous}
            runs = [run for run in runs if (*run, args.label) not in done]
        kept = [r for r in previous if key(r)[:3] not in runs or key(r)[3] != args.label]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pending, running, results = list(runs), [], []

    def run_name(task: str, method: str, seed: int) -> str:
        return "_".join(str(part) for part in (task, method, args.label, seed if args.seeds else "") if part)

    if args.summarize_only:  # e.g. runs whose driver was stopped while they went on
        pending = []
        running = [(*run, out_dir / run_name(*run), None, None) for run in runs]
    while pending or running:
        while pending and len(running) < args.parallel:
            task, method, seed = pending.pop(0)
            name = run_name(task, method, seed)
            run_dir = out_dir / name
            command = [
                sys.executable,
                "-m",
                "lerobot_pirl.scripts.train",
                f"--policy.path={policies[task]}",
                "--env.type=metaworld_state",
                f"--env.task={task}",
                *METHODS[method],
                f"--max_minutes={args.minutes}",
                "--iterations=100000",
                f"--eval.n_episodes={args.eval_episodes}",
                "--eval.videos=0",
                f"--seed={seed}",
                *([f"--max_env_steps={args.max_env_steps}"] if args.max_env_steps else []),
                f"--device={args.device}",
                f"--output_dir={run_dir}",
                *shlex.split(args.extra),
            ]
            log = open(out_dir / f"{name}.log", "w")  # noqa: SIM115 (closed when the run ends)
            running.append(
                (task, method, seed, run_dir, subprocess.Popen(command, env=env, stdout=log, stderr=log), log)
            )
        time.sleep(5)
        for entry in list(running):
            task, method, seed, run_dir, process, log = entry
            if process is not None and process.poll() is None:
                continue
            running.remove(entry)
            if log is not None:
                log.close()
            result = {
                "task": task,
                "method": method,
                "seed": seed,
                "label": args.label,
                "max_env_steps": args.max_env_steps,
                "demos": demos[args.tasks.index(task)],
                "minutes": args.minutes,
                "parallel": args.parallel,
                "returncode": None if process is None else process.returncode,
            }
            try:
                result |= run_summary(run_dir)
            except (OSError, ValueError, IndexError) as error:
                result["error"] = repr(error)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)

    results = kept + results
    header = ("task", "method", "label", "seed", "SFT", "final", "95% CI", "best", "steps@best", "min@best")
    print(
        "\n{:24s} {:15s} {:>6s} {:>5s} {:>5s} {:>6s} {:>12s} {:>5s} {:>10s} {:>8s} {:>7s}".format(
            *header, "σ mean"
        )
    )
    for r in results:
        run = f"{r['task']:24s} {r['method']:15s} {r.get('label', ''):>6s} {r.get('seed', args.seed):5d}"
        if "error" in r:
            print(f"{run} error: {r['error']}")
            continue
        ci = f"[{100 * r['final_ci'][0]:.0f}, {100 * r['final_ci'][1]:.0f}]"
        sft, final, best = (100 * r[k] for k in ("sft_success", "final_success", "best_success"))
        noise_std = r.get("mean_noise_std")
        print(
            f"{run} {sft:4.0f}% {final:5.0f}% {ci:>12s} {best:4.0f}% "
            f"{r['best_env_steps']:10d} {r['best_time_s'] / 60:8.1f} "
            f"{'' if noise_std is None else f'{noise_std:.4f}':>7s}"
        )
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args)}
    results_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out_dir / "learning_curves.png")


if __name__ == "__main__":
    main()
