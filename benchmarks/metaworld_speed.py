"""MetaWorld steps per second: state only, and with a camera image at default vs fast render settings.

All rows are measured in one process, one env, one after the other, so their ratios are meaningful even
on a busy machine (absolute numbers are not: compare only rows of the same run).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/metaworld_speed.py --steps 300 \
        --output outputs/benchmarks/metaworld_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from lerobot_pirl.envs.metaworld_state import MetaWorldStateEnv  # sets MUJOCO_GL=egl before mujoco loads


def steps_per_second(env, steps: int, seed: int = 0) -> float:
    """Random actions with autoreset; the first reset (and renderer creation) is not timed."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32)  # (steps, 4)
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def gl_renderer_name() -> str:
    """Which OpenGL implementation EGL gave us (llvmpipe = software on CPU, else usually a GPU)."""
    try:
        import mujoco
        from OpenGL import GL

        probe = MetaWorldStateEnv("reach-v3", image_size=8)
        probe.reset(seed=0)
        renderer: mujoco.Renderer = probe._renderers[8]
        renderer._gl_context.make_current()
        name = GL.glGetString(GL.GL_RENDERER).decode()
        probe.close()
        return name
    except Exception as error:  # only a label for the report
        return f"unknown ({type(error).__name__})"


def lerobot_metaworld_steps_per_second(task: str, steps: int) -> float:
    """LeRobot's own `--env.type=metaworld` (480×480 pixels + agent_pos), 1 env, as its eval builds it."""
    from lerobot.envs.configs import MetaworldEnv

    vector_env = MetaworldEnv(task=f"metaworld-{task}").create_envs(n_envs=1)[f"metaworld-{task}"][0]
    sub_env = vector_env.envs[0]
    try:
        return steps_per_second(sub_env, steps)
    finally:
        vector_env.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="push-v3")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lerobot-steps", type=int, default=30, help="0 skips LeRobot's 480 px env")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/metaworld_speed.json"))
    args = parser.parse_args()

    rows = []

    def measure(name: str, image_size: int, render: str, make_env, steps: int) -> None:
        env = make_env()
        try:
            rate = steps_per_second(env, steps)
        finally:
            env.close()
        rows.append({"env": name, "image_size": image_size, "render": render, "steps_per_s": round(rate, 1)})
        print(f"{name:28s} {image_size:>5d} {render:>8s} {rate:10.1f}", flush=True)

    print(f"{'env':28s} {'image':>5s} {'render':>8s} {'steps/s':>10s}")
    measure("metaworld_state", 0, "-", lambda: MetaWorldStateEnv(args.task), args.steps)
    for size in args.sizes:
        for fast in (False, True):
            label = "fast" if fast else "default"
            make = lambda size=size, fast=fast: MetaWorldStateEnv(
                args.task, image_size=size, fast_render=fast
            )
            measure("metaworld_state", size, label, make, args.steps)
    if args.lerobot_steps > 0:
        rate = lerobot_metaworld_steps_per_second(args.task, args.lerobot_steps)
        rows.append(
            {
                "env": "lerobot metaworld",
                "image_size": 480,
                "render": "default",
                "steps_per_s": round(rate, 1),
            }
        )
        print(f"{'lerobot metaworld':28s} {480:>5d} {'default':>8s} {rate:10.1f}", flush=True)

    for size in args.sizes:
        default, fast = (
            next(r["steps_per_s"] for r in rows if r["image_size"] == size and r["render"] == mode)
            for mode in ("default", "fast")
        )
        print(f"fast / default at {size} px: {fast / default:.1f}x")

    report = {
        "task": args.task,
        "steps_per_row": args.steps,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "mujoco_gl": os.environ.get("MUJOCO_GL"),
            "gl_renderer": gl_renderer_name(),
        },
        "rows": rows,
    }
    machine = report["machine"]
    print(f"GL renderer: {machine['gl_renderer']}, load average {machine['load_average_1min']:.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
