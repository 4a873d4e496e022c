"""Per-task / per-suite evaluation results (closed forms) and `lerobot-pirl-eval`'s output on a cheap env.

The LIBERO suite evaluation itself (episode i from init state i, through the simulator) is tested in
tests/envs/test_libero_training.py."""

import json
import math
import sys

import pytest

from lerobot_pirl.runtime.evaluation import EvalResult
from lerobot_pirl.runtime.suite_evaluation import SuiteEvalResult, TaskEvalResult, pool_results
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int) -> tuple[float, float]:
    p = successes / n
    center = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    return center - half, center + half


def result(successes: list[bool], mean_return: float, mean_length: float, videos=()) -> EvalResult:
    low, high = wilson(sum(successes), len(successes))
    return EvalResult(
        sum(successes) / len(successes),
        low,
        high,
        len(successes),
        mean_return,
        mean_length,
        successes,
        list(videos),
    )


def test_pooled_result_is_over_all_episodes():
    pooled = pool_results([result([True, False, True], 1.0, 10.0, ["a.mp4"]), result([False], 0.0, 20.0)])
    assert pooled.n_episodes == 4 and pooled.successes == [True, False, True, False]
    assert pooled.success_rate == 0.5
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx(wilson(2, 4), abs=1e-9)
    assert pooled.mean_return == pytest.approx(0.75)  # per episode, not per task: (3 * 1 + 0) / 4
    assert pooled.mean_length == pytest.approx(12.5)
    assert pooled.videos == ["a.mp4"]


def test_suite_result_pools_per_suite_and_overall():
    suite = SuiteEvalResult(
        [
            TaskEvalResult("libero_spatial", 0, "pick", result([True, True], 1.0, 50.0)),
            TaskEvalResult("libero_spatial", 1, "place", result([False, True], 0.5, 80.0)),
            TaskEvalResult("libero_10", 0, "open", result([False, False], 0.0, 100.0)),
        ]
    )
    per_suite = suite.per_suite()
    assert list(per_suite) == ["libero_spatial", "libero_10"]
    assert per_suite["libero_spatial"].success_rate == 0.75 and per_suite["libero_spatial"].n_episodes == 4
    assert per_suite["libero_10"].success_rate == 0.0
    assert (per_suite["libero_10"].ci_low, per_suite["libero_10"].ci_high) == pytest.approx(wilson(0, 2))
    overall = suite.overall()
    assert overall.success_rate == pytest.approx(0.5) and overall.n_episodes == 6

    info = json.loads(json.dumps(suite.to_lerobot_eval_info(eval_s=12.0)))
    assert info["overall"]["pc_success"] == pytest.approx(50.0) and info["overall"]["n_episodes"] == 6
    assert info["overall"]["eval_ep_s"] == pytest.approx(2.0)
    assert [(t["task_group"], t["task_id"], t["metrics"]["pc_success"]) for t in info["per_task"]] == [
        ("libero_spatial", 0, 100.0),
        ("libero_spatial", 1, 50.0),
        ("libero_10", 0, 0.0),
    ]
    assert info["per_group"]["libero_spatial"]["n_episodes"] == 4
    assert info["per_group"]["libero_10"]["pc_success_ci95"] == pytest.approx([100 * x for x in wilson(0, 2)])
    rows = suite.table().splitlines()
    assert len(rows) == 1 + 3 + 2 + 1  # header, tasks, suites, total
    assert rows[-1].split()[:3] == ["total", "all", "50.0%"]


def test_eval_cli_writes_overall_and_per_task_results(tmp_path, monkeypatch, capsys):
    from lerobot_pirl.scripts.eval import main

    policy = save_tiny_flow_mlp(tmp_path / "policy")
    out = tmp_path / "eval"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lerobot-pirl-eval",
            f"--policy.path={policy}",
            "--env.type=metaworld_state",
            "--env.task=reach-v3",
            "--env.episode_length=12",
            "--eval.n_episodes=3",
            "--eval.batch_size=2",
            "--eval.videos=0",
            f"--output_dir={out}",
        ],
    )
    assert main() == 0
    info = json.loads((out / "eval_info.json").read_text())
    overall = info["overall"]  # lerobot-eval's keys: success in percent
    assert overall["n_episodes"] == 3 and overall["pc_success"] in (0.0, 100 / 3, 200 / 3, 100.0)
    low, high = overall["pc_success_ci95"]
    assert 0 <= low <= overall["pc_success"] <= high <= 100
    assert overall["eval_s"] > 0 and overall["eval_ep_s"] == pytest.approx(overall["eval_s"] / 3)
    (task,) = info["per_task"]
    assert (task["task_group"], task["task_id"]) == ("metaworld_state", 0) and task["task"]
    metrics = task["metrics"]
    assert len(metrics["successes"]) == len(metrics["sum_rewards"]) == 3
    assert (
        metrics["pc_success"] == pytest.approx(100 * sum(metrics["successes"]) / 3) == overall["pc_success"]
    )
    assert metrics["avg_sum_reward"] == pytest.approx(sum(metrics["sum_rewards"]) / 3)
    assert info["per_group"]["metaworld_state"]["pc_success"] == overall["pc_success"]
    assert 0 < overall["avg_episode_length"] <= 12
    printed = capsys.readouterr().out
    assert f"({overall['n_episodes']} episodes)" in printed and str(out / "eval_info.json") in printed


def test_eval_cli_writes_where_lerobot_eval_writes_by_default(tmp_path, monkeypatch):
    from lerobot_pirl.scripts.eval import main

    policy = save_tiny_flow_mlp(tmp_path / "policy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lerobot-pirl-eval",
            f"--policy.path={policy}",
            "--env.type=metaworld_state",
            "--env.task=reach-v3",
            "--env.episode_length=8",
            "--eval.n_episodes=1",
            "--eval.videos=0",
        ],
    )
    assert main() == 0
    (info,) = (tmp_path / "outputs" / "eval").glob("*/*_metaworld_state_flow_mlp/eval_info.json")
    assert json.loads(info.read_text())["overall"]["n_episodes"] == 1


@pytest.mark.parametrize(
    ("policy_args", "expected"),
    [
        ([], "needs --policy.path"),
        (["--policy.path=/no/such/folder"], "no such folder"),
        (["--eval.n_episodes=0"], "--eval.n_episodes must be >= 1, got 0"),
        (["--rollout.n_action_steps=0"], "--rollout.n_action_steps must be >= 1, got 0"),
    ],
)
def test_eval_cli_refuses_a_missing_policy_with_one_error_line(monkeypatch, capsys, policy_args, expected):
    from lerobot_pirl.scripts.eval import cli

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-eval", *policy_args, "--env.type=metaworld_state"])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0]
