"""The ready LIBERO configs in lerobot_pirl/examples/libero parse into TrainConfig the way
`lerobot-pirl-train --config_path=...` parses them (LeRobot's parser, no model loading) and carry the
reference recipe (RLinf's πRL configs for LIBERO), written out here independently of the script that
generates them.

No `from __future__ import annotations`: LeRobot's parser reads the config class from the annotation."""

import importlib.util
import sys
import tempfile
from pathlib import Path

import draccus
import pytest
import yaml
from lerobot.configs import parser

from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.examples import EXAMPLES_DIR
from lerobot_pirl.runtime.config import TrainConfig

EXAMPLES = EXAMPLES_DIR / "libero"
CONFIGS = sorted(EXAMPLES.glob("*/*.yaml"))

# RLinf's LIBERO configs: suite -> (LeRobot suite, episode length, C).
SUITES = {
    "spatial": ("libero_spatial", 240, 5),
    "object": ("libero_object", 240, 5),
    "goal": ("libero_goal", 320, 5),
    "long": ("libero_10", 480, 10),
}
K = {"pi0": dict.fromkeys(SUITES, 4), "pi05": {"spatial": 3, "object": 5, "goal": 5, "long": 5}}
NOISE_LEVEL = {
    "pi0": dict.fromkeys(SUITES, 0.5),
    "pi05": {"spatial": 0.5, "object": 0.3, "goal": 0.3, "long": 0.5},
}
PPO_EPOCHS = {"pi0": dict.fromkeys(SUITES, 4), "pi05": {"spatial": 1, "object": 1, "goal": 4, "long": 4}}
GRPO_EPOCHS = {
    "pi0": {"spatial": 2, "object": 2, "goal": 2, "long": 4},
    "pi05": {"spatial": 1, "object": 1, "goal": 1, "long": 4},
}
HUB_IDS = {"pi0": "lerobot/pi0_libero_finetuned", "pi05": "lerobot/pi05_libero_finetuned"}


