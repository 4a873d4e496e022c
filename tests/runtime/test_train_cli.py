"""lerobot-pirl-train end to end on MetaWorld state, tiny flow_mlp: outputs, resume, bad input, NaN, hub."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lerobot_pirl.policies.flow_mlp import FlowMLPPolicy
from lerobot_pirl.runtime.metrics import MetricsLog
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

FAST_RUN = [
    "--env.type=metaworld_state",
    "--env.task=reach-v3",
    "--env.episode_length=24",
    "--rollout.num_envs=2",
    "--rollout.decisions_per_env=3",
    "--eval.n_episodes=2",
    "--eval.batch_size=2",
    "--eval.videos=1",
    "--algorithm.update_epochs=1",
    "--seed=3",
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_tiny_flow_mlp(tmp_path_factory.mktemp("policy") / "tiny_flow_mlp")


def the_error_line(capsys) -> str:
    """The one `<program>: error: ...` line a refused command printed (there must be exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def checkpoint_every_iteration(policy_dir: Path, out: Path, iterations: int) -> list[str]:
    """A fast run that saves a checkpoint after each of its iterations."""
    return [
        f"--policy.path={policy_dir}",
        *FAST_RUN,
        f"--iterations={iterations}",
        "--save_freq=1",
        f"--output_dir={out}",
    ]


def run_main(monkeypatch, args: list[str]) -> int:
    """The console script in-process; returns its exit status."""
    from lerobot_pirl.scripts.train import cli

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    return exit_info.value.code


def test_training_run_writes_a_lerobot_checkpoint_metrics_plots_and_videos(
    monkeypatch, capsys, tmp_path, policy_dir
):
    out = tmp_path / "run"
    args = [
        f"--policy.path={policy_dir}",
        *FAST_RUN,
        "--iterations=2",
        "--eval.freq=1",
        f"--output_dir={out}",
    ]
    assert run_main(monkeypatch, args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "SFT" in printed and "→ RL" in printed and "(2 episodes)" in printed
    # Not a terminal: no progress bars, one INFO line per iteration and per evaluation, all short.
    log = captured.err.splitlines()
    assert max(len(line) for line in log) < 1000
    iteration_lines = [line for line in log if " iter:" in line]
    assert [line.split(" iter:")[1].split()[0] for line in iteration_lines] == ["1/2", "2/2"]
    assert all("env_steps:" in line and "lr:3.0e-05" in line for line in iteration_lines)
    assert sum("eval sft:" in line for line in log) == 1 and sum("eval iter0" in line for line in log) == 2
    assert "πRL" not in captured.err

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert all("eval/success_rate" in row for row in rows)
    assert rows[2]["env_steps"] > rows[1]["env_steps"] > 0
    for key in (
        "losses/policy_loss",
        "losses/value_loss",
        "losses/approx_kl",
        "losses/clipfrac",
        "charts/SPS",
    ):
        assert key in rows[1]
    assert (out / "plots" / "success.png").stat().st_size > 0
    assert (out / "plots" / "training.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "videos").glob("*.mp4"))[0].startswith("iter")

    # The checkpoint is a standard LeRobot flow_mlp checkpoint with its processors.
    from lerobot.policies.factory import make_pre_post_processors

    pretrained = out / "checkpoints" / "last" / "pretrained_model"
    assert (out / "checkpoints" / "last").resolve().name == "000002"
    policy = FlowMLPPolicy.from_pretrained(pretrained)
    preprocessor, _ = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    batch = preprocessor(
        {"observation.state": torch.zeros(1, 4), "observation.environment_state": torch.zeros(1, 39)}
    )
    assert policy.predict_action_chunk(batch).shape == (1, policy.config.chunk_size, 4)
    # ...that differs from the starting policy: RL updated it.
    start = FlowMLPPolicy.from_pretrained(policy_dir)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), policy.state_dict().values(), strict=True)
    ]
    assert any(changed)
    state_dir = out / "checkpoints" / "last" / "training_state"
    for name in (
        "rl_heads.safetensors",
        "optimizer_state.safetensors",
        "rng_state.safetensors",
        "trainer_state.json",
    ):
        assert (state_dir / name).exists()
    assert json.loads((state_dir / "trainer_state.json").read_text())["iteration"] == 2
    assert json.loads((out / "train_config.json").read_text())["output_dir"] == str(out)  # absolute
    # Both saved configs carry the numbers that ran: flow_mlp's actor lr and minibatch, the flag's epochs.
    for algorithm in (
        json.loads((out / "train_config.json").read_text())["algorithm"],
        json.loads((state_dir / "algorithm_config.json").read_text()),
    ):
        assert (algorithm["actor_lr"], algorithm["minibatch_size"], algorithm["update_epochs"]) == (
            3e-5,
            400,
            1,
        )


