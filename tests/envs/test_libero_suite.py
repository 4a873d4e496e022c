"""A tiny pi0 over two tasks of one LIBERO suite (issue 14): one vector env whose sub-envs keep their
task, one PPO iteration on both, and the suite evaluator's per-task and overall rows.

Two envs (one per task), two 64 px cameras, 8-step episodes: the module takes ~1.5 min on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from lerobot.envs.utils import close_envs
from test_libero_training import EXECUTED, IMAGE_KEYS, libero_config, load, update_settings

from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.runtime.config import ConfigError, EvalConfig, RolloutConfig, TrainConfig
from lerobot_pirl.runtime.envs import (
    check_task_envs,
    env_task_names,
    env_task_set,
    episode_reset_hook,
    fixed_env_tasks,
)
from lerobot_pirl.runtime.factory import build_collector
from lerobot_pirl.runtime.suite_evaluation import evaluate_per_task
from lerobot_pirl.testing.collection import collect_samples

TWO_TASKS = libero_config(task_ids=[0, 1])


def test_tasks_are_dealt_to_envs_in_blocks_of_one_group():
    assert fixed_env_tasks(6, 3) == [0, 1, 2, 0, 1, 2]
    assert fixed_env_tasks(8, 2, group_size=2) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert env_task_names(TWO_TASKS) == ("libero_spatial_0", "libero_spatial_1")
    texts = env_task_set(TWO_TASKS).descriptions
    assert texts[0].startswith("pick up the black bowl between the plate") and texts[0] != texts[1]
    with pytest.raises(ConfigError, match="need at least 4 envs"):
        check_task_envs(TWO_TASKS, num_envs=2, group_size=2)
    assert env_task_set(libero_config()) is None  # one task: no mixture


def test_a_grpo_group_of_a_task_mixture_starts_from_its_seeds_init_state():
    class RecordingVectorEnv:
        def set_attr(self, name, values):
            self.set = (name, list(values))

    vec_env = RecordingVectorEnv()
    episode_reset_hook(TWO_TASKS, group_size=2)(vec_env, [7, 7, 8, 8, 57, 57])
    assert vec_env.set == ("init_state_id", [7, 7, 8, 8, 7, 7])  # groups on tasks 0, 1, 0; 50 states each


@pytest.fixture(scope="module")
def two_task_checkpoint(tmp_path_factory):
    """The tiny pi0 of test_libero_training, with a tokenizer that knows both tasks' words."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.utils.constants import ACTION, OBS_STATE

    from lerobot_pirl.testing.tiny_models import make_tiny_pi0, make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_pi0_two_tasks")
    inputs = {key: PolicyFeature(FeatureType.VISUAL, (3, 64, 64)) for key in IMAGE_KEYS}
    inputs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (8,))
    words = " ".join(env_task_set(TWO_TASKS).descriptions).split()
    tokenizer = make_tiny_tokenizer(extra_words=words)
    made = make_tiny_pi0(
        inputs,
        {ACTION: PolicyFeature(FeatureType.ACTION, (7,))},
        chunk_size=8,
        n_action_steps=EXECUTED,
        num_steps=4,
        tokenizer=tokenizer,
        tokenizer_max_length=24,
    )
    for part in made:
        part.save_pretrained(folder)
    return folder, tokenizer


def test_one_ppo_iteration_over_two_tasks_and_the_suite_evaluation(two_task_checkpoint):
    cfg = TrainConfig(
        env=TWO_TASKS,
        algorithm=PPOConfig(**update_settings()),
        rollout=RolloutConfig(num_envs=2, decisions_per_env=2, fast_render=True),
        eval=EvalConfig(n_episodes=1, batch_size=1, videos=0),
    )
    policy, preprocessor, postprocessor = load(two_task_checkpoint, cfg)
    texts = list(env_task_set(TWO_TASKS).descriptions)
    collector, envs = build_collector(
        cfg, policy, preprocessor, postprocessor, num_envs=2, device=torch.device("cpu")
    )
    try:
        assert collector.env_tasks.tolist() == [0, 1]
        assert collector.tasks == texts  # each env's own instruction reaches its policy input
        assert list(collector.vec_env.call("task_id")) == [0, 1]
        samples, batches, _ = collect_samples(cfg, collector)
    finally:
        close_envs(envs)
    batch = batches[0]
    assert batch.episode_task.tolist()[:2] == [0, 1]
    first_images = batch.observations[IMAGE_KEYS[0]][0].float() / 255  # (N, 3, H, W): two scenes
    assert (first_images[0] - first_images[1]).abs().max() > 0.1
    metrics = policy_update(policy, make_optimizer(policy, cfg.algorithm), samples, cfg.algorithm, "cpu")
    assert metrics["update/num_samples"] == len(samples) > 0

    suite = evaluate_per_task(cfg, policy, preprocessor, postprocessor, device=torch.device("cpu"))
    assert [(t.suite, t.task_id, t.task) for t in suite.tasks] == [
        ("libero_spatial", 0, texts[0]),
        ("libero_spatial", 1, texts[1]),
    ]
    rows = suite.table().splitlines()
    assert [row.split()[:2] for row in rows[1:]] == [
        ["libero_spatial", "0"],
        ["libero_spatial", "1"],
        ["libero_spatial", "all"],
        ["total", "all"],
    ]
    pooled = suite.as_eval_result()
    assert list(pooled.per_task) == ["libero_spatial_0", "libero_spatial_1"] and pooled.n_episodes == 2
    assert pooled.to_metrics()["eval/libero_spatial_1/episodes"] == 1.0
