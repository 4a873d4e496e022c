"""A tiny pi0 trained and evaluated on LeRobot's LIBERO env through the trainer's builders.

One PPO iteration and one GRPO iteration on libero_spatial task 0 (2 envs, two 64 px cameras, 8-d state,
7-d action, 8-step episodes), then the evaluator over 2 init states. The policy is a tiny random pi0 saved
as a LeRobot checkpoint with LIBERO's features and loaded by `runtime.trainer.build_rl_policy`, the path
`lerobot-pirl-train --policy.path=...` takes.

What is checked against the simulator's own state: PPO's continuous resets visit disjoint init states
(env i: i, then i + n_envs), GRPO group members start from bit-identical observations on the group's init
state, and evaluation episode i starts from init state i however the envs were used before.

Each env is built once (first reset ~10-15 s on CPU); the module takes ~1.5 min on 2 cores.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import LiberoEnv
from lerobot.envs.utils import close_envs
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.runtime.config import ConfigError, EvalConfig, RolloutConfig, TrainConfig
from lerobot_pirl.runtime.envs import (
    env_policy_features,
    evaluation_init_state_ids,
    evaluation_reset_hook,
    group_init_state_ids,
    libero_single_task,
    single_task_configs,
)
from lerobot_pirl.runtime.evaluation import evaluate
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy
from lerobot_pirl.testing.collection import collect_samples
from lerobot_pirl.testing.tiny_models import (
    make_tiny_pi0,
    make_tiny_tokenizer,
    tiny_paligemma_architecture,
)

SUITE, TASK_ID = "libero_spatial", 0
TASK_TEXT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
IMAGE_SIZE = 64
EPISODE_LENGTH = 8  # steps: two decisions of C = 4
NUM_ENVS = 2
NUM_STEPS, CHUNK, EXECUTED = 4, 8, 4  # K, H, C
IMAGE_KEYS = ("observation.images.image", "observation.images.image2")  # LeRobot's LIBERO camera mapping
GRPO_SEED = 7  # first group seed: the group starts from init state 7 % 50


def libero_config(**overrides) -> LiberoEnv:
    settings = dict(
        task=SUITE,
        task_ids=[TASK_ID],
        observation_height=IMAGE_SIZE,
        observation_width=IMAGE_SIZE,
        episode_length=EPISODE_LENGTH,
        hard_reset=False,
    )
    return LiberoEnv(**{**settings, **overrides})


def train_config(algorithm) -> TrainConfig:
    return TrainConfig(
        env=libero_config(),
        algorithm=algorithm,
        rollout=RolloutConfig(num_envs=NUM_ENVS, decisions_per_env=2, episodes_per_env=1, fast_render=True),
        eval=EvalConfig(n_episodes=NUM_ENVS, batch_size=NUM_ENVS, videos=0),
    )


def update_settings() -> dict:
    # One epoch, one minibatch; a large lr and no weight decay so that moved parameters mean gradients.
    return dict(update_epochs=1, minibatch_size=8, micro_batch_size=4, actor_lr=1e-3, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# Without the simulator
# ---------------------------------------------------------------------------------------------
def test_policy_features_are_those_after_liberos_env_processor():
    from lerobot.processor.env_processor import LiberoProcessorStep

    features = env_policy_features(libero_config())
    assert features[OBS_STATE] == PolicyFeature(FeatureType.STATE, (8,))  # eef pos, axis-angle, gripper
    assert not any(key.startswith(f"{OBS_STATE}.") for key in features)
    for key in IMAGE_KEYS:
        assert features[key] == PolicyFeature(FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE))
    assert features[ACTION].shape == (7,)
    # Parity with LeRobot's own step on the state features.
    state = {OBS_STATE + ".eef_pos": PolicyFeature(FeatureType.STATE, (3,))}
    assert LiberoProcessorStep().transform_features({FeatureType.STATE: state})[FeatureType.STATE] == {
        OBS_STATE: features[OBS_STATE]
    }


def test_init_state_bookkeeping():
    # GRPO: one init state per group, from the group's seed; consecutive seeds -> disjoint, cycling.
    assert group_init_state_ids([7, 7, 8, 8, 49, 49, 50, 50], 2, 50) == [7, 7, 8, 8, 49, 49, 0, 0]
    with pytest.raises(ValueError, match="share one seed"):
        group_init_state_ids([7, 8], 2, 50)
    # Evaluation: episode i (seed first + i) -> init state i, wrapping after the last one.
    assert evaluation_init_state_ids([100, 101, 149, 150, 151], 100, 50) == [0, 1, 49, 0, 1]
    # The trainer's rule: one task per run.
    assert libero_single_task(libero_config()) == (SUITE, TASK_ID)
    for several in (libero_config(task_ids=None), libero_config(task="libero_spatial,libero_goal")):
        with pytest.raises(ConfigError, match="one task per run"):
            libero_single_task(several)


def test_suite_evaluation_splits_the_config_into_single_tasks():
    configs = single_task_configs(libero_config(task="libero_spatial,libero_10", task_ids=[3, 1]))
    assert [(suite, task_id) for suite, task_id, _ in configs] == [
        ("libero_spatial", 1),
        ("libero_spatial", 3),
        ("libero_10", 1),
        ("libero_10", 3),
    ]
    for suite, task_id, cfg in configs:
        assert (cfg.task, cfg.task_ids, cfg.observation_height) == (suite, [task_id], IMAGE_SIZE)
    assert len(single_task_configs(libero_config(task_ids=None))) == 10  # a whole suite by default
    with pytest.raises(ConfigError, match="out of range"):
        single_task_configs(libero_config(task_ids=[10]))


# ---------------------------------------------------------------------------------------------
# Through the simulator
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pi0 with LIBERO's features saved as a LeRobot checkpoint, and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_pi0_libero")
    inputs = {key: PolicyFeature(FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE)) for key in IMAGE_KEYS}
    inputs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (8,))
    outputs = {ACTION: PolicyFeature(FeatureType.ACTION, (7,))}
    tokenizer = make_tiny_tokenizer(extra_words=TASK_TEXT.split())
    made = make_tiny_pi0(
        inputs,
        outputs,
        chunk_size=CHUNK,
        n_action_steps=EXECUTED,
        num_steps=NUM_STEPS,
        tokenizer=tokenizer,
        tokenizer_max_length=24,
    )
    for part in made:
        part.save_pretrained(folder)
    return folder, tokenizer


def load(checkpoint, cfg: TrainConfig):
    folder, tokenizer = checkpoint
    with tiny_paligemma_architecture():
        return build_rl_policy(cfg, folder, torch.device("cpu"), tokenizer=tokenizer)


@contextlib.contextmanager
def success_at_step(collector, env_index: int, step: int):
    """Script sub-env `env_index`'s success check to fire once, at the `step`-th step of its episode.

    A random tiny pi0 never solves the task in 8 steps; without any success every return is 0, so PPO's
    advantages and GRPO's groups would all be zero and the update would have nothing to learn from.
    LeRobot's own `LiberoEnv.step` still runs (the simulator steps and renders); only its success flag
    is forced. Undone on exit.
    """
    rollout_env = collector.vec_env.envs[env_index].env  # FreezeAfterEpisodeEnd(LiberoRolloutEnv(...))
    libero_env = rollout_env.env

    fired = False

    def step_that_succeeds(action):
        nonlocal fired
        observation, reward, terminated, truncated, info = type(libero_env).step(libero_env, action)
        if not fired and rollout_env.elapsed_steps + 1 >= step:  # LiberoRolloutEnv counts after the step
            info["is_success"], terminated, fired = True, True, True
        return observation, reward, terminated, truncated, info

    libero_env.step = step_that_succeeds
    try:
        yield
    finally:
        del libero_env.step  # back to LeRobot's own step


def parameters(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters()}


def moved(policy, before) -> set[str]:
    return {name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_one_ppo_iteration_cycles_disjoint_init_states(checkpoint):
    cfg = train_config(PPOConfig(**update_settings()))
    policy, preprocessor, postprocessor = load(checkpoint, cfg)
    collector, envs = build_collector(
        cfg, policy, preprocessor, postprocessor, num_envs=NUM_ENVS, device=torch.device("cpu")
    )
    try:
        assert collector.tasks == [TASK_TEXT] * NUM_ENVS
        with success_at_step(collector, env_index=1, step=4):
            samples, batches, _ = collect_samples(cfg, collector)
        init_state_ids = collector.vec_env.get_attr("init_state_id")
    finally:
        close_envs(envs)
    batch = batches[0]

    # Two decisions of C = 4 steps per env; LIBERO's cameras and 8-d state reached the policy batch.
    # Env 1 succeeded at step 4 (decision 0) and sat out decision 1 while it was reset: 3 samples.
    assert len(samples) == 3 and batch.env_steps == (2 + 1) * EXECUTED
    assert batch.mask.tolist() == [[True, True], [True, False]]
    for key in IMAGE_KEYS:
        assert batch.observations[key].shape == (2, NUM_ENVS, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.observations[key].dtype == torch.uint8  # camera images stored compact
    assert batch.observations[OBS_STATE].shape == (2, NUM_ENVS, 8)
    # Env 0 was truncated at the 8-step limit (LeRobot's env never truncates by itself); env 1 succeeded
    # at step 4.
    assert batch.truncated.tolist() == [[False, False], [True, False]]
    assert batch.terminated.tolist() == [[False, True], [False, False]]
    # Episodes in order of start: env 0, env 1, env 1's second (reset after decision 1).
    assert batch.episode_lengths.tolist() == [EPISODE_LENGTH, 4, 0]
    assert batch.episode_done.tolist() == [True, True, False]
    assert batch.episode_returns.tolist() == [0.0, 1.0, 0.0]
    # Env i loaded init state i at the first reset, then LeRobot's stride n_envs advanced its id: env 1
    # has loaded i + n_envs since (concurrent envs never share one); env 0's reset is still pending.
    assert init_state_ids == (0 + NUM_ENVS, 1 + 2 * NUM_ENVS)
    first_images = batch.observations[IMAGE_KEYS[0]][0].float() / 255  # (N, 3, H, W)
    assert (first_images[0] - first_images[1]).abs().max() > 0.1  # two different scenes

    before = parameters(policy)
    metrics = policy_update(policy, make_optimizer(policy, cfg.algorithm), samples, cfg.algorithm, "cpu")
    assert abs(metrics["policy/ratio_max"] - 1.0) <= 1e-5  # first minibatch: ratio 1
    assert metrics["update/num_samples"] == 3
    changed = moved(policy, before)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    expert = {name for name in trainable if name.startswith("adapter.")}
    assert f"value_head.{len(policy.value_head) - 1}.weight" in changed  # the zero-initialised output layer
    assert changed <= trainable and len(changed & expert) >= 0.8 * len(expert)


@pytest.fixture(scope="module")
def grpo_run(checkpoint):
    """One GRPO iteration (one group of 2), then the collector is kept for the evaluation tests.

    GRPO drops groups whose members all score the same: member 1 "succeeds" at its 4th step
    (`success_at_step`), so that the group's two returns differ and the update has samples.
    """
    cfg = train_config(GRPOConfig(group_size=NUM_ENVS, **update_settings()))
    policy, preprocessor, postprocessor = load(checkpoint, cfg)
    collector, envs = build_collector(
        cfg,
        policy,
        preprocessor,
        postprocessor,
        num_envs=NUM_ENVS,
        device=torch.device("cpu"),
        seed=GRPO_SEED,
    )
    with success_at_step(collector, env_index=1, step=4):
        samples, batches, extras = collect_samples(cfg, collector)
    init_state_ids = collector.vec_env.get_attr("init_state_id")
    before = parameters(policy)
    metrics = policy_update(policy, make_optimizer(policy, cfg.algorithm), samples, cfg.algorithm, "cpu")
    yield {
        "cfg": cfg,
        "collector": collector,
        "policy": policy,
        "processors": (preprocessor, postprocessor),
        "batch": batches[0],
        "extras": extras,
        "init_state_ids": init_state_ids,
        "metrics": metrics,
        "moved": moved(policy, before),
    }
    close_envs(envs)


def test_one_grpo_iteration_starts_group_members_identically(grpo_run):
    batch = grpo_run["batch"]
    # Same init state and seed for both members: bit-identical first observations, cameras and state.
    for key in (*IMAGE_KEYS, OBS_STATE):
        first = batch.observations[key][0]  # (N, ...)
        assert torch.equal(first[0], first[1]), key
    assert (batch.observations[IMAGE_KEYS[0]][0].float() / 255).std() > 0.05  # a scene, not a blank frame
    # The group's init state came from its seed (7 % 50), then LeRobot advanced both ids by n_envs.
    assert grpo_run["init_state_ids"] == (GRPO_SEED + NUM_ENVS,) * NUM_ENVS
    # Member 0 ran into the time limit, member 1 "succeeded" at step 4: returns 0 and 1.
    assert batch.episode_returns.tolist() == [0.0, 1.0]
    assert batch.episode_lengths.tolist() == [EPISODE_LENGTH, 4]
    assert batch.truncated[-1, 0] and batch.terminated[0, 1]
    assert batch.mask.tolist() == [[True, True], [True, False]]
    # The group was kept and trained on: 3 decisions, ratio 1 on the first minibatch.
    assert grpo_run["extras"]["grpo/kept_group_fraction"] == 1.0
    metrics = grpo_run["metrics"]
    assert metrics["update/num_samples"] == 3 and abs(metrics["policy/ratio_max"] - 1.0) <= 1e-5
    expert = {n for n, p in grpo_run["policy"].named_parameters() if p.requires_grad}
    assert grpo_run["policy"].value_head is None and len(grpo_run["moved"] & expert) >= 0.8 * len(expert)


def spy_on(hook, calls: list):
    """Wrap an evaluation reset hook to record (seeds, init_state_id of each sub-env) at every reset."""

    def recording_hook(vec_env, seeds):
        hook(vec_env, seeds)
        calls.append((list(seeds), tuple(vec_env.get_attr("init_state_id"))))

    return recording_hook


def test_evaluation_episode_i_starts_from_init_state_i(grpo_run, monkeypatch):
    """The trainer reuses its eval envs for every evaluation; wherever their init-state ids stand (here
    at 9 after the GRPO iteration, where LeRobot's own order would continue), episode i starts from init
    state i, so the SFT baseline and every checkpoint are evaluated on the same scenes."""
    from lerobot_pirl.runtime import suite_evaluation

    cfg, collector = grpo_run["cfg"], grpo_run["collector"]
    seed = 100
    results, calls = [], []
    for _ in range(2):  # e.g. the SFT evaluation, then a later checkpoint's
        hook = spy_on(evaluation_reset_hook(cfg.env, seed), calls)
        results.append(evaluate(collector, NUM_ENVS, seed, before_reset=hook))
    assert calls == [([seed, seed + 1], (0, 1))] * 2
    assert collector.vec_env.get_attr("init_state_id") == (0 + NUM_ENVS, 1 + NUM_ENVS)  # they were loaded
    assert results[0].successes == results[1].successes
    assert results[0].mean_length == results[1].mean_length == EPISODE_LENGTH  # deterministic ODE
    assert results[0].n_episodes == NUM_ENVS

    # The suite evaluator (lerobot-pirl-eval) on fresh envs: the same protocol, the same episodes.
    suite_calls = []
    real_hook = suite_evaluation.evaluation_reset_hook
    monkeypatch.setattr(
        suite_evaluation,
        "evaluation_reset_hook",
        lambda env_cfg, first_seed: spy_on(real_hook(env_cfg, first_seed), suite_calls),
    )
    suite = suite_evaluation.evaluate_per_task(
        cfg,
        grpo_run["policy"],
        *grpo_run["processors"],
        device=torch.device("cpu"),
        eval_cfg=EvalConfig(n_episodes=NUM_ENVS, batch_size=NUM_ENVS, seed=seed, videos=0),
    )
    assert suite_calls == [([seed, seed + 1], (0, 1))]
    assert [(t.suite, t.task_id, t.task) for t in suite.tasks] == [(SUITE, TASK_ID, TASK_TEXT)]
    overall = suite.overall()
    assert overall.successes == results[0].successes and overall.mean_length == results[0].mean_length
    assert suite.per_suite()[SUITE].n_episodes == NUM_ENVS
    assert np.isfinite(overall.ci_low) and overall.ci_low <= overall.success_rate <= overall.ci_high


def grpo_round_and_evaluation(cfg, policy, processors, num_workers: int) -> dict:
    """A GRPO collection (one group, init state from its seed) and one evaluation round (episode i from
    init state i), recording every evaluation reset; the policy's noise drawn here from fixed seeds."""
    collector, envs = build_collector(
        cfg,
        policy,
        *processors,
        num_envs=NUM_ENVS,
        device=torch.device("cpu"),
        seed=GRPO_SEED,
        num_workers=num_workers,
    )
    try:
        torch.manual_seed(0)
        _, batches, _ = collect_samples(cfg, collector)
        group_ids = collector.vec_env.get_attr("init_state_id")
        calls = []
        torch.manual_seed(1)
        result = evaluate(
            collector, NUM_ENVS, 100, before_reset=spy_on(evaluation_reset_hook(cfg.env, 100), calls)
        )
    finally:
        close_envs(envs)
    return {"batch": batches[0], "group_ids": group_ids, "calls": calls, "result": result}


def test_env_workers_keep_grpo_groups_and_the_evaluation_init_state_order(checkpoint):
    cfg = train_config(GRPOConfig(group_size=NUM_ENVS, **update_settings()))
    policy, preprocessor, postprocessor = load(checkpoint, cfg)
    here = grpo_round_and_evaluation(cfg, policy, (preprocessor, postprocessor), num_workers=0)
    workers = grpo_round_and_evaluation(cfg, policy, (preprocessor, postprocessor), num_workers=2)
    for key, value in here["batch"].observations.items():  # bit-identical cameras and state
        assert torch.equal(value, workers["batch"].observations[key]), key
    first = workers["batch"].observations[IMAGE_KEYS[0]][0]
    assert torch.equal(first[0], first[1])  # both group members start from the group's scene
    for name in ("rewards", "mask", "terminated", "truncated", "logprobs"):
        assert torch.equal(getattr(here["batch"], name), getattr(workers["batch"], name)), name
    assert workers["group_ids"] == here["group_ids"] == (GRPO_SEED + NUM_ENVS,) * NUM_ENVS
    assert workers["calls"] == here["calls"] == [([100, 101], (0, 1))]
    assert workers["result"].successes == here["result"].successes
    assert workers["result"].mean_length == here["result"].mean_length