# Run as `python <driver> <module> <function> <call> <flags...>`: lerobot-pirl-train, killed with SIGKILL
# when the named function is entered for the <call>-th time in this process.
KILLING_DRIVER = """
import importlib, os, signal, sys

def main():
    module_name, function_name, kill_on_call, *argv = sys.argv[1:]
    module = importlib.import_module(module_name)
    owner, _, attribute = function_name.rpartition(".")
    owner = getattr(module, owner) if owner else module
    function, calls = getattr(owner, attribute), []

    def killed_on_the_chosen_call(*args, **kwargs):
        calls.append(None)
        if len(calls) == int(kill_on_call):
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    setattr(owner, attribute, killed_on_the_chosen_call)
    from lerobot_pirl.scripts.train import cli
    sys.argv = ["lerobot-pirl-train", *argv]
    cli()

if __name__ == "__main__":
    main()
"""

# Dense rewards and a large step, so that different data would give different weights.
LEARNING_SIGNAL = [
    "--rollout.sparse_reward=false",
    "--rollout.end_on_success=false",
    "--rollout.reward_scale=0.1",
    "--algorithm.actor_lr=1e-3",
]


# Everything in a metrics row that does not depend on the machine's speed.
def reproducible_columns(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(("time", "charts/"))} for row in rows]


def trained_state(run: Path) -> dict[str, torch.Tensor]:
    """The weights, RL heads and optimizer moments of a run's last checkpoint."""
    from safetensors.torch import load_file

    last = run / "checkpoints" / "last"
    return {
        **load_file(last / "pretrained_model" / "model.safetensors"),
        **load_file(last / "training_state" / "rl_heads.safetensors"),
        **load_file(last / "training_state" / "optimizer_state.safetensors"),
    }


