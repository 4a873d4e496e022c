"""Learner + actors on localhost with MetaWorld (state env) and a tiny random flow_mlp.

In-process runs use threads (one import of torch/LeRobot); the fault test and the DDP test use real
processes forked from a preloaded forkserver (testing/processes.py), so they can be SIGKILLed.
"""

import importlib
import json
import re
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import close_envs
from lerobot.utils.random_utils import set_seed

from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.distributed.actor import Actor
from lerobot_pirl.distributed.config import TOKEN_ENV, TOKEN_FILE, DistributedTrainConfig, TransportConfig
from lerobot_pirl.distributed.ddp import encode_samples
from lerobot_pirl.distributed.learner import build_learner, update_generator
from lerobot_pirl.distributed.payloads import ParametersMessage, RolloutMessage, trainable_state
from lerobot_pirl.distributed.transport import LearnerRefusedError, actor_token, learner_token
from lerobot_pirl.runtime.config import ConfigError, EvalConfig, RolloutConfig
from lerobot_pirl.runtime.factory import build_collector
from lerobot_pirl.runtime.trainer import LocalCollection, Trainer
from lerobot_pirl.testing.ddp_check import check_policy, run_ddp_update
from lerobot_pirl.testing.processes import free_port, start_cli
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

TASK = "reach-v3"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_tiny_flow_mlp(tmp_path_factory.mktemp("policy") / "flow_mlp")


def make_cfg(policy_dir: Path, output_dir: Path, **transport) -> DistributedTrainConfig:
    """4 decisions × 2 envs × 4 steps per actor and iteration; dense rewards so every update moves weights."""
    policy = PreTrainedConfig.from_pretrained(policy_dir)
    policy.pretrained_path = policy_dir
    cfg = DistributedTrainConfig(
        policy=policy,
        env=EnvConfig.get_choice_class("metaworld_state")(task=TASK, episode_length=20),
        algorithm=PPOConfig(actor_lr=3e-3, critic_lr=3e-3, minibatch_size=64, update_epochs=2),
        rollout=RolloutConfig(num_envs=2, decisions_per_env=4, sparse_reward=False),
        eval=EvalConfig(freq=0, n_episodes=2, batch_size=2, videos=0),
        iterations=2,
        save_freq=1,
        output_dir=output_dir,
        device="cpu",
        transport=TransportConfig(**{"port": 0, "straggler_timeout_s": 60, **transport}),
    )
    cfg.validate()
    return cfg


def joining(learner: Trainer) -> dict:
    """The transport settings an actor of this learner needs: its port and the run's token file."""
    return {"port": learner.source.port, "token_file": learner.output_dir / TOKEN_FILE}


def start_actors(learner: Trainer, cfgs: list[DistributedTrainConfig]) -> list[Actor]:
    try:
        return [Actor(cfg) for cfg in cfgs]
    except BaseException:
        learner.close(completed=False)
        raise


def run_threads(learner: Trainer, actors: list[Actor], timeout_s: float = 120.0) -> dict:
    """Run the learner and actors in threads; always stops and joins them."""
    results: dict = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("learner", learner.run()), name="learner")]
    threads += [
        threading.Thread(
            target=lambda a=a: results.__setitem__(a.actor_id, a.run()), name=f"actor{a.actor_id}"
        )
        for a in actors
    ]
    for thread in threads:
        thread.start()
    try:
        threads[0].join(timeout_s)
        for thread in threads[1:]:
            thread.join(30)
    finally:
        learner.source.stop_event.set()
        for actor in actors:
            actor.stop()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a learner or actor thread hung"
    return results


