"""Few-shot SFT baselines on MetaWorld: deterministic success of the bootstrapped flow_mlp per task.

Used to choose the main job's default task and demo count (the few-shot band is 10-70% success, like the
πRL paper's starting points). Prints a table and writes JSON.

    python benchmarks/fewshot_sft.py --tasks push-v3 pick-place-v3 --demos 10 20 --action-noise 0.5
"""

import argparse
import json
import time
from pathlib import Path

import torch
from lerobot.envs.configs import EnvConfig

import lerobot_pirl.envs  # noqa: F401
from lerobot_pirl.envs.metaworld_state import DEFAULT_EPISODE_LENGTH
from lerobot_pirl.runtime.bootstrap import bootstrap_flow_policy
from lerobot_pirl.runtime.config import BootstrapConfig
from lerobot_pirl.scripts.eval import EvalEpisodesConfig, EvalPipelineConfig, evaluate_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["push-v3", "pick-place-v3", "door-open-v3"])
    defaults = BootstrapConfig()
    parser.add_argument("--demos", nargs="+", type=int, default=[defaults.num_demos])
    parser.add_argument("--action-noise", type=float, default=defaults.action_noise)
    parser.add_argument("--sft-steps", type=int, default=defaults.sft_steps)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--episode-length", type=int, default=DEFAULT_EPISODE_LENGTH, help="episode steps")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--cache-dir", default="~/.cache/lerobot_pirl/bootstrap")
    parser.add_argument("--out", default="benchmarks/results/fewshot_sft.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    print(f"{'task':24s} {'demos':>5s} {'success':>8s} {'95% CI':>14s} {'sft+eval s':>10s}")
    for task in args.tasks:
        for demos in args.demos:
            start = time.perf_counter()
            env = EnvConfig.get_choice_class("metaworld_state")(task=task, episode_length=args.episode_length)
            bootstrap = BootstrapConfig(
                num_demos=demos,
                action_noise=args.action_noise,
                sft_steps=args.sft_steps,
                cache_dir=Path(args.cache_dir),
            )
            policy_path = bootstrap_flow_policy(env, bootstrap, seed=args.seed)
            cfg = EvalPipelineConfig(env=env, eval=EvalEpisodesConfig(n_episodes=args.episodes, videos=0))
            from lerobot.configs.policies import PreTrainedConfig

            cfg.policy = PreTrainedConfig.from_pretrained(policy_path)
            cfg.policy.pretrained_path = policy_path
            result = evaluate_policy(cfg)
            seconds = time.perf_counter() - start
            rows.append({"task": task, "demos": demos, **result.to_dict(), "seconds": seconds})
            ci = f"[{100 * result.ci_low:.0f}, {100 * result.ci_high:.0f}]"
            print(
                f"{task:24s} {demos:5d} {100 * result.success_rate:7.0f}% {ci:>14s} {seconds:10.0f}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