def test_a_run_killed_at_three_points_and_resumed_ends_as_the_uninterrupted_run(
    monkeypatch, tmp_path, policy_dir
):
    # Issue 17 (exact resume): killed in a rollout, while writing a checkpoint and in an evaluation, then
    # resumed each time, the run ends with the uninterrupted run's metrics, weights and optimizer state.
    # Checkpoints every 2 iterations, so episodes also run across iterations between two of them.
    run_flags = [
        f"--policy.path={policy_dir}",
        *FAST_RUN,
        "--iterations=6",
        "--save_freq=2",
        "--eval.freq=2",
        "--eval.videos=0",
        *LEARNING_SIGNAL,
    ]
    uninterrupted = tmp_path / "uninterrupted"
    assert run_main(monkeypatch, [*run_flags, f"--output_dir={uninterrupted}"]) == 0

    out = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(KILLING_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    kills = [  # (where, on which call in that process, the checkpoint a resume continues from)
        ("lerobot_pirl.rollout.collector", "ChunkCollector.collect", 3, "000002"),  # iteration 3's rollout
        ("lerobot_pirl.runtime.checkpoint", "save_file", 1, "000002"),  # writing checkpoint 4
        (
            "lerobot_pirl.runtime.trainer",
            "evaluate",
            2,
            "000006",
        ),  # iteration 6's evaluation, saved before it
    ]
    for number, (module, function, call, resume_from) in enumerate(kills):
        flags = [*run_flags, f"--output_dir={out}"] + (["--resume=true"] if number else [])
        killed = subprocess.run(
            [sys.executable, str(driver), module, function, str(call), *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert (out / "checkpoints" / "last").resolve().name == resume_from
        if function == "save_file":  # killed in the middle of writing checkpoint 4
            assert (out / "checkpoints" / "000004.partial").is_dir()

    resumed = subprocess.run(
        [sys.executable, "-m", "lerobot_pirl.scripts.train", f"--output_dir={out}", "--resume=true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000004", "000006", "last"]
    killed_rows, uninterrupted_rows = (MetricsLog.read(run / "metrics.jsonl") for run in (out, uninterrupted))
    assert [row["iteration"] for row in killed_rows] == list(range(7))  # each iteration exactly once
    assert reproducible_columns(killed_rows) == reproducible_columns(uninterrupted_rows)
    expected, got = trained_state(uninterrupted), trained_state(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    start = FlowMLPPolicy.from_pretrained(policy_dir).state_dict()
    assert not torch.equal(start["model.velocity_out.weight"], got["model.velocity_out.weight"])


def test_a_resumed_grpo_run_is_the_uninterrupted_run(monkeypatch, tmp_path, policy_dir):
    grpo_flags = [
        f"--policy.path={policy_dir}",
        *FAST_RUN,
        "--algorithm.type=grpo",
        "--algorithm.group_size=2",
        *LEARNING_SIGNAL,
        "--iterations=3",
        "--save_freq=1",
        "--eval.freq=0",
        "--eval.videos=0",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(monkeypatch, [*grpo_flags, f"--output_dir={whole}"]) == 0
    # Stopped by its env-step budget after one iteration (2 episodes of 24 steps), then resumed. The
    # iteration count stays: it shapes the learning-rate schedule.
    assert run_main(monkeypatch, [*grpo_flags, "--max_env_steps=48", f"--output_dir={split}"]) == 0
    assert run_main(monkeypatch, [f"--output_dir={split}", "--resume=true", "--max_env_steps=1000"]) == 0
    assert [row["iteration"] for row in MetricsLog.read(split / "metrics.jsonl")] == [0, 1, 2, 3]
    # The stopped run evaluated its iteration 1 too; that evaluation draws from its own generators.
    split_rows, whole_rows = (
        [
            {k: v for k, v in row.items() if not k.startswith("eval/")}
            for row in MetricsLog.read(run / "metrics.jsonl")
        ]
        for run in (split, whole)
    )
    assert reproducible_columns(split_rows) == reproducible_columns(whole_rows)
    expected, got = trained_state(whole), trained_state(split)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def with_policy(flag: str):
    return lambda policy, act_policy: [f"--policy.path={policy}", flag]


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (
            lambda d, t: ["--env.type=metaworld_state", "--env.task=psuh-v3"],
            "Unknown MetaWorld task 'psuh-v3'",
        ),
        (lambda d, t: ["--policy.path=/no/such/folder"], "no such folder"),
        (lambda d, t: [f"--policy.path={t}", "--env.type=metaworld_state"], "not a flow-matching policy"),
        (
            lambda d, t: [
                f"--policy.path={d}",
                "--env.type=metaworld_state",
                "--env.image_size=0",
                "--algorithm.exploration=flow_magic",
            ],
            "flow_magic",
        ),
        (
            lambda d, t: [f"--policy.path={d}", "--algorithm.value_features=foo"],
            "--algorithm.value_features must be one of ('prefix', 'expert'), got 'foo'",
        ),
        # Issue 12: degenerate algorithm values (a noise level of 0 once gave NaN log-probs at the first
        # update; the others trained on nothing or crashed later).
        *[
            (with_policy(flag), message)
            for flag, message in [
                ("--algorithm.noise_level=0", "--algorithm.noise_level must be > 0 for flow_sde exploration"),
                (
                    "--algorithm.noise_level=-1",
                    "--algorithm.noise_level must be > 0 for flow_sde exploration",
                ),
                ("--algorithm.noise_level=nan", "--algorithm.noise_level must be a finite number, got nan"),
                ("--algorithm.noise_std_max=0.01", "--algorithm.noise_std_max must be >= noise_std_min"),
                ("--algorithm.clip_ratio=0", "--algorithm.clip_ratio must be > 0, got 0"),
                ("--algorithm.loss_weighting=token", "--algorithm.loss_weighting must be one of"),
                ("--algorithm.value_head_activation=swish", "--algorithm.value_head_activation must be"),
            ]
        ],
        # Issue 17: each of these once ended in a traceback or trained on a meaningless value.
        *[
            (with_policy(flag), message)
            for flag, message in [
                ("--rollout.decisions_per_env=0", "--rollout.decisions_per_env must be >= 1, got 0"),
                ("--rollout.episodes_per_env=0", "--rollout.episodes_per_env must be >= 1, got 0"),
                ("--rollout.n_action_steps=0", "--rollout.n_action_steps must be >= 1, got 0"),
                ("--rollout.num_inference_steps=0", "--rollout.num_inference_steps must be >= 1, got 0"),
                # Issue 15: a C the chunk cannot hold, a VLA-only option, observation renames only.
                ("--rollout.n_action_steps=5", "--rollout.n_action_steps=5 must be in [1, the policy's"),
                ("--policy_options.tokenizer=google/paligemma-3b-pt-224", "apply to VLAs only"),
                ('--rename_map={"action": "observation.state"}', "--rename_map renames observations only"),
                (
                    '--rename_map={"observation.state": "observation.environment_state"}',
                    "gives two policy inputs the same env name",
                ),
                ("--rollout.reward_scale=0", "--rollout.reward_scale must be > 0"),
                ("--rollout.storage_device=gpu9", "--rollout.storage_device=gpu9: not a torch device"),
                ("--eval.n_episodes=0", "--eval.n_episodes must be >= 1, got 0"),
                ("--eval.batch_size=0", "--eval.batch_size must be >= 1, got 0"),
                ("--eval.seed=-1", "--eval.seed must be >= 0, got -1"),
                ("--seed=-1", "--seed must be >= 0, got -1"),
                ("--iterations=0", "--iterations must be >= 1, got 0"),
                ("--max_minutes=0", "--max_minutes must be > 0"),
                ("--bootstrap.num_demos=0", "--bootstrap.num_demos must be >= 1, got 0"),
                ("--device=cuda", "--device=cuda: this machine has no cuda device"),
                ("--device=banana", "--device=banana: not a torch device"),
            ]
        ],
    ],
)
def test_bad_input_gets_one_error_line_before_any_work(
    monkeypatch, capsys, tmp_path, policy_dir, make_args, expected
):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig

    act_dir = tmp_path / "act"
    ACTConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(4,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(4,))},
        push_to_hub=False,
    ).save_pretrained(act_dir)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        from lerobot_pirl.scripts.train import cli

        monkeypatch.setattr(
            sys, "argv", ["lerobot-pirl-train", *make_args(policy_dir, act_dir), f"--output_dir={out}"]
        )
        cli()
    assert exit_info.value.code == 2
    error_line = the_error_line(capsys)
    assert expected in error_line
    assert not out.exists()


def test_policy_env_feature_mismatch_is_refused(monkeypatch, capsys, tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature

    wrong = save_tiny_flow_mlp(
        tmp_path / "wrong",
        features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(7,)),
            "action": PolicyFeature(type=FeatureType.ACTION, shape=(4,)),
        },
    )
    out = tmp_path / "run"
    assert run_main(monkeypatch, [f"--policy.path={wrong}", *FAST_RUN, f"--output_dir={out}"]) == 2
    error = capsys.readouterr().err
    assert "observation.state: policy (7,) vs env (4,)" in error
    assert not out.exists()


def test_a_non_finite_loss_keeps_the_last_good_checkpoint_and_ends_with_a_stopped_line(
    monkeypatch, capsys, tmp_path, policy_dir
):
    # Issue 17: the failing update may have blown the weights up before its NaN showed; nothing of it is
    # saved, the good checkpoint of the previous iteration is neither rewritten nor relabelled.
    import hashlib

    from lerobot_pirl.algorithms.ppo import PPO

    real = PPO.update_samples
    out = tmp_path / "run"
    weights = out / "checkpoints" / "000001" / "pretrained_model" / "model.safetensors"
    seen = []

    def poisoned_in_iteration_2(self, batches):
        samples, stats = real(self, batches)
        if not seen:
            seen.append(None)
            return samples, stats
        seen.append(hashlib.sha256(weights.read_bytes()).hexdigest())
        return samples.replace(returns=samples.returns * float("nan")), stats

    monkeypatch.setattr(PPO, "update_samples", poisoned_in_iteration_2)
    args = checkpoint_every_iteration(policy_dir, out, iterations=3)
    assert run_main(monkeypatch, args) == 1
    captured = capsys.readouterr()
    assert "→ RL" not in captured.out and f"checkpoint: {weights.parents[1]}" in captured.out
    (stopped,) = [line for line in captured.err.splitlines() if line.startswith("stopped:")]
    assert "non-finite loss in update epoch 0, minibatch 0 at iteration 2; its update is dropped" in stopped
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000001", "last"]
    assert (out / "checkpoints" / "last").resolve().name == "000001"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == seen[1]


def test_push_to_hub_uploads_the_final_checkpoint(monkeypatch, tmp_path, policy_dir):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, repo_type, folder_path, **kwargs):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            url = type("Url", (), {"url": f"https://hf.co/{repo_id}"})()
            return type("Commit", (), {"repo_url": url})()

    monkeypatch.setattr("lerobot_pirl.runtime.hub.HfApi", FakeApi)
    monkeypatch.setattr("lerobot_pirl.runtime.hub.get_token", lambda: "hf_test")
    out = tmp_path / "run"
    args = [
        f"--policy.path={policy_dir}",
        "--policy.push_to_hub=true",
        "--policy.repo_id=user/pirl-reach",
        *FAST_RUN,
        "--iterations=1",
        "--eval.videos=0",
        f"--output_dir={out}",
    ]
    assert run_main(monkeypatch, args) == 0
    assert calls["create"] == ("user/pirl-reach", False)
    for name in (
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "README.md",
        "train_config.json",
    ):
        assert name in calls["files"]


