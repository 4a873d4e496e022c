"""One policy over a MetaWorld suite (issue 14): the default multi-task bootstrap, then PPO + Flow-SDE.

One `lerobot-pirl-train` run over `--suite` (MT10, MT50 or a comma-separated task list) from the few-shot
multi-task flow_mlp it bootstraps itself (every task's scripted demos, one task-conditioned policy),
stopped after `--minutes` of training wall time (its evaluations included). The env workers use every
core (the trainer's default). The trainer's first evaluation is the SFT baseline: `--eval_episodes` per
task, the same seeds for every checkpoint. Prints the per-task table (SFT and after RL, Wilson 95%
intervals), writes JSON with the curve of the mean and a plot.

    python benchmarks/metaworld_suite.py --suite MT10 --minutes 60
    python benchmarks/metaworld_suite.py --suite MT10 --summarize_only   # a run that went on without us
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

RESULTS = Path(__file__).parent / "results"


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("eval/success_rate") is not None]
    if not evals:
        raise ValueError(f"{run_dir} holds no evaluation yet")
    tasks = [key.split("/")[1] for key in evals[0] if key.count("/") == 2 and key.endswith("/success_rate")]
    sft, final = evals[0], evals[-1]

    def per_task(row: dict) -> dict:
        return {
            task: {
                "success": row[f"eval/{task}/success_rate"],
                "ci": [row[f"eval/{task}/ci_low"], row[f"eval/{task}/ci_high"]],
                "episodes": int(row[f"eval/{task}/episodes"]),
            }
            for task in tasks
        }

    return {
        "tasks": tasks,
        "sft": {"mean": sft["eval/success_rate"], "per_task": per_task(sft)},
        "final": {
            "mean": final["eval/success_rate"],
            "ci": [final["eval/ci_low"], final["eval/ci_high"]],
            "per_task": per_task(final),
            "env_steps": final["env_steps"],
            "minutes": final.get("time_s", 0.0) / 60,
            "iteration": final.get("iteration", 0),
        },
        "curve": [
            {
                "env_steps": r["env_steps"],
                "minutes": r.get("time_s", 0.0) / 60,
                "mean": r["eval/success_rate"],
                "min_task": min(r[f"eval/{t}/success_rate"] for t in tasks),
            }
            for r in evals
        ],
    }


def table(summary: dict) -> str:
    lines = [f"{'task':28s} {'SFT':>6s} {'95% CI':>12s} {'after RL':>9s} {'95% CI':>12s}"]

    def cells(entry: dict) -> str:
        low, high = entry["ci"]
        return f"{100 * entry['success']:5.0f}% {f'[{100 * low:.0f}, {100 * high:.0f}]':>12s}"

    for task in summary["tasks"]:
        sft, final = summary["sft"]["per_task"][task], summary["final"]["per_task"][task]
        lines.append(f"{task:28s} {cells(sft)}  {cells(final)}")
    final = summary["final"]
    lines.append(
        f"{'mean':28s} {100 * summary['sft']['mean']:5.0f}% {'':12s}  {100 * final['mean']:7.1f}% "
        f"{f'[{100 * final["ci"][0]:.0f}, {100 * final["ci"][1]:.0f}]':>12s}"
    )
    lowest = min(final["per_task"].values(), key=lambda e: e["success"])["success"]
    lines.append(
        f"after {final['env_steps']:,} env steps, {final['minutes']:.1f} training minutes "
        f"(iteration {final['iteration']}); lowest task {100 * lowest:.0f}%"
    )
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    minutes = [p["minutes"] for p in summary["curve"]]
    curve.plot(minutes, [100 * p["mean"] for p in summary["curve"]], marker="o", label="mean over tasks")
    curve.plot(minutes, [100 * p["min_task"] for p in summary["curve"]], marker=".", label="lowest task")
    curve.axhline(90, color="gray", linestyle=":", linewidth=1)
    curve.set_xlabel("training minutes (evaluations included)")
    curve.set_ylabel("deterministic eval success (%)")
    curve.set_ylim(-2, 102)
    curve.set_title(title)
    curve.legend()
    tasks = summary["tasks"]
    positions = range(len(tasks))
    for offset, stage, label in ((-0.2, "sft", "few-shot SFT"), (0.2, "final", "after RL")):
        values = [100 * summary[stage]["per_task"][t]["success"] for t in tasks]
        bars.bar([p + offset for p in positions], values, 0.4, label=label)
    bars.set_xticks(list(positions), tasks, rotation=60, ha="right", fontsize="small")
    bars.set_ylabel("success (%)")
    bars.set_ylim(0, 102)
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="MT10", help="MT10, MT50 or a comma-separated task list")
    parser.add_argument("--minutes", type=float, default=60.0, help="training wall time of the run")
    parser.add_argument("--eval_episodes", type=int, default=50, help="per task")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--extra", default="", help="more lerobot-pirl-train flags, e.g. '--eval.freq=5'")
    parser.add_argument("--out_dir", default="outputs/bench_metaworld_suite")
    parser.add_argument("--label", default="", help="names the run and its result file")
    parser.add_argument("--summarize_only", action="store_true")
    args = parser.parse_args()

    name = "_".join(part for part in (args.suite.replace(",", "+"), args.label) if part)
    run_dir = Path(args.out_dir) / name
    command = [
        sys.executable,
        "-m",
        "lerobot_pirl.scripts.train",
        "--env.type=metaworld_state",
        f"--env.task={args.suite}",
        "--algorithm.type=ppo",
        "--algorithm.exploration=flow_sde",
        f"--max_minutes={args.minutes}",
        "--iterations=100000",
        f"--eval.n_episodes={args.eval_episodes}",
        "--eval.videos=0",
        f"--seed={args.seed}",
        "--device=cpu",
        f"--output_dir={run_dir}",
        *shlex.split(args.extra),
    ]
    started = time.time()
    returncode = None
    if not args.summarize_only:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{name}.log", "w") as log:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            returncode = subprocess.run(command, env=env, stdout=log, stderr=log).returncode
    summary = summarize(run_dir)
    print(table(summary))
    result = {
        "suite": args.suite,
        "label": args.label,
        "command": shlex.join(command),
        "returncode": returncode,
        "wall_minutes": (time.time() - started) / 60 if not args.summarize_only else None,
        "machine": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        **summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"metaworld_suite_{name}.json").write_text(json.dumps(result, indent=2))
    plot(summary, RESULTS / f"metaworld_suite_{name}.png", f"{args.suite}: one flow_mlp, PPO + Flow-SDE")


if __name__ == "__main__":
    main()
