"""Camera names between a pi0 checkpoint and LeRobot's LIBERO env, through `lerobot-pirl-train` (issue 15).

The checkpoint reads `observation.images.image` + `observation.images.wrist_image` (a common LIBERO naming);
LeRobot's LIBERO env renders `image` + `image2`. LeRobot's pi0 would feed the missing wrist camera as a blank
image with mask False and train on, so the run must stop before any env starts, unless `--rename_map` maps
the env's cameras onto the policy's. The output must then read the env's names, so that `lerobot-eval`
runs it without a flag, and it must carry the C the run executed.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_pirl.testing.tiny_models import make_tiny_pi0, make_tiny_tokenizer, tiny_paligemma_architecture

TASK_TEXT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
IMAGE_SIZE = 64
POLICY_CAMERAS = ("observation.images.image", "observation.images.wrist_image")
ENV_CAMERAS = ("observation.images.image", "observation.images.image2")  # LeRobot's LIBERO mapping
WRIST_RENAME = '--rename_map={"observation.images.image2": "observation.images.wrist_image"}'
SAVED_C = 2  # the policy's own n_action_steps is 4; the run executes 2 and must save 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pi0 checkpoint with a wrist camera named `wrist_image`, and its tokenizer in a folder."""
    folder = tmp_path_factory.mktemp("tiny_pi0_wrist")
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    inputs = {key: PolicyFeature(FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE)) for key in POLICY_CAMERAS}
    inputs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (8,))
    outputs = {ACTION: PolicyFeature(FeatureType.ACTION, (7,))}
    tokenizer = make_tiny_tokenizer(extra_words=TASK_TEXT.split())
    tokenizer.save_pretrained(tokenizer_dir)
    with tiny_paligemma_architecture():
        made = make_tiny_pi0(
            inputs,
            outputs,
            chunk_size=8,
            n_action_steps=4,
            num_steps=2,
            tokenizer=tokenizer,
            tokenizer_max_length=24,
        )
    for part in made:
        part.save_pretrained(folder)
    return folder, tokenizer_dir


def libero_run(checkpoint, out, *extra) -> list[str]:
    folder, tokenizer_dir = checkpoint
    return [
        f"--policy.path={folder}",
        f"--policy_options.tokenizer={tokenizer_dir}",
        "--env.type=libero",
        "--env.task=libero_spatial",
        "--env.task_ids=[0]",
        f"--env.observation_height={IMAGE_SIZE}",
        f"--env.observation_width={IMAGE_SIZE}",
        "--env.episode_length=4",
        "--env.hard_reset=false",
        "--rollout.num_envs=2",
        "--rollout.decisions_per_env=2",
        "--rollout.num_workers=0",
        "--rollout.fast_render=true",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.num_workers=0",
        "--eval.videos=0",
        "--algorithm.update_epochs=1",
        "--algorithm.minibatch_size=4",
        "--algorithm.micro_batch_size=4",
        "--iterations=1",
        f"--output_dir={out}",
        *extra,
    ]


def run_main(monkeypatch, args: list[str]) -> int:
    from lerobot_pirl.scripts.train import cli

    monkeypatch.setattr(sys, "argv", ["lerobot-pirl-train", *args])
    with tiny_paligemma_architecture(), pytest.raises(SystemExit) as exit_info:
        cli()
    return exit_info.value.code


def test_a_camera_the_env_does_not_render_stops_the_run_with_both_key_lists(
    monkeypatch, capsys, tmp_path, checkpoint
):
    from lerobot_pirl.runtime import factory

    made_envs = []
    monkeypatch.setattr(factory, "make_rollout_envs", lambda *a, **k: made_envs.append(1))
    out = tmp_path / "run"
    assert run_main(monkeypatch, libero_run(checkpoint, out)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"the policy's cameras are {list(POLICY_CAMERAS)}, the env renders {list(ENV_CAMERAS)}" in line
    assert f"['{POLICY_CAMERAS[1]}'] would be blank" in line
    assert WRIST_RENAME.removeprefix("--rename_map=") in line  # the rename that fixes it
    assert "--policy_options.pad_missing_cameras=true" in line
    assert not made_envs and not out.exists()  # refused before any env or output folder


def test_padding_a_missing_camera_is_allowed_when_asked_for(caplog):
    from lerobot.envs.configs import LiberoEnv

    from lerobot_pirl.runtime.config import ConfigError
    from lerobot_pirl.runtime.factory import check_policy_matches_env

    class PolicyConfig:  # the two fields the check reads
        input_features = {
            **{key: PolicyFeature(FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE)) for key in POLICY_CAMERAS},
            "observation.images.empty_camera_0": PolicyFeature(
                FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE)
            ),
            OBS_STATE: PolicyFeature(FeatureType.STATE, (8,)),
        }
        output_features = {ACTION: PolicyFeature(FeatureType.ACTION, (7,))}

    env = LiberoEnv(task="libero_spatial", task_ids=[0])
    with pytest.raises(ConfigError, match="would be blank"):
        check_policy_matches_env(PolicyConfig, env)
    check_policy_matches_env(PolicyConfig, env, pad_missing_cameras=True)
    # pi0's empty_cameras are padded by design and never named as missing.
    assert "the env renders no observation.images.wrist_image: the policy sees blank images" in caplog.text


def test_a_rename_onto_a_key_the_policy_does_not_read_is_one_line(monkeypatch, capsys, tmp_path, checkpoint):
    bad = '--rename_map={"observation.images.image2": "observation.images.wrist"}'
    assert run_main(monkeypatch, libero_run(checkpoint, tmp_path / "run", bad)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert (
        len(lines) == 1
        and "maps onto ['observation.images.wrist'], which the policy does not read" in lines[0]
    )


def test_with_rename_map_both_cameras_reach_the_model_and_the_output_reads_the_env_names(
    monkeypatch, tmp_path, checkpoint
):
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    camera_masks = []
    preprocess_images = PI0Policy._preprocess_images

    def recording(self, batch):
        images, masks = preprocess_images(self, batch)
        camera_masks.append(torch.stack(masks, 1))  # (B, cameras)
        return images, masks

    monkeypatch.setattr(PI0Policy, "_preprocess_images", recording)
    out = tmp_path / "run"
    args = libero_run(checkpoint, out, WRIST_RENAME, f"--rollout.n_action_steps={SAVED_C}")
    assert run_main(monkeypatch, args) == 0

    # Rollout, update and evaluation all saw two real cameras.
    assert camera_masks and all(masks.shape[1] == 2 and bool(masks.all()) for masks in camera_masks)
    # The update read the prefix the rollout kept: no prefix pass of its own.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["update/num_samples"] > 0 and rows[-1]["update/prefix_passes"] == 0
    saved = out / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((saved / "config.json").read_text())
    cameras = [key for key, feature in config["input_features"].items() if feature["type"] == "VISUAL"]
    assert cameras == list(ENV_CAMERAS)  # in the policy's order: image2 is its wrist camera
    assert config["n_action_steps"] == SAVED_C and config["num_inference_steps"] == 2
    preprocessor = json.loads((saved / "policy_preprocessor.json").read_text())
    steps = {step.get("registry_name"): step.get("config", {}) for step in preprocessor["steps"]}
    assert steps["rename_observations_processor"]["rename_map"] == {}  # nothing left to rename
    assert set(steps["normalizer_processor"]["features"]) == {*ENV_CAMERAS, OBS_STATE, ACTION}
    assert steps["tokenizer_processor"]["tokenizer_name"] == str(checkpoint[1].absolute())