def push_args(policy_dir, out) -> list[str]:
    return [
        f"--policy.path={policy_dir}",
        "--policy.push_to_hub=true",
        "--policy.repo_id=user/pirl-reach",
        *FAST_RUN,
        "--iterations=1",
        "--eval.videos=0",
        f"--output_dir={out}",
    ]


def test_a_push_without_login_is_refused_before_training(monkeypatch, capsys, tmp_path, policy_dir):
    monkeypatch.setattr("lerobot_pirl.runtime.hub.get_token", lambda: None)
    out = tmp_path / "run"
    assert run_main(monkeypatch, push_args(policy_dir, out)) == 2
    error_line = the_error_line(capsys)
    assert "needs a Hugging Face login" in error_line
    assert not out.exists()


def test_a_failed_push_prints_the_result_first_and_says_how_to_push_later(
    monkeypatch, capsys, tmp_path, policy_dir
):
    class OfflineApi:
        def create_repo(self, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'\n(and 40 more lines)")

    monkeypatch.setattr("lerobot_pirl.runtime.hub.HfApi", OfflineApi)
    monkeypatch.setattr("lerobot_pirl.runtime.hub.get_token", lambda: "hf_test")
    out = tmp_path / "run"
    assert run_main(monkeypatch, push_args(policy_dir, out)) == 1
    captured = capsys.readouterr()
    assert "→ RL" in captured.out and "checkpoint:" in captured.out
    failure = [line for line in captured.err.splitlines() if "push to user/pirl-reach failed" in line]
    assert len(failure) == 1 and "Traceback" not in captured.err
    checkpoint = out / "checkpoints" / "000001"
    assert f"hf upload user/pirl-reach {checkpoint / 'pretrained_model'} ." in failure[0]
    assert (checkpoint / "pretrained_model" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "program, module",
    [
        ("lerobot-pirl-train", "lerobot_pirl.scripts.train"),
        ("lerobot-pirl-learner", "lerobot_pirl.scripts.learner"),
        ("lerobot-pirl-actor", "lerobot_pirl.scripts.actor"),
    ],
)
@pytest.mark.parametrize("scope", [[], ["--algorithm.type=ppo"], ["--algorithm.type=grpo"]])
def test_help_of_every_training_cli_and_algorithm_scope(monkeypatch, capsys, program, module, scope):
    import importlib

    cli = importlib.import_module(module).cli
    monkeypatch.setattr(sys, "argv", [program, *scope, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: {program}")
    if scope:
        assert "--algorithm.actor_lr" in shown


def test_dense_reward_ending_at_success_is_warned_about(monkeypatch, caplog, tmp_path):
    from lerobot_pirl.runtime.config import RolloutConfig, TrainConfig

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-train"])
    warning = "--rollout.sparse_reward=false with --rollout.end_on_success=true"
    for end_on_success, warned in ((True, True), (False, False)):
        caplog.clear()
        rollout = RolloutConfig(sparse_reward=False, end_on_success=end_on_success)
        TrainConfig(rollout=rollout, output_dir=tmp_path).validate()
        assert (warning in caplog.text) is warned
    caplog.clear()
    TrainConfig(output_dir=tmp_path).validate()  # the sparse default
    assert warning not in caplog.text


@pytest.mark.parametrize("module", ["lerobot_pirl.scripts.train", "lerobot_pirl.scripts.eval"])
def test_a_missing_config_file_is_one_error_line(monkeypatch, capsys, tmp_path, module):
    import importlib

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl", f"--config_path={tmp_path / 'no.yaml'}"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).cli()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"--config_path={tmp_path / 'no.yaml'}: no such file")


def test_eval_help_lists_what_evaluation_uses_and_no_training_flags(monkeypatch, capsys):
    from lerobot_pirl.scripts.eval import cli

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-eval", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--eval.n_episodes", "--eval.batch_size", "--rollout.n_action_steps", "--output_dir"):
        assert flag in shown
    for flag in ("--rollout.num_envs", "--rollout.decisions_per_env", "--eval.freq", "--algorithm"):
        assert flag not in shown


def test_a_checkpoint_folder_is_accepted_as_policy_path(tmp_path):
    from lerobot_pirl.runtime.config import load_policy_config

    checkpoint = tmp_path / "run" / "checkpoints" / "last"  # as lerobot-train and we lay it out
    save_tiny_flow_mlp(checkpoint / "pretrained_model")
    config = load_policy_config(str(checkpoint), [])
    assert config.type == "flow_mlp" and config.pretrained_path == checkpoint / "pretrained_model"


def test_evaluation_is_reproducible_in_the_run_and_by_lerobot_pirl_eval(monkeypatch, tmp_path, policy_dir):
    # Issue 16/17: dense returns tell apart any change of the sampled noise. With a learning rate far below
    # float32 resolution the weights never change, so the SFT and final evaluations agree; lerobot-pirl-eval
    # on the saved checkpoint must give the trainer's number, bit for bit with the same batch size.
    from lerobot_pirl.scripts.eval import main as eval_main

    dense = ["--rollout.sparse_reward=false", "--rollout.end_on_success=false", "--rollout.reward_scale=0.01"]
    env = ["--env.type=metaworld_state", "--env.task=reach-v3", "--env.episode_length=24"]
    out = tmp_path / "run"
    args = [f"--policy.path={policy_dir}", *FAST_RUN, *dense, "--eval.n_episodes=3", "--eval.batch_size=3"]
    args += ["--algorithm.actor_lr=1e-30", "--iterations=1", f"--output_dir={out}"]
    assert run_main(monkeypatch, args) == 0
    sft, final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert final["eval/episode_return"] == sft["eval/episode_return"] != 0.0

    def lerobot_pirl_eval(batch_size: int, folder: str) -> float:
        eval_args = [f"--policy.path={out / 'checkpoints' / 'last'}", *env, *dense, "--eval.n_episodes=3"]
        eval_args += [
            f"--eval.batch_size={batch_size}",
            "--eval.videos=0",
            f"--output_dir={tmp_path / folder}",
        ]
        monkeypatch.setattr(sys, "argv", ["lerobot-pirl-eval", *eval_args])
        assert eval_main() == 0
        return json.loads((tmp_path / folder / "eval_info.json").read_text())["overall"]["avg_sum_reward"]

    assert lerobot_pirl_eval(3, "eval_a") == lerobot_pirl_eval(3, "eval_b") == final["eval/episode_return"]
    assert lerobot_pirl_eval(1, "eval_c") == pytest.approx(final["eval/episode_return"], rel=1e-4)


def test_a_bootstrap_run_records_the_sft_policy_it_started_from(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    tiny_bootstrap = ["--bootstrap.num_demos=2", "--bootstrap.sft_steps=4", "--bootstrap.batch_size=8"]
    args = [*FAST_RUN, *tiny_bootstrap, f"--bootstrap.cache_dir={cache}", "--iterations=1"]
    assert run_main(monkeypatch, [*args, f"--output_dir={tmp_path / 'run'}"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["policy"]
    (sft_config,) = cache.glob("**/config.json")
    assert saved["type"] == "flow_mlp" and Path(saved["pretrained_path"]) == sft_config.parent


class FakeWandB:
    """Records what the trainer hands to W&B (the real client needs its service process and an account);
    `init` leaves the run file where W&B does, `<dir>/wandb/latest-run/run-<id>.wandb`."""

    def __init__(self):
        self.inits, self.logs, self.artifacts = [], [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run_id = kwargs["id"] or f"run{len(self.inits)}"
        latest = Path(kwargs["dir"]) / "wandb" / "latest-run"
        latest.mkdir(parents=True, exist_ok=True)
        (latest / f"run-{run_id}.wandb").touch()
        fake = self

        class Run:
            id = run_id

            def log(self, data, step):
                fake.logs.append((step, data))

            def log_artifact(self, artifact):
                fake.artifacts.append(artifact)

            def get_url(self):
                return None

            def finish(self):
                pass

        return Run()

    class Video:
        def __init__(self, path, format):
            self.path = path

    class Artifact:
        def __init__(self, name, type):
            self.name, self.type, self.dirs = name, type, []

        def add_dir(self, path):
            self.dirs.append(Path(path))


def test_wandb_gets_videos_checkpoints_and_continues_the_same_run_on_resume(
    monkeypatch, tmp_path, policy_dir
):
    fake = FakeWandB()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    args = [f"--policy.path={policy_dir}", *FAST_RUN, "--eval.freq=1", f"--output_dir={out}"]
    args += ["--wandb.enable=true", "--wandb.mode=offline", "--job_name=wb"]
    assert run_main(monkeypatch, [*args, "--iterations=2"]) == 0
    (first,) = fake.inits
    assert first["id"] is None and first["resume"] is None and first["mode"] == "offline"
    assert first["tags"] == ["policy:flow_mlp", "seed:3", "env:metaworld_state"]
    assert [step for step, _ in fake.logs] == [0, 1, 2]
    for _, data in fake.logs:  # every evaluation's video, with its metrics row
        (video,) = data["eval/videos"]
        assert Path(video.path).is_file() and "eval/success_rate" in data
    (artifact,) = fake.artifacts
    assert (artifact.name, artifact.type) == ("wb-000002", "model")
    assert artifact.dirs == [out / "checkpoints" / "000002" / "pretrained_model"]
    assert json.loads((out / "train_config.json").read_text())["wandb"]["run_id"] == "run1"

    assert run_main(monkeypatch, [*args, "--iterations=3", "--resume=true"]) == 0
    assert (fake.inits[1]["id"], fake.inits[1]["resume"]) == ("run1", "must")
    assert [step for step, _ in fake.logs[3:]] == [3]
    assert [a.name for a in fake.artifacts] == ["wb-000002", "wb-000003"]


@pytest.mark.parametrize(
    ("output_dir", "expected"),
    [("config.json", "is a file, not a folder"), ("config.json/run", "config.json is a file, not a folder")],
)
def test_an_output_dir_that_cannot_be_made_is_one_error_line(
    monkeypatch, capsys, tmp_path, policy_dir, output_dir, expected
):
    folder = tmp_path / "policy_copy"
    shutil.copytree(policy_dir, folder)
    args = [f"--policy.path={folder}", *FAST_RUN, f"--output_dir={folder / output_dir}"]
    assert run_main(monkeypatch, args) == 2
    error_line = the_error_line(capsys)
    assert expected in error_line
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in policy_dir.iterdir())


@pytest.fixture(scope="module")
def two_checkpoint_run(tmp_path_factory, policy_dir) -> Path:
    out = tmp_path_factory.mktemp("two_checkpoints") / "run"
    args = checkpoint_every_iteration(policy_dir, out, iterations=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_main(monkeypatch, args) == 0
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: truncate(state / "optimizer_state.safetensors"),
        lambda state: (state / "rng_state.safetensors").unlink(),
        lambda state: truncate(state / "rl_heads.safetensors"),
        lambda state: (state / "trainer_state.json").write_text("{"),
        lambda state: (state / "scheduler_state.json").unlink(),
        lambda state: truncate(state.parent / "pretrained_model" / "model.safetensors"),
    ],
    ids=[
        "optimizer-truncated",
        "rng-missing",
        "heads-truncated",
        "trainer-state-bad",
        "scheduler-missing",
        "weights",
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    monkeypatch, capsys, tmp_path, policy_dir, two_checkpoint_run, damage
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, out, symlinks=True)
    damage(out / "checkpoints" / "000002" / "training_state")
    args = checkpoint_every_iteration(policy_dir, out, iterations=3)
    assert run_main(monkeypatch, [*args, "--resume=true"]) == 0
    assert "000002 cannot be resumed from" in capsys.readouterr().err
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [0, 1, 2, 3]  # iteration 2 redone from checkpoint 1, then 3
    final = out / "checkpoints" / "last"
    assert final.resolve().name == "000003"
    assert json.loads((final / "training_state" / "trainer_state.json").read_text())["iteration"] == 3


def test_resume_with_every_checkpoint_damaged_is_one_error_line(
    monkeypatch, capsys, tmp_path, two_checkpoint_run
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, out, symlinks=True)
    for checkpoint in ("000001", "000002"):
        (out / "checkpoints" / checkpoint / "training_state" / "rng_state.safetensors").unlink()
    assert run_main(monkeypatch, [*FAST_RUN, f"--output_dir={out}", "--resume=true"]) == 2
    error_line = the_error_line(capsys)
    assert "every checkpoint in" in error_line


def test_a_run_stopped_before_its_first_checkpoint_restarts_in_its_folder(
    monkeypatch, capsys, tmp_path, policy_dir
):
    out = tmp_path / "run"
    (out / "videos").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')  # what a run killed during iteration 1 leaves
    args = [f"--policy.path={policy_dir}", *FAST_RUN, f"--output_dir={out}"]
    assert run_main(monkeypatch, [*args, "--iterations=1", "--resume=true"]) == 2
    assert "holds no checkpoint yet" in capsys.readouterr().err
    assert run_main(monkeypatch, [*args, "--iterations=1"]) == 0
    assert (out / "checkpoints" / "last").resolve().name == "000001"


@pytest.mark.parametrize(
    "evil_step",
    [
        lambda marker: {"class": "subprocess.Popen", "config": {"args": f"touch {marker}", "shell": True}},
        lambda marker: {"class": "os.system", "config": {}},
        lambda marker: "not a step",
    ],
    ids=["popen", "os-system", "not-an-object"],
)
def test_a_processor_file_that_names_code_is_refused_before_anything_runs(
    monkeypatch, capsys, tmp_path, policy_dir, evil_step
):
    # Issue 17: LeRobot's processor loader imports any "class" a policy folder names and calls it.
    folder = tmp_path / "policy"
    shutil.copytree(policy_dir, folder)
    marker = tmp_path / "ran"
    preprocessor = json.loads((folder / "policy_preprocessor.json").read_text())
    preprocessor["steps"][0] = evil_step(marker)
    (folder / "policy_preprocessor.json").write_text(json.dumps(preprocessor))
    out = tmp_path / "run"
    assert run_main(monkeypatch, [f"--policy.path={folder}", *FAST_RUN, f"--output_dir={out}"]) == 2
    error_line = the_error_line(capsys)
    assert "step 0" in error_line and "policy_preprocessor.json" in error_line
    assert not marker.exists() and not out.exists()


def test_resume_continues_the_saved_run_and_refuses_a_changed_setting(
    monkeypatch, capsys, tmp_path, two_checkpoint_run
):
    # Issue 17: `--resume=true --output_dir=<run>` alone is the run as it was saved (2 envs, 2 eval
    # episodes, seed 3), not the defaults; a setting that would change the run is refused.
    out = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, out, symlinks=True)
    saved = json.loads((out / "train_config.json").read_text())
    assert run_main(monkeypatch, [f"--output_dir={out}", "--resume=true", "--algorithm.actor_lr=1e9"]) == 2
    error_line = the_error_line(capsys)
    assert "--algorithm.actor_lr cannot change on --resume=true" in error_line
    assert json.loads((out / "train_config.json").read_text()) == saved

    assert run_main(monkeypatch, [f"--output_dir={out}", "--resume=true", "--iterations=3"]) == 0
    resumed = json.loads((out / "train_config.json").read_text())
    assert resumed["iterations"] == 3 and resumed["resume"] is True
    for section, key in [
        ("rollout", "num_envs"),
        ("eval", "n_episodes"),
        ("algorithm", "actor_lr"),
        ("env", "task"),
    ]:
        assert resumed[section][key] == saved[section][key]
    assert resumed["seed"] == saved["seed"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3]
    assert rows[3]["env_steps"] - rows[2]["env_steps"] == 2 * 3 * 4  # 2 envs x 3 decisions x C = 4

    # LeRobot's form: the checkpoint's own train_config.json as --config_path.
    saved_config = out / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    assert run_main(monkeypatch, [f"--config_path={saved_config}", "--resume=true", "--iterations=4"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3, 4]
    assert json.loads((out / "train_config.json").read_text())["rollout"] == saved["rollout"]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_one(
    monkeypatch, capsys, tmp_path, policy_dir
):
    import errno

    import lerobot_pirl.runtime.checkpoint as checkpoint

    real, calls = checkpoint.save_file, []

    def disk_full_at_the_second_checkpoint(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_the_second_checkpoint)
    out = tmp_path / "run"
    args = checkpoint_every_iteration(policy_dir, out, iterations=3)
    assert run_main(monkeypatch, args) == 1
    error_line = the_error_line(capsys)
    assert "could not write checkpoint 000002 (No space left on device)" in error_line
    assert str(out / "checkpoints" / "000001") in error_line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000001", "last"]


def test_a_full_disk_for_the_metrics_is_one_line_and_for_a_video_a_warning(
    monkeypatch, capsys, tmp_path, policy_dir
):
    import builtins
    import errno

    import lerobot_pirl.runtime.evaluation as evaluation
    import lerobot_pirl.runtime.metrics as metrics

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # A video that cannot be written is left out; the run goes on and ends normally.
    monkeypatch.setattr(evaluation, "write_video", no_space)
    out = tmp_path / "videos_full"
    assert run_main(monkeypatch, checkpoint_every_iteration(policy_dir, out, iterations=1)) == 0
    captured = capsys.readouterr()
    assert "could not write the video" in captured.err and "SFT" in captured.out
    assert not list(out.glob("videos/*.mp4"))

    # metrics.jsonl cannot be appended to after the first iteration's row: one line, the checkpoint kept.
    appended = []

    def full_after_two_rows(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appended.append(path)
            if len(appended) == 3:
                no_space()
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics, "open", full_after_two_rows, raising=False)
    out = tmp_path / "metrics_full"
    assert run_main(monkeypatch, checkpoint_every_iteration(policy_dir, out, iterations=3)) == 1
    error_line = the_error_line(capsys)
    assert f"could not append to {out / 'metrics.jsonl'} (No space left on device)" in error_line
    assert f"the last complete checkpoint is {out / 'checkpoints' / '000002'}" in error_line
    assert [row["iteration"] for row in MetricsLog.read(out / "metrics.jsonl")] == [0, 1]
