"""Scripted MetaWorld demos: the dataset loads back with the env's features and its actions replay."""

import numpy as np
import pytest
import torch
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_STATE

from lerobot_pirl.envs import MetaWorldStateEnv
from lerobot_pirl.rollout.scripted_demos import expert_action, metaworld_expert, record_metaworld_demos

STEPS_AFTER_SUCCESS = 3


def _episodes(dataset) -> list[dict[str, torch.Tensor]]:
    """Every episode's frames stacked per feature (a whole column read, no per-frame decoding)."""
    table = dataset.hf_dataset.with_format("torch")
    columns = ["episode_index", "episode_seed", OBS_STATE, OBS_ENV_STATE, ACTION, "next.success", "next.done"]
    stacked = {name: torch.stack(list(table[name])) for name in columns}
    episode_index = stacked["episode_index"].flatten()
    return [
        {name: values[episode_index == episode] for name, values in stacked.items()}
        for episode in range(dataset.meta.total_episodes)
    ]


def _replay(task: str, episode_seed: int, actions: torch.Tensor) -> tuple[np.ndarray, list[bool]]:
    env = MetaWorldStateEnv(task, terminate_on_success=False)
    try:
        observation, _ = env.reset(seed=episode_seed)
        states, successes = [observation["environment_state"]], []
        for action in actions.numpy():
            observation, _, _, _, info = env.step(action)
            states.append(observation["environment_state"])
            successes.append(info["is_success"])
    finally:
        env.close()
    return np.stack(states), successes


def test_noise_free_demos_load_back_and_replay_to_success(tmp_path):
    dataset = record_metaworld_demos(
        "push-v3", num_episodes=2, root=tmp_path / "push", seed=10, steps_after_success=STEPS_AFTER_SUCCESS
    )
    assert dataset.meta.total_episodes == 2
    assert dataset.fps == 80
    for name, shape in {OBS_STATE: (4,), OBS_ENV_STATE: (39,), ACTION: (4,)}.items():
        assert tuple(dataset.features[name]["shape"]) == shape
    assert OBS_IMAGE not in dataset.features
    assert dataset[0]["task"] == "Push the puck to a goal"

    expert, rng = metaworld_expert("push-v3"), np.random.default_rng(0)
    for episode in _episodes(dataset):
        seed = int(episode["episode_seed"][0])
        success = episode["next.success"].flatten()
        # Ends STEPS_AFTER_SUCCESS steps after the first success, and says so on its last frame only.
        first_success = int(success.nonzero()[0])
        assert len(success) == first_success + STEPS_AFTER_SUCCESS + 1
        assert episode["next.done"].flatten().tolist() == [False] * (len(success) - 1) + [True]
        # The recorded actions are exactly the expert's actions on the recorded states ...
        for state, action in zip(episode[OBS_ENV_STATE].numpy(), episode[ACTION].numpy(), strict=True):
            np.testing.assert_array_equal(action, expert_action(expert, state, 0.0, rng))
        # ... and replaying them from the recorded seed reproduces the states and the success.
        states, successes = _replay("push-v3", seed, episode[ACTION])
        np.testing.assert_array_equal(states[:-1], episode[OBS_ENV_STATE].numpy())
        np.testing.assert_array_equal(states[:-1, :4], episode[OBS_STATE].numpy())
        assert successes == success.tolist()
    assert sorted(int(episode["episode_seed"][0]) for episode in _episodes(dataset)) == [10, 11]


def test_noisy_demos_with_images_replay_exactly(tmp_path):
    dataset = record_metaworld_demos(
        "reach-v3", num_episodes=1, root=tmp_path / "reach", action_noise=0.3, seed=3, image_size=24
    )
    frame = dataset[0]
    assert tuple(frame[OBS_IMAGE].shape) == (3, 24, 24)
    assert frame[OBS_IMAGE].std() > 0.05  # a rendered scene, stored and decoded back
    (episode,) = _episodes(dataset)
    expert, rng = metaworld_expert("reach-v3"), np.random.default_rng(0)
    noise_free = np.stack(
        [expert_action(expert, state, 0.0, rng) for state in episode[OBS_ENV_STATE].numpy()]
    )
    assert np.abs(noise_free - episode[ACTION].numpy()).mean() > 0.05  # the noise was applied
    assert episode[ACTION].abs().max() <= 1.0
    states, successes = _replay("reach-v3", int(episode["episode_seed"][0]), episode[ACTION])
    np.testing.assert_array_equal(states[:-1], episode[OBS_ENV_STATE].numpy())
    assert any(successes)


def test_failed_episodes_are_dropped_unless_asked_for(tmp_path):
    # Five steps are far too few for push-v3: no episode can succeed.
    with pytest.raises(RuntimeError, match="succeeded in none of 2 attempts"):
        record_metaworld_demos("push-v3", 1, tmp_path / "dropped", episode_length=5, max_attempts=2)
    dataset = record_metaworld_demos("push-v3", 2, tmp_path / "kept", episode_length=5, keep_failed=True)
    assert dataset.meta.total_episodes == 2 and dataset.meta.total_frames == 10
    assert not any(episode["next.success"].any() for episode in _episodes(dataset))
