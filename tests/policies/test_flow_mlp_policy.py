"""The ``flow_mlp`` LeRobot policy type: flow-matching SFT, exact Euler sampling, LeRobot plumbing.

Shape legend: B batch, S state dim, A action dim, H chunk_size, C n_action_steps, K denoising steps,
F feature_dim, W hidden_dim.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.common.flow_matching import sample_noise, sample_time_beta
from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline

from lerobot_pirl.policies.flow_mlp import FlowMLPConfig, FlowMLPPolicy, make_flow_mlp_pre_post_processors

STATE_DIM = 3  # S
ACTION_DIM = 2  # A
CHUNK_SIZE = 4  # H


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The CI box has 2 cores shared by several jobs: two intra-op threads made SFT ~14x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_config(**overrides) -> FlowMLPConfig:
    features = {
        "input_features": {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        "output_features": {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    }
    small = dict(chunk_size=CHUNK_SIZE, n_action_steps=2, hidden_dim=128, feature_dim=64, num_layers=2)
    return FlowMLPConfig(**{"device": "cpu", "push_to_hub": False, **features, **small, **overrides})


def linear_chunk_batch(mixing: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict:
    """States ~ N(0, I); the action chunk is a fixed linear map of the state: a_h = M_h s."""
    state = torch.randn(batch_size, STATE_DIM, generator=generator)  # (B, S)
    action = torch.einsum("has,bs->bha", mixing, state)  # (B, H, A)
    return {"observation.state": state, "action": action}


def test_sft_loss_falls_and_ode_samples_reproduce_a_linear_target():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(CHUNK_SIZE, ACTION_DIM, STATE_DIM, generator=generator) / STATE_DIM**0.5  # (H, A, S)
    policy = FlowMLPPolicy(make_config())
    optimizer_config = policy.config.get_optimizer_preset()
    optimizer = optimizer_config.build(policy.get_optim_params())

    test_batch = linear_chunk_batch(mixing, 512, torch.Generator().manual_seed(2))
    policy.eval()
    untrained_mse = (policy.predict_action_chunk(test_batch) - test_batch["action"]).pow(2).mean().item()

    policy.train()
    losses = []
    for _ in range(1000):
        loss, info = policy.forward(linear_chunk_batch(mixing, 128, generator))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), optimizer_config.grad_clip_norm)
        optimizer.step()
        losses.append(loss.item())
    assert info["loss"] == pytest.approx(losses[-1])

    policy.eval()
    mse = (policy.predict_action_chunk(test_batch) - test_batch["action"]).pow(2).mean().item()
    start, end = np.mean(losses[:20]), np.mean(losses[-50:])
    # Measured (seeds 0-3, 1000 steps): loss 1.9 -> 0.03, sample MSE 0.0008-0.0025 (action variance 1.3).
    assert end < 0.1 * start, (start, end)
    assert mse < 0.02, (mse, untrained_mse)
    assert untrained_mse > 0.5


def test_loss_is_the_flow_matching_mse_over_unpadded_steps_only():
    torch.manual_seed(0)
    policy = FlowMLPPolicy(make_config())
    batch = linear_chunk_batch(
        torch.randn(CHUNK_SIZE, ACTION_DIM, STATE_DIM), 3, torch.Generator().manual_seed(0)
    )
    is_pad = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True]])  # (B, H)
    batch["action_is_pad"] = is_pad

    torch.manual_seed(7)
    loss, _ = policy.forward(batch)
    torch.manual_seed(7)
    per_sample, _ = policy.forward(batch, reduction="none")

    # Replay the same draws: noise first, then t ~ Beta(1.5, 1) * 0.999 + 0.001 (pi0's order).
    torch.manual_seed(7)
    noise = sample_noise(batch["action"].shape, "cpu")  # (B, H, A)
    t = sample_time_beta(3, "cpu", alpha=1.5, beta=1.0, scale=0.999, offset=0.001)  # (B,)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * batch["action"]  # (B, H, A)
    with torch.no_grad():
        v, _ = policy.model.velocity(policy.model.encode_observation(batch), x_t, t)
    squared_error = (v - (noise - batch["action"])).pow(2)  # (B, H, A)
    valid = ~is_pad
    torch.testing.assert_close(loss.detach(), squared_error[valid].mean())
    expected_per_sample = torch.stack([squared_error[i][valid[i]].mean() for i in range(3)])  # (B,)
    torch.testing.assert_close(per_sample.detach(), expected_per_sample)


def test_predict_action_chunk_is_exactly_euler_over_model_velocity():
    torch.manual_seed(0)
    policy = FlowMLPPolicy(make_config(num_inference_steps=5)).eval()
    batch = {"observation.state": torch.randn(6, STATE_DIM)}  # B = 6
    noise = torch.randn(6, CHUNK_SIZE, ACTION_DIM)  # (B, H, A)
    num_steps = policy.config.num_inference_steps  # K

    with torch.no_grad():
        chunk = policy.predict_action_chunk(batch, noise=noise)
        features = policy.model.encode_observation(batch)  # (B, F)
        # LeRobot's arithmetic (euler_integrate): t_k = 1 + k * dt, x <- x + dt * v, dt = -1/K.
        dt = -1.0 / num_steps
        x = noise
        # DESIGN.md §3 grid t_k = 1 - k/K with x <- x - v/K: equal up to float rounding.
        x_design = noise
        for k in range(num_steps):
            t = torch.full((6,), 1.0 + k * dt)  # (B,)
            x = x + dt * policy.model.velocity(features, x, t)[0]
            t_design = torch.full((6,), 1.0 - k / num_steps)  # (B,)
            x_design = x_design - policy.model.velocity(features, x_design, t_design)[0] / num_steps

    assert chunk.shape == (6, CHUNK_SIZE, ACTION_DIM) and chunk.dtype == torch.float32
    assert (chunk - x).abs().max().item() <= 1e-6
    assert (chunk - x_design).abs().max().item() <= 1e-6
    # Different noise, different chunk: the sampler really starts from the given noise.
    assert not torch.allclose(policy.predict_action_chunk(batch, noise=noise + 1.0), chunk)


def test_model_api_sizes_and_gradients_for_the_rl_layer():
    torch.manual_seed(0)
    # Two visual features: the CNN encodes "observation.image" (the preferred key), not the first one.
    config = make_config(
        input_features={
            "observation.images.wrist": PolicyFeature(FeatureType.VISUAL, (3, 16, 16)),
            "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 24, 24)),
            "observation.environment_state": PolicyFeature(FeatureType.ENV, (5,)),
        }
    )
    policy = FlowMLPPolicy(config)
    model = policy.model
    assert model.image_key == "observation.image"
    assert (model.feature_dim, model.hidden_dim) == (64, 128)  # (F, W)
    batch = {
        "observation.image": torch.rand(3, 3, 24, 24),
        "observation.environment_state": torch.randn(3, 5),
    }

    features = model.encode_observation(batch)  # (B, F)
    v, hidden = model.velocity(features, torch.randn(3, CHUNK_SIZE, ACTION_DIM), torch.rand(3))
    assert features.shape == (3, 64) and features.dtype == torch.float32
    assert v.shape == (3, CHUNK_SIZE, ACTION_DIM) and v.dtype == torch.float32
    assert hidden.shape == (3, CHUNK_SIZE, 128)
    # One hidden vector per chunk (the MLP sees the flat chunk), shared by its H actions.
    assert torch.equal(hidden[:, 0], hidden[:, -1])

    (v.sum() + hidden.sum()).backward()
    conv_grad = model.image_encoder.convs[0].weight.grad
    assert conv_grad is not None and conv_grad.abs().sum() > 0


def test_normalised_state_is_clamped_so_an_unseen_state_cannot_blow_up_the_features():
    torch.manual_seed(0)
    model = FlowMLPPolicy(make_config(observation_clip=5.0)).model
    state = torch.tensor([[300.0, -0.5, -300.0]])  # (B, S): a dim whose demo std was ~0, seen off-demo
    clipped = torch.tensor([[5.0, -0.5, -5.0]])
    assert torch.equal(
        model.encode_observation({"observation.state": state}),
        model.encode_observation({"observation.state": clipped}),
    )
    unclamped = FlowMLPPolicy(make_config(observation_clip=None)).model
    unclamped.load_state_dict(model.state_dict())
    assert not torch.allclose(
        unclamped.encode_observation({"observation.state": state}),
        model.encode_observation({"observation.state": state}),
    )


def test_select_action_executes_the_first_n_action_steps_then_resamples():
    torch.manual_seed(0)
    policy = FlowMLPPolicy(make_config(n_action_steps=3))
    batch = {"observation.state": torch.randn(2, STATE_DIM)}
    noise = torch.randn(2, CHUNK_SIZE, ACTION_DIM)
    chunk = policy.predict_action_chunk(batch, noise=noise)  # (B, H, A)

    executed = [policy.select_action(batch, noise=noise) for _ in range(3)]  # C actions of (B, A)
    assert torch.equal(torch.stack(executed, dim=1), chunk[:, :3])
    assert len(policy._action_queue) == 0
    policy.select_action(batch, noise=noise)
    assert len(policy._action_queue) == 2  # a new chunk was sampled
    policy.reset()
    assert len(policy._action_queue) == 0


def test_save_and_load_reproduce_actions_and_processors_round_trip(tmp_path):
    torch.manual_seed(0)
    config = make_config()
    policy = FlowMLPPolicy(config).eval()
    stats = {
        "observation.state": {"mean": torch.tensor([1.0, -2.0, 0.5]), "std": torch.tensor([2.0, 0.5, 1.0])},
        "action": {"mean": torch.tensor([0.3, -0.1]), "std": torch.tensor([4.0, 0.25])},
    }
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)

    raw_state = torch.tensor([3.0, -1.0, 0.5])  # (S,): one env observation, no batch dim
    batch = preprocessor({"observation.state": raw_state})
    expected_state = ((raw_state - stats["observation.state"]["mean"]) / stats["observation.state"]["std"])[
        None
    ]
    torch.testing.assert_close(batch["observation.state"], expected_state)  # (1, S), normalised
    noise = torch.randn(1, CHUNK_SIZE, ACTION_DIM)
    chunk = policy.predict_action_chunk(batch, noise=noise)  # (1, H, A), normalised
    action = postprocessor(chunk[:, 0])  # (1, A)
    torch.testing.assert_close(action, chunk[:, 0] * stats["action"]["std"] + stats["action"]["mean"])

    policy.save_pretrained(tmp_path)
    preprocessor.save_pretrained(tmp_path)
    postprocessor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "flow_mlp"

    loaded = FlowMLPPolicy.from_pretrained(tmp_path)
    assert isinstance(loaded.config, FlowMLPConfig) and loaded.config.chunk_size == CHUNK_SIZE
    assert torch.equal(loaded.predict_action_chunk(batch, noise=noise), chunk)

    # Through LeRobot's own factory (the path lerobot-eval takes) and the pipeline class directly.
    loaded_pre, loaded_post = make_pre_post_processors(loaded.config, pretrained_path=str(tmp_path))
    torch.testing.assert_close(
        loaded_pre({"observation.state": raw_state})["observation.state"], expected_state
    )
    torch.testing.assert_close(loaded_post(chunk[:, 0]), action)
    direct_pre = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="policy_preprocessor.json")
    torch.testing.assert_close(
        direct_pre({"observation.state": raw_state})["observation.state"], expected_state
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chunk_size": 4, "n_action_steps": 5}, "n_action_steps"),
        ({"n_obs_steps": 2}, "n_obs_steps"),
        ({"time_embed_dim": 31}, "time_embed_dim"),
        ({"observation_clip": 0.0}, "observation_clip"),
        ({"task_vocabulary": []}, "task_vocabulary must list non-empty instructions"),
        ({"task_vocabulary": ["Open a door", "Open a door"]}, "lists 'Open a door' more than once"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_rejects_missing_features():
    action = {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))}
    no_observation = make_config(input_features={}, output_features=action)
    with pytest.raises(ValueError, match="at least one observation input"):
        FlowMLPPolicy(no_observation)
    image_only = {"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8))}
    with pytest.raises(ValueError, match="at least one observation input"):
        make_config(input_features=image_only, output_features=action, use_image=False).validate_features()
    with pytest.raises(ValueError, match="'action' output feature"):
        make_config(output_features={}).validate_features()
    with pytest.raises(ValueError, match="image_key"):
        make_config(
            input_features=image_only, output_features=action, image_key="observation.images.top"
        ).validate_features()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """3 episodes x 12 frames of (state, action = first two state dims) written as a local LeRobotDataset."""
    root = tmp_path_factory.mktemp("flow_mlp_dataset") / "dataset"
    features = {
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": ["s0", "s1", "s2"]},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": ["a0", "a1"]},
    }
    dataset = LeRobotDataset.create(
        repo_id="local/flow_mlp_tiny", fps=10, features=features, root=root, use_videos=False
    )
    rng = np.random.default_rng(0)
    states = (rng.standard_normal((36, STATE_DIM)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -3.0]).astype(np.float32)
    for episode in range(3):
        for state in states[12 * episode : 12 * (episode + 1)]:
            dataset.add_frame(
                {"observation.state": state, "action": state[:ACTION_DIM].copy(), "task": "reach"}
            )
        dataset.save_episode()
    dataset.finalize()
    return root, states


def test_lerobot_factory_builds_flow_mlp_from_dataset_metadata(tiny_dataset):
    root, states = tiny_dataset
    assert get_policy_class("flow_mlp") is FlowMLPPolicy
    metadata = LeRobotDatasetMetadata("local/flow_mlp_tiny", root=root)
    config = make_config(input_features={}, output_features={})
    policy = make_policy(config, ds_meta=metadata)
    assert isinstance(policy, FlowMLPPolicy)
    assert policy.config.robot_state_feature.shape == (STATE_DIM,)
    assert policy.model.action_dim == ACTION_DIM
    preprocessor, _ = make_pre_post_processors(policy.config, dataset_stats=metadata.stats)
    normalised = preprocessor({"observation.state": torch.from_numpy(states[0])})["observation.state"]
    expected = (states[0] - states.mean(axis=0)) / states.std(axis=0)
    torch.testing.assert_close(normalised[0], torch.from_numpy(expected), rtol=1e-4, atol=1e-4)


def test_lerobot_train_cli_trains_flow_mlp_and_writes_a_loadable_checkpoint(tiny_dataset, tmp_path):
    root, states = tiny_dataset
    steps = 6
    train_command = shutil.which("lerobot-train") or str(Path(sys.executable).parent / "lerobot-train")
    command = [
        train_command,
        "--policy.type=flow_mlp",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--policy.chunk_size={CHUNK_SIZE}",
        "--policy.n_action_steps=2",
        "--policy.hidden_dim=64",
        "--dataset.repo_id=local/flow_mlp_tiny",
        f"--dataset.root={root}",
        f"--output_dir={tmp_path / 'train'}",
        f"--steps={steps}",
        f"--save_freq={steps}",
        "--log_freq=3",
        "--batch_size=4",
        "--num_workers=0",
        "--wandb.enable=false",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]

    checkpoint = tmp_path / "train" / "checkpoints" / f"{steps:06d}"
    assert json.loads((checkpoint / "training_state" / "training_step.json").read_text())["step"] == steps
    policy = FlowMLPPolicy.from_pretrained(checkpoint / "pretrained_model")
    # The CLI overrides reached our config, and the features came from the dataset.
    assert (policy.config.chunk_size, policy.config.n_action_steps, policy.config.hidden_dim) == (
        CHUNK_SIZE,
        2,
        64,
    )
    assert policy.config.robot_state_feature.shape == (STATE_DIM,)

    preprocessor, postprocessor = make_pre_post_processors(
        policy.config, pretrained_path=str(checkpoint / "pretrained_model")
    )
    batch = preprocessor({"observation.state": torch.from_numpy(states[5])})
    expected = (states[5] - states.mean(axis=0)) / states.std(axis=0)
    torch.testing.assert_close(
        batch["observation.state"][0], torch.from_numpy(expected), rtol=1e-4, atol=1e-4
    )
    action = postprocessor(policy.select_action(batch))  # (1, A), unnormalised
    assert action.shape == (1, ACTION_DIM) and torch.isfinite(action).all()


TASKS = ["Reach a goal position", "Push the puck to a goal", "Open a drawer"]


def test_a_multi_task_policy_reads_its_task_through_the_saved_preprocessor(tmp_path):
    """Issue 14: the task step maps each observation's instruction to its vocabulary index; LeRobot's
    factory (lerobot-eval's path) rebuilds it from the saved files; the task changes the action."""
    torch.manual_seed(0)
    config = make_config(task_vocabulary=TASKS, task_embed_dim=8)
    policy = FlowMLPPolicy(config).eval()
    stats = {
        "observation.state": {"mean": torch.zeros(STATE_DIM), "std": torch.ones(STATE_DIM)},
        "action": {"mean": torch.zeros(ACTION_DIM), "std": torch.ones(ACTION_DIM)},
    }
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    state = torch.ones(3, STATE_DIM)
    batch = preprocessor({"observation.state": state, "task": [TASKS[2], TASKS[0], TASKS[2]]})
    assert batch["observation.task_index"].tolist() == [2, 0, 2]
    noise = torch.randn(1, CHUNK_SIZE, ACTION_DIM).expand(3, -1, -1)
    chunk = policy.predict_action_chunk(batch, noise=noise)  # (3, H, A): same state and noise
    assert torch.equal(chunk[0], chunk[2]) and not torch.allclose(chunk[0], chunk[1])

    for part in (policy, preprocessor, postprocessor):
        part.save_pretrained(tmp_path)
    loaded = FlowMLPPolicy.from_pretrained(tmp_path).eval()
    assert loaded.config.task_vocabulary == TASKS
    loaded_pre, _ = make_pre_post_processors(loaded.config, pretrained_path=str(tmp_path))
    one = loaded_pre({"observation.state": state[0], "task": TASKS[0]})  # an env observation: no batch dim
    assert one["observation.task_index"].tolist() == [0]
    torch.testing.assert_close(loaded.predict_action_chunk(one, noise=noise[:1]), chunk[1:2])

    with pytest.raises(ValueError, match="task 'Fly to the moon' is not one this policy was trained on"):
        loaded_pre({"observation.state": state[0], "task": "Fly to the moon"})
    with pytest.raises(KeyError, match="observation.task_index"):
        loaded.predict_action_chunk({"observation.state": state})


def test_a_single_task_checkpoint_has_no_task_step_and_no_task_input(tmp_path):
    config = make_config()
    policy = FlowMLPPolicy(config)
    preprocessor, _ = make_flow_mlp_pre_post_processors(config)
    assert policy.model.task_embedding is None
    assert "flow_mlp_task_index" not in json.dumps(preprocessor.get_config())
    batch = preprocessor({"observation.state": torch.zeros(STATE_DIM), "task": "anything"})
    assert "observation.task_index" not in batch