@parser.wrap()
def parse_like_the_cli(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """What `lerobot-pirl-train`'s `main` receives, and the policy path its `validate` would load."""
    return cfg, parser.get_path_arg("policy")


@pytest.fixture
def isolated_parser(monkeypatch, tmp_path):
    # LeRobot's parser keeps the file's `policy.path` in module globals and writes a cleaned copy of the
    # file to a temporary file: keep both inside this test.
    monkeypatch.setattr(parser, "_config_path_args", {})
    monkeypatch.setattr(parser, "_config_yaml_overrides", {})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def parse(isolated_parser, monkeypatch):
    """The full CLI path (~1 s per call on a loaded 2-core machine): `--config_path` plus flags."""

    def parse_file(path: Path, *flags: str) -> tuple[TrainConfig, str | None]:
        monkeypatch.setattr(sys, "argv", ["lerobot-pirl-train", f"--config_path={path}", *flags])
        return parse_like_the_cli()

    return parse_file


@pytest.fixture
def decode(isolated_parser):
    """What the CLI path does with a config file and no flags (~10 ms): LeRobot's extraction of
    `policy.path`, then draccus's decoding of the rest."""

    def decode_file(path: Path) -> tuple[TrainConfig, str | None]:
        cleaned = parser.extract_path_fields_from_config(str(path), TrainConfig.__get_path_fields__())
        cfg = draccus.decode(TrainConfig, yaml.safe_load(Path(cleaned).read_text()))
        return cfg, parser.get_path_arg("policy", args=[])

    return decode_file


def test_every_policy_suite_algorithm_and_scale_has_a_config():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    expected = {
        (policy, f"{suite}_{algorithm}{scale}")
        for policy in HUB_IDS
        for suite in SUITES
        for algorithm in ("ppo_flow_sde", "ppo_flow_noise", "grpo")
        for scale in ("", "_1gpu")
    }
    assert names == expected and len(CONFIGS) == 48


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses_into_the_reference_recipe(decode, path):
    cfg, policy_path = decode(path)
    policy, name = path.parent.name, path.stem
    suite, algorithm = name.split("_", 1)
    one_gpu = algorithm.endswith("_1gpu")
    algorithm = algorithm.removesuffix("_1gpu")
    suite_name, episode_length, executed = SUITES[suite]

    assert policy_path == HUB_IDS[policy] and cfg.policy is None  # loaded by validate(), not here
    env = cfg.env
    assert (env.type, env.task, env.task_ids, env.episode_length) == (
        "libero",
        suite_name,
        [0],
        episode_length,
    )
    assert env.hard_reset is False and cfg.rollout.fast_render is False
    assert (cfg.rollout.n_action_steps, cfg.rollout.num_inference_steps) == (executed, K[policy][suite])

    alg = cfg.algorithm
    assert (alg.actor_lr, alg.critic_lr, alg.weight_decay, alg.max_grad_norm) == (5e-6, 1e-4, 0.01, 1.0)
    assert (alg.adam_beta1, alg.adam_beta2, alg.adam_eps) == (0.9, 0.95, 1e-8)
    assert (alg.clip_ratio, alg.gamma, alg.gae_lambda) == (0.2, 0.99, 0.95)
    assert alg.target_kl is None  # the reference has no KL guard
    rollout_epochs, envs = (4, 16) if one_gpu else (8, 64)
    assert cfg.rollout.num_envs == envs
    # one GPU: the largest micro-batch whose estimate fits (the test below checks the estimate)
    assert (alg.minibatch_size, alg.micro_batch_size) == ((512, 128) if one_gpu else (2048, 128))
    assert alg.prefix_cache_gib == 40.0  # up to 4,096 decisions x 10.3 MB of prefix keys/values fit
    if algorithm == "grpo":
        assert isinstance(alg, GRPOConfig) and alg.exploration == "flow_sde"
        assert alg.noise_level == NOISE_LEVEL[policy][suite]
        assert alg.group_size == 8 and cfg.rollout.num_envs % alg.group_size == 0
        assert cfg.rollout.episodes_per_env == rollout_epochs
        assert alg.update_epochs == GRPO_EPOCHS[policy][suite]
        # Â standardised per group only; every episode weighs the same (RLinf's masked_mean_ratio)
        assert alg.normalize_advantages is False and alg.loss_weighting == "episode"
    else:
        assert isinstance(alg, PPOConfig) and alg.update_epochs == PPO_EPOCHS[policy][suite]
        assert (alg.value_clip, alg.huber_delta) == (0.2, 10.0)
        assert alg.normalize_advantages is True and alg.loss_weighting == "decision"
        # the reference's critics: π0 on pooled expert features, π0.5 on the pooled VLM prefix
        assert (alg.value_features, alg.value_head_hidden, alg.value_head_activation) == (
            ("expert", (512, 256, 128), "relu") if policy == "pi0" else ("prefix", (1024, 512, 256), "relu")
        )
        # rollout epochs x one episode budget of decisions per env
        assert cfg.rollout.decisions_per_env == rollout_epochs * episode_length // executed
        if algorithm == "ppo_flow_sde":
            assert alg.exploration == "flow_sde" and alg.noise_level == NOISE_LEVEL[policy][suite]
        else:
            assert alg.exploration == "flow_noise"
            assert (alg.noise_std_min, alg.noise_std_max, alg.entropy_coef) == (0.08, 0.16, 0.005)
    options = cfg.policy_options
    assert options.train_vlm is False  # the action expert (+ heads) trains, the VLM stays frozen
    # bf16 activations; Flow-Noise's expert passes recomputed in backward (issue 15: it must fit a GPU)
    assert options.autocast_dtype == "bfloat16"
    assert options.gradient_checkpointing is (algorithm == "ppo_flow_noise")
    assert cfg.eval.n_episodes == 50  # every init state of the task


@pytest.mark.parametrize(
    "name", ["pi0/spatial_ppo_flow_sde", "pi05/long_grpo_1gpu", "pi0/goal_ppo_flow_noise"]
)
def test_the_cli_parser_reads_the_same_config(parse, decode, name):
    path = EXAMPLES / f"{name}.yaml"
    assert parse(path) == decode(path)


def test_flags_after_the_config_override_it(parse):
    cfg, policy_path = parse(
        EXAMPLES / "pi0" / "spatial_ppo_flow_sde.yaml",
        "--env.task_ids=[3]",
        "--policy.path=outputs/my_sft/pretrained_model",
        "--algorithm.target_kl=0.05",
    )
    assert cfg.env.task_ids == [3] and cfg.env.episode_length == 240
    assert policy_path == "outputs/my_sft/pretrained_model"
    assert cfg.algorithm.target_kl == 0.05 and cfg.algorithm.update_epochs == 4


def test_configs_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_libero_configs", EXAMPLES / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.all_configs()
    assert sorted(written) == CONFIGS
    for path, text in written.items():
        assert path.read_text() == text, f"{path} is stale: run python {EXAMPLES / 'make_configs.py'}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_stated_memory_is_the_start_up_estimate(decode, path):
    """Issue 15: each header says what the config needs, as the trainer's own estimate computes it."""
    from lerobot_pirl.runtime.memory import FULL_SIZE_PROFILES, estimate_memory

    cfg, _ = decode(path)
    policy = path.parent.name
    cfg.algorithm = cfg.algorithm.resolved(policy)
    estimate = estimate_memory(cfg, FULL_SIZE_PROFILES[policy])
    stated = [line for line in path.read_text().splitlines() if line.startswith("# Needs GPU")]
    assert stated == [
        f"# Needs GPU ≈ {estimate.gpu_gib:.0f} GiB, host RAM ≈ {estimate.host_gb:.0f} GB "
        "(runtime/memory.py estimate, one env worker per env)."
    ]
    # Every config fits one 80 GB GPU with room to spare; the reference scale's envs need more than one host.
    assert estimate.gpu_gib <= 70
    one_gpu = path.stem.endswith("_1gpu")
    assert (estimate.host_gb < 100) is one_gpu
    assert ("run it as a" in path.read_text()) is not one_gpu
