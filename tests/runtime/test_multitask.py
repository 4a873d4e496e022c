"""One policy over several MetaWorld tasks (issue 14): suite names, the per-episode task of a suite sub-env,
balanced episode shares, GRPO groups within one task, per-task metrics and the checkpoint in lerobot-eval."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.envs.utils import close_envs
from metaworld.env_dict import MT10_V3
from test_train_cli import FAST_RUN, run_main

from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.envs.metaworld_state import (
    MetaWorldStateEnv,
    MetaWorldStateEnvConfig,
    MetaWorldSuiteEnv,
    metaworld_task_description,
    resolve_metaworld_tasks,
)
from lerobot_pirl.runtime.config import TrainConfig
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

THREE_TASKS = ("reach-v3", "push-v3", "drawer-close-v3")
INSTRUCTIONS = [metaworld_task_description(t) for t in THREE_TASKS]


def test_suite_names_resolve_to_metaworlds_task_lists_and_lists_to_canonical_names():
    assert resolve_metaworld_tasks("MT10") == tuple(MT10_V3) and len(resolve_metaworld_tasks("mt50")) == 50
    assert resolve_metaworld_tasks(" reach-v3, metaworld-push-v3 ") == ("reach-v3", "push-v3")
    assert MetaWorldStateEnvConfig(task="mt10").task == "MT10"
    assert MetaWorldStateEnvConfig(task="reach-v3, metaworld-push-v3").task == "reach-v3,push-v3"
    assert MetaWorldStateEnvConfig(task="metaworld-push-v3").tasks == ("push-v3",)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("reach-v3,psuh-v3", "Unknown MetaWorld task 'psuh-v3'"),
        ("", "names no MetaWorld task"),
        (" , ", "names no MetaWorld task"),
        ("reach-v3,,push-v3", "has an empty entry"),
        ("reach-v3,push-v3,reach-v3", "names reach-v3 more than once"),
    ],
)
def test_a_bad_task_list_is_one_value_error_naming_the_task(task, message):
    with pytest.raises(ValueError, match=message):
        MetaWorldStateEnvConfig(task=task)


def test_a_suite_sub_env_plays_the_task_its_seed_picks_exactly_as_that_tasks_own_env():
    suite = MetaWorldSuiteEnv(THREE_TASKS, max_cached_tasks=2, episode_length=20)
    singles = {task: MetaWorldStateEnv(task, episode_length=20) for task in THREE_TASKS}
    action = np.array([0.3, -0.2, 0.1, 0.5], dtype=np.float32)
    for seed in (7, 8, 9, 10, 7):  # 7 again: its simulator was dropped from the 2-task cache meanwhile
        task = THREE_TASKS[seed % 3]
        observation, info = suite.reset(seed=seed)
        expected, _ = singles[task].reset(seed=seed)
        assert (suite.task, suite.task_description, info["task"]) == (
            task,
            singles[task].task_description,
            task,
        )
        for key in expected:
            np.testing.assert_array_equal(observation[key], expected[key])
        np.testing.assert_array_equal(
            suite.step(action)[0]["environment_state"], singles[task].step(action)[0]["environment_state"]
        )
    suite.reset()  # no seed: the same task goes on
    assert suite.task == THREE_TASKS[7 % 3] and len(suite._envs) == 2
    suite.close()


def test_lerobot_gets_one_vector_env_per_task_and_training_one_mixed_env():
    cfg = MetaWorldStateEnvConfig(task=",".join(THREE_TASKS), episode_length=10)
    per_task = cfg.create_envs(2)
    assert sorted(per_task["metaworld_state"]) == [0, 1, 2]
    assert [vec.call("task")[0] for vec in per_task["metaworld_state"].values()] == list(THREE_TASKS)
    mixed = cfg.create_envs(2, mixed_tasks=True)
    assert list(mixed["metaworld_state"]) == [0]
    close_envs(per_task)
    close_envs(mixed)


@pytest.fixture(scope="module")
def multitask_policy(tmp_path_factory) -> Path:
    return save_tiny_flow_mlp(tmp_path_factory.mktemp("policy") / "three_tasks", task_vocabulary=INSTRUCTIONS)


def suite_collector(policy_dir: Path, num_envs: int, episode_length: int, algorithm: str = "ppo"):
    cfg = TrainConfig(
        env=MetaWorldStateEnvConfig(task=",".join(THREE_TASKS), episode_length=episode_length),
        algorithm=GRPOConfig(group_size=2) if algorithm == "grpo" else PPOConfig(),
    )
    policy, pre, post = build_rl_policy(cfg, policy_dir, torch.device("cpu"))
    return build_collector(cfg, policy, pre, post, num_envs=num_envs, device=torch.device("cpu"), seed=5)


def test_episode_shares_are_balanced_and_every_decision_reads_its_episodes_task(multitask_policy):
    collector, envs = suite_collector(multitask_policy, num_envs=4, episode_length=8)
    try:
        for _ in range(2):
            batch = collector.collect(num_decisions=9, mode="flow_sde")
            counts = Counter(batch.episode_task.tolist())
            # Each env ends an 8-step episode every 3 decisions (2 chunks of 4 steps + the reset slot).
            assert sum(counts.values()) >= 12
            assert max(counts.values()) - min(counts[i] for i in range(3)) <= 1
            # The task index the policy read is the task its episode plays.
            read = batch.observations["observation.task_index"]  # (T, N)
            episode = batch.episode_index
            assert torch.equal(read[batch.mask], batch.episode_task[episode[batch.mask]])
            # The collector's idea of each env's task is the env's own.
            assert list(collector.tasks) == list(collector.vec_env.call("task_description"))
    finally:
        close_envs(envs)


def test_grpo_groups_share_one_task_and_one_initial_state(multitask_policy):
    collector, envs = suite_collector(multitask_policy, num_envs=6, episode_length=8, algorithm="grpo")
    try:
        batch = collector.collect_episodes([11, 11, 12, 12, 13, 13], "flow_sde")
        assert batch.episode_task.tolist() == [2, 2, 0, 0, 1, 1]
        first = batch.observations["observation.environment_state"][0]  # (N, 39)
        for group in range(3):
            torch.testing.assert_close(first[2 * group], first[2 * group + 1])
        assert not torch.allclose(first[0], first[2])
    finally:
        close_envs(envs)


TINY_BOOTSTRAP = ["--bootstrap.num_demos=2", "--bootstrap.sft_steps=4", "--bootstrap.batch_size=8"]
# test_train_cli's fast run, over three tasks with one env each.
SUITE_FLAGS = {"--env.task": ",".join(THREE_TASKS), "--rollout.num_envs": "3"}
FAST_SUITE_RUN = [
    f"{flag.split('=')[0]}={SUITE_FLAGS[flag.split('=')[0]]}" if flag.split("=")[0] in SUITE_FLAGS else flag
    for flag in FAST_RUN
]


def test_a_three_task_run_trains_one_policy_reports_each_task_and_runs_in_lerobot_eval(monkeypatch, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = [*FAST_SUITE_RUN, *TINY_BOOTSTRAP, f"--bootstrap.cache_dir={cache}", "--iterations=2"]
    assert run_main(monkeypatch, [*args, f"--output_dir={out}"]) == 0

    # Each task's demos are cached on their own; the one bootstrapped policy knows the three tasks.
    assert len(list((cache / "demos").glob("*/recipe.json"))) == 3
    pretrained = out / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((pretrained / "config.json").read_text())
    assert config["task_vocabulary"] == INSTRUCTIONS

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in (rows[0], rows[-1]):  # the SFT baseline and the final evaluation
        rates = [row[f"eval/{task}/success_rate"] for task in THREE_TASKS]
        assert [row[f"eval/{task}/episodes"] for task in THREE_TASKS] == [2, 2, 2]
        assert row["eval/episodes"] == 6 and row["eval/success_rate"] == pytest.approx(np.mean(rates))
    assert sum(rows[-1][f"rollout/{task}/episodes"] for task in THREE_TASKS) == rows[-1]["rollout/episodes"]
    assert (out / "plots" / "tasks.png").stat().st_size > 0
    videos = sorted(p.name for p in (out / "videos").glob("iter000002_*.mp4"))
    assert [name.split("_")[1] for name in videos] == sorted(THREE_TASKS)

    # lerobot-pirl-eval on the checkpoint: the trainer's per-task numbers, from the same per-task protocol.
    from lerobot_pirl.scripts.eval import main as eval_main

    eval_args = [f"--policy.path={out / 'checkpoints' / 'last'}", *FAST_SUITE_RUN[:3], "--eval.n_episodes=2"]
    eval_args += ["--eval.batch_size=2", "--eval.videos=0", f"--output_dir={tmp_path / 'pirl_eval'}"]
    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-eval", *eval_args])
    assert eval_main() == 0
    info = json.loads((tmp_path / "pirl_eval" / "eval_info.json").read_text())
    assert [t["metrics"]["avg_sum_reward"] for t in info["per_task"]] == [
        rows[-1][f"eval/{task}/episode_return"] for task in THREE_TASKS
    ]

    command = shutil.which("lerobot-eval") or str(Path(sys.executable).parent / "lerobot-eval")
    result = subprocess.run(
        [
            command,
            f"--policy.path={pretrained}",
            "--policy.device=cpu",
            "--env.type=metaworld_state",
            f"--env.task={','.join(THREE_TASKS)}",
            "--env.episode_length=8",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            "--eval.use_async_envs=false",
            f"--output_dir={tmp_path / 'lerobot_eval'}",
        ],
        env={"HF_HUB_OFFLINE": "1", "MUJOCO_GL": "egl", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((tmp_path / "lerobot_eval" / "eval_info.json").read_text())
    assert [task["task_id"] for task in info["per_task"]] == [0, 1, 2]
    assert info["overall"]["n_episodes"] == 3


@pytest.mark.parametrize(
    ("trained_on", "task", "expected"),
    [
        (INSTRUCTIONS, "reach-v3,push-v3,door-open-v3", "the policy was not trained on task door-open-v3"),
        (INSTRUCTIONS, "door-open-v3", "the policy was not trained on task door-open-v3"),
        (None, "MT10", "cannot tell the 10 tasks of --env.task=MT10 apart"),
    ],
)
def test_a_task_the_policy_cannot_play_is_one_error_line(
    monkeypatch, capsys, tmp_path, trained_on, task, expected
):
    policy = save_tiny_flow_mlp(tmp_path / "policy", task_vocabulary=trained_on)
    out = tmp_path / "run"
    args = [f"--policy.path={policy}", "--env.type=metaworld_state", f"--env.task={task}"]
    assert run_main(monkeypatch, [*args, f"--output_dir={out}"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert expected in line and not out.exists()


def test_lerobots_metaworld_tasks_share_one_vector_env_each_env_keeping_its_task():
    from lerobot.envs.configs import MetaworldEnv

    from lerobot_pirl.runtime.envs import (
        env_task_names,
        fixed_env_tasks,
        make_rollout_envs,
        single_task_configs,
    )

    cfg = MetaworldEnv(task="reach-v3,metaworld-push-v3")
    assert env_task_names(cfg) == ("reach-v3", "push-v3")
    assert [c.task for _, _, c in single_task_configs(cfg)] == ["reach-v3", "metaworld-push-v3"]
    envs = make_rollout_envs(cfg, 4, False, env_tasks=fixed_env_tasks(4, 2))
    try:
        (vec_env,) = [vec for group in envs.values() for vec in group.values()]
        assert list(vec_env.call("task")) == ["reach-v3", "push-v3", "reach-v3", "push-v3"]
    finally:
        close_envs(envs)