def rows(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_learner_and_two_actors_complete_two_iterations(policy_dir, tmp_path):
    learner = build_learner(make_cfg(policy_dir, tmp_path / "run", num_actors=2))
    received: list[RolloutMessage] = []
    submit = learner.source.rollouts.submit
    learner.source.rollouts.submit = lambda message: (submit(message), received.append(message))
    actors = start_actors(
        learner,
        [make_cfg(policy_dir, tmp_path / "unused", actor_id=a, **joining(learner)) for a in (0, 1)],
    )
    results = run_threads(learner, actors)

    assert results["learner"].state.iteration == 2 and results["learner"].stopped_by_error is None
    for actor_id in (0, 1):
        assert results[actor_id].finished and results[actor_id].versions_uploaded == 2
        # 2 versions × 2 envs × 4 decisions × 4 steps, less the decision each env sits out while it resets
        # after its 20-step episode (version 2's second decision)
        assert results[actor_id].env_steps == 2 * 32 - 2 * 4
    log = rows(tmp_path / "run")
    assert [r["iteration"] for r in log] == [0, 1, 2]
    assert [r["transport/actors"] for r in log[1:]] == [2.0, 2.0]
    assert [r["env_steps"] for r in log[1:]] == [64, 112]  # 2 actors × (32, then 24) per version
    assert log[1]["update/num_samples"] == 16.0  # 2 actors × 2 envs × 4 decisions
    assert (tmp_path / "run/checkpoints/000002/pretrained_model/model.safetensors").exists()
    # Disjoint seed ranges: each (actor, version) starts where the learner said, and the actors' first
    # episodes start from different MetaWorld goal positions.
    starts = {(m.actor_id, m.version): m.seed_start for m in received}
    assert starts == {(0, 0): 1000, (1, 0): 1010, (0, 1): 1020, (1, 1): 1030}
    first = {m.actor_id: m.batches[0].observations["observation.environment_state"][0] for m in received}
    assert not torch.allclose(first[0][:, -3:], first[1][:, -3:])  # goal xyz of the 2 envs differ


def test_one_learner_and_one_actor_make_the_single_process_trainers_update(policy_dir, tmp_path, monkeypatch):
    cfg = make_cfg(policy_dir, tmp_path / "distributed", num_actors=1)
    cfg.iterations = 1
    learner = build_learner(cfg)
    initial = {k: v.detach().clone() for k, v in trainable_state(learner.policy).items()}
    run_threads(
        learner, start_actors(learner, [make_cfg(policy_dir, tmp_path / "unused", **joining(learner))])
    )
    distributed = trainable_state(learner.policy)

    # The trainer with the same seeds; its RNG is put where the actor's and the learner's are
    # (the actor seeds with its range's start = cfg.seed for version 0; the update draws its
    # minibatch order from update_generator), which is all the distributed protocol fixes.
    trainer_cfg = make_cfg(policy_dir, tmp_path / "single")
    trainer_cfg.iterations = 1

    def seeded_source(trainer: Trainer) -> LocalCollection:
        source = LocalCollection(trainer)
        collect = source.collect
        source.collect = lambda: (set_seed(trainer_cfg.seed), collect())[1]
        return source

    def seeded_update(trainer: Trainer):
        generator = update_generator(trainer_cfg.seed, 0)
        return lambda samples: policy_update(
            trainer.policy, trainer.optimizer, samples, trainer.cfg.algorithm, trainer.device, generator
        )

    trainer = Trainer(trainer_cfg, source=seeded_source, update=seeded_update)
    trainer.run()
    single = trainable_state(trainer.policy)

    assert set(single) == set(distributed)
    moved = max((distributed[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4, "the update did not change the parameters: the comparison would be empty"
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-6, msg=name)
    assert rows(tmp_path / "distributed")[1]["env_steps"] == rows(tmp_path / "single")[1]["env_steps"] == 32


def test_grpo_groups_stay_inside_each_actor_and_its_seed_range(policy_dir, tmp_path):
    def grpo_cfg(output_dir, **transport):
        cfg = make_cfg(policy_dir, output_dir, **transport)
        cfg.algorithm = GRPOConfig(group_size=2, actor_lr=3e-3, minibatch_size=64, update_epochs=1)
        cfg.env.episode_length = 8  # 2 decisions per episode
        cfg.rollout.episodes_per_env = 2
        cfg.iterations = 1
        return cfg

    learner = build_learner(grpo_cfg(tmp_path / "run", num_actors=2))
    received: list[RolloutMessage] = []
    submit = learner.source.rollouts.submit
    learner.source.rollouts.submit = lambda message: (submit(message), received.append(message))
    actors = start_actors(
        learner, [grpo_cfg(tmp_path / "unused", actor_id=a, **joining(learner)) for a in (0, 1)]
    )
    results = run_threads(learner, actors)

    assert results["learner"].state.iteration == 1 and all(results[a].finished for a in (0, 1))
    # One group (2 envs) per actor and round, 2 rounds: 2 seeds each, from disjoint ranges of budget 2.
    assert sorted((m.actor_id, m.seed_start, m.seeds_used, len(m.batches)) for m in received) == [
        (0, 1000, 2, 2),
        (1, 1002, 2, 2),
    ]
    for message in received:
        for batch in message.batches:  # the two envs of a group start from the same state
            first = batch.observations["observation.environment_state"][0]
            assert torch.equal(first[0], first[1])
    row = rows(tmp_path / "run")[1]
    assert row["transport/actors"] == 2.0 and "grpo/kept_group_fraction" in row


def test_bad_transport_flags_get_one_error_line(monkeypatch, capsys):
    from lerobot_pirl.scripts.learner import cli

    monkeypatch.setattr(
        sys, "argv", ["lerobot-pirl-learner", "--transport.num_actors=0", "--output_dir=/nonexistent"]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "lerobot-pirl-learner: error: --transport.num_actors must be >= 1, got 0"
    )


@pytest.mark.parametrize(
    "program, flags, message",
    [
        ("learner", ["--transport.host=0.0.0.0"], "set --transport.tls_cert/--transport.tls_key, or"),
        ("actor", ["--transport.host=10.1.2.3"], "set --transport.tls_ca, or --transport.insecure=true"),
        ("learner", ["--transport.token_file=/nonexistent/token"], "token_file=/nonexistent/token is not a"),
    ],
)
def test_plaintext_beyond_loopback_and_a_missing_token_file_are_refused(
    monkeypatch, capsys, program, flags, message
):
    # Issue 17: serving other machines without TLS was only a warning.
    module = importlib.import_module(f"lerobot_pirl.scripts.{program}")
    monkeypatch.setattr(sys, "argv", [f"lerobot-pirl-{program}", *flags, "--output_dir=/nonexistent"])
    with pytest.raises(SystemExit) as exit_info:
        module.cli()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"lerobot-pirl-{program}: error: ") and message in error and "\n" not in error
    insecure = TransportConfig(host="0.0.0.0", insecure=True)
    insecure.check("learner")  # an explicit choice
    TransportConfig(host="::1").check("actor")
    TransportConfig(host="localhost").check("learner")


def test_the_learner_makes_a_private_token_per_run_and_keeps_it_for_its_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    transport = TransportConfig()
    token, flag = learner_token(transport, tmp_path)
    path = tmp_path / TOKEN_FILE
    assert flag == f"--transport.token_file={path}" and path.read_text().strip() == token
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert learner_token(transport, tmp_path)[0] == token  # a resume keeps the actors' token
    other_run = tmp_path / "other"
    other_run.mkdir()
    assert learner_token(transport, other_run)[0] != token
    assert actor_token(TransportConfig(token_file=path), timeout_s=1) == token
    with pytest.raises(LearnerRefusedError, match="did not appear"):
        actor_token(TransportConfig(token_file=tmp_path / "never"), timeout_s=0.5)
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert learner_token(transport, other_run)[0] == actor_token(transport, 1) == "from-the-environment"


def test_an_actor_with_other_rollout_settings_or_weights_is_refused(policy_dir, tmp_path):
    actor = Actor.__new__(Actor)  # only the fields check_compatible reads
    actor.actor_id, actor.fingerprint = 1, "same"
    actor.signature = {"num_envs": 2, "algorithm": "ppo"}
    message = ParametersMessage("run", 0, 2, [0, 10], 10, "same", {"num_envs": 2, "algorithm": "ppo"})
    actor.check_compatible(message)
    with pytest.raises(ConfigError, match="num_envs: actor 2 vs learner 4"):
        actor.check_compatible(
            ParametersMessage("run", 0, 2, [0, 10], 10, "same", {"num_envs": 4, "algorithm": "ppo"})
        )
    with pytest.raises(ConfigError, match="same --policy.path"):
        actor.check_compatible(ParametersMessage("run", 0, 2, [0, 10], 10, "other", actor.signature))
    with pytest.raises(ConfigError, match="expects 1 actors"):
        actor.check_compatible(ParametersMessage("run", 0, 1, [0], 10, "same", actor.signature))


def test_ddp_update_on_two_gloo_processes_equals_the_single_process_update(policy_dir, tmp_path):
    options = {
        "actor_lr": 3e-3,
        "critic_lr": 3e-3,
        "minibatch_size": 64,
        "update_epochs": 2,
        "micro_batch_size": 4,
    }
    cfg = make_cfg(policy_dir, tmp_path / "unused")
    policy, algorithm = check_policy(str(policy_dir), options, seed=5)
    collector, envs = build_collector(
        cfg, policy, *cfg_processors(policy_dir), num_envs=2, device="cpu", seed=7
    )
    try:
        samples = ppo_samples(collector.collect(4, "flow_sde"), algorithm)  # M = 8 decisions, 4 per rank
    finally:
        close_envs(envs)
    samples_path = tmp_path / "samples.safetensors"
    samples_path.write_bytes(encode_samples(samples))

    ranks = run_ddp_update(2, policy_dir, samples_path, tmp_path, options, seed=5)
    reference, _ = check_policy(str(policy_dir), options, seed=5)
    initial = {k: v.detach().clone() for k, v in trainable_state(reference).items()}
    metrics = policy_update(
        reference,
        make_optimizer(reference, algorithm),
        samples,
        algorithm,
        "cpu",
        torch.Generator().manual_seed(5),
    )
    for name, value in trainable_state(reference).items():
        assert torch.equal(ranks[0][f"param/{name}"], ranks[1][f"param/{name}"]), f"ranks differ on {name}"
        torch.testing.assert_close(ranks[0][f"param/{name}"], value, rtol=1e-4, atol=1e-5, msg=name)
    assert (
        max((value - initial[k]).abs().max().item() for k, value in trainable_state(reference).items()) > 1e-4
    )
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl"):
        assert ranks[0][f"metric/{key}"].item() == pytest.approx(metrics[key], rel=1e-3, abs=1e-6), key
    assert ranks[0]["metric/update/num_samples"].item() == 8


def cfg_processors(policy_dir: Path):
    from lerobot_pirl.adapters.registry import load_flow_policy

    _, preprocessor, postprocessor = load_flow_policy(policy_dir)
    return preprocessor, postprocessor


# ---- faults: real processes ---------------------------------------------------------------------------


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_killed_actor_is_waited_for_then_rejoins_and_a_killed_learner_resumes_losing_nothing(
    policy_dir, tmp_path
):
    output_dir, port = tmp_path / "run", free_port()
    # Enough versions that the learner is still mid-run when step 3 below picks the version to kill it at
    # (with 8, a slow rejoin on a loaded box let the run finish first).
    iterations = 16
    common = [
        f"--policy.path={policy_dir}",
        "--env.type=metaworld_state",
        f"--env.task={TASK}",
        "--env.episode_length=100",
        "--rollout.num_envs=2",
        "--rollout.decisions_per_env=40",  # ~0.5 s of collection: time to kill an actor mid-rollout
        "--algorithm.minibatch_size=512",
        "--algorithm.update_epochs=1",
        "--device=cpu",
        f"--transport.port={port}",
        "--transport.reconnect_max_backoff_s=0.5",
        "--transport.reconnect_timeout_s=120",
    ]
    learner_args = [
        *common,
        f"--output_dir={output_dir}",
        f"--iterations={iterations}",
        "--save_freq=1",
        "--eval.freq=0",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.videos=0",
        "--transport.num_actors=2",
        "--transport.straggler_timeout_s=3",
    ]
    actor_args = [*common, f"--transport.token_file={output_dir / TOKEN_FILE}"]  # waited for until made
    logs = {
        name: tmp_path / f"{name}.log" for name in ("learner1", "learner2", "actor0", "actor1", "actor1b")
    }
    processes = {}
    try:
        processes["learner1"] = start_cli("lerobot-pirl-learner", learner_args, logs["learner1"])
        processes["actor0"] = start_cli(
            "lerobot-pirl-actor", [*actor_args, "--transport.actor_id=0"], logs["actor0"]
        )
        processes["actor1"] = start_cli(
            "lerobot-pirl-actor", [*actor_args, "--transport.actor_id=1"], logs["actor1"]
        )

        # 1. Kill actor 1 while it collects version 1: the learner goes on with actor 0 after the timeout.
        wait_for(lambda: "actor 1 collecting version 1 " in read(logs["actor1"]), 180, "actor 1 at version 1")
        processes["actor1"].kill()
        wait_for(lambda: len(rows(output_dir)) >= 3, 180, "the update of version 1")
        version1 = rows(output_dir)[2]
        assert version1["transport/actors"] == 1.0 and version1["transport/timed_out"] == 1.0
        assert "missing actors [1]" in read(logs["learner1"])

        # 2. A restarted actor 1 joins at the version being collected.
        processes["actor1b"] = start_cli(
            "lerobot-pirl-actor", [*actor_args, "--transport.actor_id=1"], logs["actor1b"]
        )
        wait_for(
            lambda: any(r["iteration"] >= 3 and r.get("transport/actors") == 2.0 for r in rows(output_dir)),
            180,
            "an update with both actors again",
        )
        rejoined_at = int(re.search(r"actor 1 collecting version (\d+)", read(logs["actor1b"])).group(1))
        assert rejoined_at >= 2

        # 3. Kill the learner once version j is checkpointed and being collected; the actors keep
        # retrying; a resumed learner finishes the run.
        j = rows(output_dir)[-1]["iteration"]
        assert j < iterations, "the run ended before the learner could be killed mid-run"
        wait_for(
            lambda: (
                (output_dir / f"checkpoints/{j:06d}").exists()
                and f"actor 0 collecting version {j} " in read(logs["actor0"])
            ),
            120,
            f"checkpoint {j} and the collection of version {j}",
        )
        processes["learner1"].kill()
        processes["learner1"].join(10)
        killed_rows = rows(output_dir)
        time.sleep(1.0)
        assert processes["actor0"].is_alive() and processes["actor1b"].is_alive()
        processes["learner2"] = start_cli(
            "lerobot-pirl-learner", [*learner_args, "--resume=true"], logs["learner2"]
        )
        processes["learner2"].join(180)
        assert processes["learner2"].exitcode == 0, read(logs["learner2"])[-3000:]
        for name in ("actor0", "actor1b"):
            processes[name].join(30)
            assert processes[name].exitcode == 0, read(logs[name])[-3000:]
    finally:
        for process in processes.values():
            if process.is_alive():
                process.kill()
                process.join(10)

    final = rows(output_dir)
    # Each iteration exactly once, none lost.
    assert [r["iteration"] for r in final] == list(range(iterations + 1))
    resumed_at = int(re.search(r"resumed from .* at iteration (\d+)", read(logs["learner2"])).group(1))
    assert resumed_at >= 3 and final[: resumed_at + 1] == killed_rows[: resumed_at + 1]
    steps = [r["env_steps"] for r in final]
    assert all(later > earlier for earlier, later in zip(steps, steps[1:], strict=False))
    assert (output_dir / f"checkpoints/{iterations:06d}/pretrained_model/model.safetensors").exists()
    # The resumed learner hands out the same seed ranges for a version as the killed one did.
    seen: dict[int, set[int]] = {}
    for version, start in re.findall(
        r"actor 0 collecting version (\d+) of run \w+ \(seeds from (\d+)\)", read(logs["actor0"])
    ):
        seen.setdefault(int(version), set()).add(int(start))
    assert all(len(starts) == 1 for starts in seen.values()), seen
    runs_per_version = {}
    for version, run_id in re.findall(r"actor 0 collecting version (\d+) of run (\w+)", read(logs["actor0"])):
        runs_per_version.setdefault(int(version), set()).add(run_id)
    assert (
        len(runs_per_version[resumed_at]) == 2
    )  # collected for the killed run, then again for the resumed one
