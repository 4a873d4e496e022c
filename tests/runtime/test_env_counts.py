"""How many envs and env workers a run gets when the flags leave it open, and which bad counts stop it."""

import pytest
from lerobot.envs.configs import LiberoEnv

from lerobot_pirl.runtime.config import ConfigError, EvalConfig, RolloutConfig, TrainConfig, _default_env
from lerobot_pirl.runtime.envs import resolve_eval_batch_size
from lerobot_pirl_launch.train import DEFAULT_ENV_TYPE, early_worker_env_type


def resolved(cores: int, monkeypatch, **sections) -> TrainConfig:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    cfg = TrainConfig(**sections)
    cfg.resolve_num_workers()
    return cfg


def test_defaults_use_every_core_and_evaluate_all_metaworld_episodes_at_once(monkeypatch):
    cfg = resolved(2, monkeypatch)
    assert (cfg.rollout.num_workers, cfg.eval.num_workers, cfg.eval.batch_size) == (2, 2, 50)
    cfg = resolved(1, monkeypatch, eval=EvalConfig(n_episodes=7))
    assert (cfg.rollout.num_workers, cfg.eval.num_workers, cfg.eval.batch_size) == (0, 0, 7)
    cfg = resolved(16, monkeypatch, rollout=RolloutConfig(num_envs=4), eval=EvalConfig(n_episodes=200))
    assert (cfg.rollout.num_workers, cfg.eval.num_workers, cfg.eval.batch_size) == (4, 16, 50)


def test_envs_that_hold_gigabytes_evaluate_ten_at_a_time():
    eval_cfg = EvalConfig()
    assert resolve_eval_batch_size(LiberoEnv(task="libero_spatial"), eval_cfg) == 10
    given = EvalConfig(batch_size=3)
    assert resolve_eval_batch_size(_default_env(), given) == 3


@pytest.mark.parametrize(
    "sections, message",
    [
        (lambda: {"eval": EvalConfig(batch_size=0)}, "--eval.batch_size must be >= 1, got 0"),
        (lambda: {"rollout": RolloutConfig(num_workers=-1)}, "--rollout.num_workers must be >= 0, got -1"),
        (lambda: {"rollout": RolloutConfig(num_envs=4, num_workers=5)}, "is more than the 4 envs"),
        (
            lambda: {"eval": EvalConfig(batch_size=2, num_workers=3)},
            "--eval.num_workers=3 is more than the 2 envs",
        ),
        (lambda: {"rollout": RolloutConfig(use_async_envs=True, num_workers=2)}, "exclude each other"),
    ],
)
def test_bad_counts_are_refused(monkeypatch, sections, message):
    with pytest.raises(ConfigError, match=message):
        resolved(2, monkeypatch, **sections())


def test_the_launcher_starts_env_workers_early_only_when_the_command_line_settles_it():
    assert TrainConfig().env.type == DEFAULT_ENV_TYPE
    assert early_worker_env_type([], cores=2) == "metaworld_state"
    assert early_worker_env_type(["--env.type=metaworld", "--env.task=push-v3"], cores=2) == "metaworld"
    assert early_worker_env_type(["--env.type", "metaworld"], cores=2) == "metaworld"
    for argv in (
        ["--help"],
        ["--env.type=libero"],  # LIBERO's first-use set-up must run first
        ["--env.type=pusht"],  # no env workers for it
        ["--config_path=run.yaml"],  # the file may name another env
        ["--rollout.use_async_envs=true"],
        ["--rollout.num_workers=0", "--eval.num_workers=0"],
    ):
        assert early_worker_env_type(argv, cores=2) is None, argv
    assert early_worker_env_type([], cores=1) is None
    assert early_worker_env_type(["--rollout.num_workers=0"], cores=2) == "metaworld_state"  # eval's still
