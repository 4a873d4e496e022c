"""pi0 / pi05 / smolvla through the RL layer (FlowRLPolicy, PPO, the trainer's builders), on tiny offline
models and LeRobot's own MetaWorld pixel env.

Every policy is built once per module as a LeRobot checkpoint folder (MetaWorld's features: one
480x480 camera, 4-d agent position, 4-d action) and loaded through ``runtime.trainer.build_rl_policy``,
the same path ``lerobot-pirl-train --policy.path=...`` takes.

Shapes: B batch, K denoising steps, H chunk_size, A max_action_dim, C executed actions, D real action dim.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from lerobot.envs.configs import MetaworldEnv
from lerobot.envs.utils import close_envs
from lerobot.utils.constants import OBS_IMAGE, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

from lerobot_pirl.adapters.registry import load_flow_policy
from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.algorithms.losses import clipped_surrogate_loss, value_loss
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.algorithms.update import make_lr_scheduler, make_optimizer, policy_update
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.runtime.checkpoint import TrainerState, save_checkpoint
from lerobot_pirl.runtime.config import PolicyOptionsConfig, RolloutConfig, TrainConfig
from lerobot_pirl.runtime.factory import build_collector, build_rl_policy
from lerobot_pirl.testing.collection import collect_samples
from lerobot_pirl.testing.tiny_models import (
    make_tiny_features,
    make_tiny_observation,
    make_tiny_pi0,
    make_tiny_pi05,
    make_tiny_smolvla,
    make_tiny_tokenizer,
    tiny_paligemma_architecture,
)

POLICY_TYPES = ("pi0", "pi05", "smolvla")
TASK = "metaworld-push-v3"
TASK_TEXT = "Push the puck to a goal"  # LeRobot's TASK_DESCRIPTIONS["push-v3"]
BATCH = 3
NUM_STEPS = 4  # K
CHUNK = 8  # H
EXECUTED = 4  # C
# LeRobot's metaworld env: pixels (480, 480, 3) -> observation.image, agent_pos (4,) -> observation.state.
INPUTS, OUTPUTS = make_tiny_features(image_shape=(3, 480, 480), state_dim=4, action_dim=4)
IMAGE_RESOLUTION = 32  # the tiny models resize the 480 px camera to this inside the policy


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (see test_vla_adapters.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=POLICY_TYPES)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, object]:
    """(policy type, checkpoint folder, tokenizer override) of a tiny SFT policy, built once per module."""
    policy_type = request.param
    folder = tmp_path_factory.mktemp(f"sft_{policy_type}")
    options = dict(chunk_size=CHUNK, n_action_steps=EXECUTED, num_steps=NUM_STEPS)
    if policy_type == "smolvla":
        vlm_dir = tmp_path_factory.mktemp("tiny_smolvlm") / "vlm"
        made = make_tiny_smolvla(
            INPUTS, OUTPUTS, image_resolution=IMAGE_RESOLUTION, vlm_dir=vlm_dir, **options
        )
        tokenizer = None  # smolvla's processors load it from the tiny VLM folder
    else:
        tokenizer = make_tiny_tokenizer(extra_words=TASK_TEXT.split())  # knows every word of the task
        maker = make_tiny_pi0 if policy_type == "pi0" else make_tiny_pi05
        made = maker(INPUTS, OUTPUTS, image_resolution=IMAGE_RESOLUTION, tokenizer=tokenizer, **options)
    for part in made:
        part.save_pretrained(folder)
    return policy_type, folder, tokenizer


def train_config(**policy_options) -> TrainConfig:
    algorithm = PPOConfig(
        actor_lr=1e-3,
        weight_decay=0.0,  # parameters may only move through the PPO gradient
        update_epochs=1,
        minibatch_size=2,
        micro_batch_size=2,
    )
    rollout = RolloutConfig(num_envs=1, decisions_per_env=2, sparse_reward=False)  # dense: non-zero adv.
    return TrainConfig(
        env=MetaworldEnv(task=TASK),
        algorithm=algorithm,
        rollout=rollout,
        policy_options=PolicyOptionsConfig(**policy_options),
    )


def load_rl_policy(
    checkpoint, cfg: TrainConfig | None = None, **changes
) -> tuple[FlowRLPolicy, object, object]:
    """The trainer's own builder; `changes` edit the algorithm config (e.g. exploration)."""
    _, folder, tokenizer = checkpoint
    cfg = cfg or train_config()
    for name, value in changes.items():
        setattr(cfg.algorithm, name, value)
    with tiny_paligemma_architecture():
        return build_rl_policy(cfg, folder, torch.device("cpu"), tokenizer=tokenizer)


def observation_batch(preprocessor, seed: int = 1) -> dict[str, torch.Tensor]:
    return preprocessor(make_tiny_observation(INPUTS, BATCH, task=TASK_TEXT, seed=seed))


def randomise_noise_head(policy: FlowRLPolicy) -> None:
    """The Flow-Noise head starts at a constant std; give it one that depends on the expert states."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        policy.noise_head[-1].weight.normal_(0.0, 1.0, generator=generator)


# --------------------------------------------------------------------------------------------------------
# Log-probs, gradients, cost


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_update_time_log_probs_equal_the_rollout_ones(checkpoint, exploration):
    policy, preprocessor, _ = load_rl_policy(checkpoint, exploration=exploration)
    if exploration == "flow_noise":
        randomise_noise_head(policy)
    batch = observation_batch(preprocessor)
    policy.eval()  # as the collector samples
    sample = policy.sample(batch, exploration, generator=torch.Generator().manual_seed(3))
    assert sample.chain.shape == (BATCH, NUM_STEPS + 1, CHUNK, policy.adapter.sizes.action_dim)
    assert sample.actions.shape == (BATCH, EXECUTED, 4)
    policy.train()  # as policy_update recomputes
    evaluation = policy.evaluate(batch, sample.chain, sample.step_index)
    ratio = torch.exp(evaluation.logprob - sample.logprob)
    assert (ratio - 1).abs().max().item() <= 1e-5
    assert sample.logprob.std().item() > 1e-3  # genuinely per-sample log-probs, not a constant

    # The recomputation does depend on the weights: move the velocity head and the ratio moves.
    with torch.no_grad():
        policy.adapter.policy.model.action_out_proj.weight.mul_(1.1)
        moved = policy.evaluate(batch, sample.chain, sample.step_index).logprob
    assert (moved - sample.logprob).abs().max().item() > 1e-3


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_ppo_loss_reaches_expert_and_heads_but_not_the_frozen_vlm(checkpoint, exploration):
    policy, preprocessor, _ = load_rl_policy(checkpoint, exploration=exploration)
    batch = observation_batch(preprocessor)
    sample = policy.sample(batch, exploration, generator=torch.Generator().manual_seed(4))
    evaluation = policy.evaluate(batch, sample.chain, sample.step_index)
    advantages = torch.tensor([1.0, -0.5, 0.25])  # (B,)
    returns = torch.tensor([0.3, -0.2, 0.1])  # (B,)
    pg_loss, _ = clipped_surrogate_loss(evaluation.logprob, sample.logprob, advantages, 0.2)
    loss = pg_loss - 0.005 * evaluation.entropy.mean()
    loss = loss + value_loss(evaluation.value, sample.value, returns, None, None)
    loss.backward()

    adapter = policy.adapter
    expert = [p for p in adapter.expert_parameters() if p.requires_grad]
    assert expert and all(p.grad is not None for p in expert)
    # Most get a non-zero gradient (pi05's time MLP feeds adaRMS layers whose weights start at zero).
    assert sum(bool(p.grad.abs().sum() > 0) for p in expert) >= 0.8 * len(expert)
    trunk = adapter.trunk_parameters()
    assert trunk and all(not p.requires_grad and p.grad is None for p in trunk)
    assert policy.value_head[-1].weight.grad.abs().sum() > 0  # zero-initialised last layer learns first
    if exploration == "flow_noise":
        assert policy.noise_head[-1].weight.grad.abs().sum() > 0
    else:
        assert policy.noise_head is None
    trainable = {id(p) for p in policy.actor_parameters() + policy.critic_parameters()}
    assert trainable == {id(p) for p in policy.parameters() if p.requires_grad}


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_flow_sde_recomputes_one_expert_pass_per_sample_and_flow_noise_all_k(checkpoint, exploration):
    policy, preprocessor, _ = load_rl_policy(checkpoint, exploration=exploration)
    batch = observation_batch(preprocessor)
    sample = policy.sample(batch, exploration, generator=torch.Generator().manual_seed(2))
    model = policy.adapter.policy.model
    expert_batches: list[int] = []  # batch size of every call of LeRobot's denoise_step

    def counting_denoise_step(*args, **kwargs):
        expert_batches.append(kwargs["x_t"].shape[0])
        return original(*args, **kwargs)

    original = model.denoise_step
    with (
        mock.patch.object(model, "denoise_step", counting_denoise_step),
        mock.patch.object(policy.adapter, "encode", wraps=policy.adapter.encode) as encode,
    ):
        evaluation = policy.evaluate(batch, sample.chain, sample.step_index)
        evaluation.logprob.sum().backward()
    expected_calls = 1 if exploration == "flow_sde" else NUM_STEPS
    assert expert_batches == [BATCH] * expected_calls  # one pass per sample (SDE) or K (Noise)
    assert encode.call_count == 1  # one prefix pass per sample either way


def rollout_samples(policy: FlowRLPolicy, batch, exploration: str, seed: int) -> UpdateSamples:
    """What the collector hands the update for `batch`: chains, log-probs and values, fixed advantages."""
    policy.eval()
    sample = policy.sample(batch, exploration, generator=torch.Generator().manual_seed(seed))
    return UpdateSamples(
        observations={key: value for key, value in batch.items() if isinstance(value, torch.Tensor)},
        chains=sample.chain,
        step_index=sample.step_index,
        old_logprobs=sample.logprob,
        old_values=sample.value,
        advantages=torch.tensor([1.0, -0.5, 0.25]),  # (B,)
        returns=torch.tensor([0.3, -0.2, 0.1]),  # (B,)
    )


@pytest.mark.parametrize("exploration", ["flow_sde", "flow_noise"])
def test_a_cached_prefix_gives_the_recomputed_loss_and_gradients(checkpoint, exploration):
    """Issue 15: the first epoch keeps each sample's prefix; later micro-batches are gathered from it."""
    from lerobot_pirl.adapters.prefix_cache import PrefixCache

    policy, preprocessor, _ = load_rl_policy(checkpoint, exploration=exploration)
    if exploration == "flow_noise":
        randomise_noise_head(policy)
    batch = observation_batch(preprocessor)
    samples = rollout_samples(policy, batch, exploration, seed=8)
    cache = PrefixCache.for_update(policy.adapter, len(samples), budget_gib=1.0)
    policy.train()
    for first_pass in (torch.tensor([2, 0]), torch.tensor([1])):  # "epoch 0": every sample once
        micro = samples.select(first_pass, "cpu")
        assert cache.context(first_pass, micro.observations)[1] == len(first_pass)

    def loss_and_gradients(context):
        policy.zero_grad(set_to_none=True)
        evaluation = policy.evaluate(micro.observations, micro.chains, micro.step_index, context=context)
        pg_loss, _ = clipped_surrogate_loss(evaluation.logprob, micro.old_logprobs, micro.advantages, 0.2)
        loss = pg_loss - 0.005 * evaluation.entropy.mean()
        loss = loss + value_loss(evaluation.value, micro.old_values, micro.returns, 0.2, 10.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    later = torch.tensor([0, 1])  # "epoch 1": another composition of micro-batch
    micro = samples.select(later, "cpu")
    cached_context, encoded = cache.context(later, micro.observations)
    assert encoded == 0  # gathered, no prefix pass
    cached_loss, cached_grads = loss_and_gradients(cached_context)
    recomputed_loss, recomputed_grads = loss_and_gradients(None)
    assert abs(cached_loss.item() - recomputed_loss.item()) <= 1e-5
    assert cached_grads.keys() == recomputed_grads.keys() and len(cached_grads) > 10
    for name, grad in recomputed_grads.items():
        assert torch.allclose(cached_grads[name], grad, rtol=1e-4, atol=1e-5), name


def test_the_update_runs_each_prefix_once_per_iteration_with_the_cache(checkpoint):
    policy, preprocessor, _ = load_rl_policy(checkpoint)
    samples = rollout_samples(policy, observation_batch(preprocessor), "flow_sde", seed=9)
    metrics = {}
    for budget in (0.0, 1e-9, 1.0):  # off, too small (recomputes), on: the same update from the same weights
        cfg = PPOConfig(
            actor_lr=1e-4, update_epochs=3, minibatch_size=2, micro_batch_size=1, prefix_cache_gib=budget
        ).resolved(checkpoint[0])
        start = {name: p.detach().clone() for name, p in policy.state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        metrics[budget] = policy_update(policy, make_optimizer(policy, cfg), samples, cfg, "cpu", generator)
        policy.load_state_dict(start)
    assert metrics[0.0]["update/prefix_passes"] == 3 * BATCH  # every sample in every epoch
    assert metrics[1e-9]["update/prefix_passes"] == 3 * BATCH
    assert metrics[1.0]["update/prefix_passes"] == BATCH  # every sample once
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl", "grad/actor_norm"):
        assert metrics[1.0][key] == pytest.approx(metrics[0.0][key], rel=1e-4, abs=1e-6), key

    # A VLM that trains changes its prefix: never cached.
    from lerobot_pirl.adapters.prefix_cache import PrefixCache

    trained, _, _ = load_rl_policy(checkpoint, train_config(train_vlm=True))
    assert PrefixCache.for_update(trained.adapter, BATCH, budget_gib=1.0) is None


def test_a_prefix_kept_by_the_rollout_saves_every_prefix_pass_of_the_update(checkpoint):
    """Issue 15: the rollout's own encoding is kept with each stored observation and read by the update."""
    import dataclasses

    from lerobot_pirl.adapters.prefix_cache import KEPT_PREFIX

    cfg = train_config()
    cfg.algorithm.update_epochs = 2
    policy, preprocessor, postprocessor = load_rl_policy(checkpoint, cfg)
    start = {name: p.detach().clone() for name, p in policy.state_dict().items()}
    collector, envs = build_collector(
        cfg, policy, preprocessor, postprocessor, num_envs=1, device=torch.device("cpu"), keep_prefix_gib=1.0
    )
    try:
        samples, batches, _ = collect_samples(cfg, collector)
    finally:
        close_envs(envs)
    assert any(key.startswith(KEPT_PREFIX) for key in batches[0].observations)
    without = samples.replace(
        observations={k: v for k, v in samples.observations.items() if not k.startswith(KEPT_PREFIX)}
    )
    recompute = dataclasses.replace(cfg.algorithm, prefix_cache_gib=0.0)
    metrics = {}
    for name, given in (("kept", samples), ("recomputed", without)):
        policy.load_state_dict(start)
        generator = torch.Generator().manual_seed(0)
        optimizer = make_optimizer(policy, recompute)
        metrics[name] = policy_update(policy, optimizer, given, recompute, "cpu", generator)
    assert metrics["kept"]["update/prefix_passes"] == 0
    assert metrics["recomputed"]["update/prefix_passes"] == 2 * len(samples)
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl", "grad/actor_norm"):
        assert metrics["kept"][key] == pytest.approx(metrics["recomputed"][key], rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------------------------------------
# One PPO iteration on LeRobot's metaworld pixel env, then save -> load -> actions


@pytest.fixture(scope="module")
def metaworld_iteration(checkpoint):
    """collect -> ppo_samples -> policy_update through the trainer's builders on --env.type=metaworld."""
    cfg = train_config()
    policy, preprocessor, postprocessor = load_rl_policy(checkpoint, cfg)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    collector, envs = build_collector(
        cfg, policy, preprocessor, postprocessor, num_envs=1, device=torch.device("cpu")
    )
    try:
        assert collector.tasks == [TASK_TEXT]
        samples, batches, _ = collect_samples(cfg, collector)
    finally:
        close_envs(envs)
    optimizer = make_optimizer(policy, cfg.algorithm)
    metrics = policy_update(policy, optimizer, samples, cfg.algorithm, "cpu")
    return {
        "cfg": cfg,
        "policy": policy,
        "preprocessor": preprocessor,
        "postprocessor": postprocessor,
        "optimizer": optimizer,
        "before": before,
        "samples": samples,
        "batch": batches[0],
        "metrics": metrics,
    }


def test_one_ppo_iteration_on_lerobot_metaworld_pixels_trains_the_expert(checkpoint, metaworld_iteration):
    run = metaworld_iteration
    policy, samples, batch = run["policy"], run["samples"], run["batch"]
    decisions = 2
    assert len(samples) == decisions and batch.env_steps == decisions * EXECUTED
    # The env's 480x480 camera and agent position went through LeRobot's eval path into the batch.
    assert samples.observations[OBS_IMAGE].shape == (decisions, 3, 480, 480)
    assert samples.observations[OBS_STATE].shape == (decisions, 4)
    assert samples.chains.shape == (decisions, NUM_STEPS + 1, CHUNK, policy.adapter.sizes.action_dim)
    assert (batch.rewards != 0).all()  # dense MetaWorld reward
    # The task text reached the tokenizer: its words are in every stored prompt.
    tokenizer = next(
        step.input_tokenizer for step in run["preprocessor"].steps if hasattr(step, "input_tokenizer")
    )
    tokens = samples.observations[OBS_LANGUAGE_TOKENS]
    valid = samples.observations[OBS_LANGUAGE_ATTENTION_MASK].bool()
    words = ("push", "puck", "goal") if checkpoint[0] != "smolvla" else ("push",)  # smolvla: tiny VLM vocab
    for row in range(decisions):
        prompt = tokenizer.decode(tokens[row][valid[row]])
        assert all(word in prompt.lower().split() for word in words), prompt

    metrics = run["metrics"]
    assert abs(metrics["policy/ratio_max"] - 1.0) <= 1e-5  # first minibatch of the first epoch: ratio 1
    assert metrics["update/num_samples"] == decisions
    before = run["before"]
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    moved = {name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved <= trainable  # the frozen VLM did not move
    expert = {n for n in trainable if n.startswith("adapter.")}
    assert len(moved & expert) >= 0.8 * len(expert)
    assert f"value_head.{len(policy.value_head) - 1}.weight" in moved  # the critic's zero-initialised output


def ode_actions(policy: FlowRLPolicy, batch, noise) -> torch.Tensor:
    """Our deterministic chain's whole chunk, real action dims: (B, H, D)."""
    with torch.no_grad():
        chunk = policy.sample(batch, "ode", noise=noise).chain[:, -1]
    return chunk[..., : policy.adapter.sizes.real_action_dim]


def save_and_reload(checkpoint, run_cfg, policy, preprocessor, postprocessor, optimizer, output_dir: Path):
    """`runtime.checkpoint.save_checkpoint`, then the plain LeRobot policy type back via load_flow_policy."""
    folder = save_checkpoint(
        output_dir,
        cfg=run_cfg,
        total_iterations=1,
        policy=policy,
        preprocessor=preprocessor,
        postprocessor=postprocessor,
        optimizer=optimizer,
        scheduler=make_lr_scheduler(optimizer, run_cfg.algorithm, 1),
        state=TrainerState(iteration=1),
    )
    with tiny_paligemma_architecture():
        return load_flow_policy(folder / "pretrained_model", tokenizer=checkpoint[2])


def assert_round_trip(checkpoint, policy, loaded, loaded_preprocessor, original_actions_of):
    batch = observation_batch(loaded_preprocessor, seed=9)
    sizes = policy.adapter.sizes
    noise = torch.randn(BATCH, sizes.chunk_size, sizes.action_dim, generator=torch.Generator().manual_seed(8))
    trained = ode_actions(policy, batch, noise)  # (B, H, D)
    with torch.no_grad():
        reloaded = loaded.predict_action_chunk(batch, noise=noise)  # LeRobot's own sampler, (B, H, D)
    assert (
        loaded.config.type == checkpoint[0] and type(loaded).__name__ == type(policy.adapter.policy).__name__
    )
    assert reloaded.shape == trained.shape == (BATCH, CHUNK, 4)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    assert (trained - original_actions_of(batch, noise)).abs().max().item() > 1e-4  # the update is in there


def test_save_load_round_trip_reproduces_the_trained_actions(checkpoint, metaworld_iteration, tmp_path):
    run = metaworld_iteration
    policy = run["policy"]
    loaded, loaded_pre, _ = save_and_reload(
        checkpoint,
        run["cfg"],
        policy,
        run["preprocessor"],
        run["postprocessor"],
        run["optimizer"],
        tmp_path,
    )
    sft, _, _ = load_rl_policy(checkpoint)
    assert_round_trip(
        checkpoint, policy, loaded, loaded_pre, lambda batch, noise: ode_actions(sft, batch, noise)
    )


def test_lora_update_saves_merged_weights_that_load_into_the_plain_policy(
    checkpoint, metaworld_iteration, tmp_path
):
    run = metaworld_iteration
    cfg = train_config(lora_rank=4)
    cfg.algorithm.actor_lr = 1e-2  # one Adam step on rank-4 factors: make its effect plainly visible
    policy, preprocessor, postprocessor = load_rl_policy(checkpoint, cfg)
    lora = {name for name, p in policy.named_parameters() if ".lora_" in name and p.requires_grad}
    assert lora
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    optimizer = make_optimizer(policy, cfg.algorithm)
    # The rollout's samples come from the same SFT weights (LoRA starts at zero): ratio 1 again.
    metrics = policy_update(policy, optimizer, run["samples"], cfg.algorithm, "cpu")
    assert abs(metrics["policy/ratio_max"] - 1.0) <= 1e-5
    moved = {name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    # B starts at zero, so the first step moves B only (A's gradient is B^T times something).
    assert {name for name in lora if ".lora_B." in name} <= moved
    assert not any(".base_layer." in name for name in moved)  # the expert's base weights stay frozen

    loaded, loaded_pre, _ = save_and_reload(
        checkpoint, cfg, policy, preprocessor, postprocessor, optimizer, tmp_path
    )
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    sft, _, _ = load_rl_policy(checkpoint)
    assert_round_trip(
        checkpoint, policy, loaded, loaded_pre, lambda batch, noise: ode_actions(sft, batch, noise)
    )


def test_bf16_checkpoint_trains_float32_master_weights_under_autocast(tmp_path):
    """A checkpoint saved with LeRobot's dtype="bfloat16": the frozen VLM stays bf16, the trained expert
    becomes float32 (a bf16 weight would not move by an AdamW step of the reference lr 5e-6)."""
    tokenizer = make_tiny_tokenizer(extra_words=TASK_TEXT.split())
    made = make_tiny_pi0(
        INPUTS,
        OUTPUTS,
        chunk_size=CHUNK,
        n_action_steps=EXECUTED,
        num_steps=NUM_STEPS,
        image_resolution=IMAGE_RESOLUTION,
        tokenizer=tokenizer,
        dtype="bfloat16",
    )
    for part in made:
        part.save_pretrained(tmp_path)
    cfg = train_config()
    cfg.algorithm.actor_lr = 5e-6  # the reference learning rate
    cfg.algorithm.minibatch_size = cfg.algorithm.micro_batch_size = BATCH  # one optimiser step
    policy, preprocessor, _ = load_rl_policy(("pi0", tmp_path, tokenizer), cfg)
    adapter = policy.adapter
    assert {p.dtype for p in adapter.parameters() if p.requires_grad} == {torch.float32}
    vlm = adapter.policy.model.paligemma_with_expert.paligemma.model.language_model
    assert {p.dtype for name, p in vlm.named_parameters() if "proj" in name} == {torch.bfloat16}
    assert adapter.autocast_dtype == torch.bfloat16  # mixed weights run under autocast

    batch = observation_batch(preprocessor)
    sample = policy.sample(batch, "flow_sde", generator=torch.Generator().manual_seed(6))
    samples = UpdateSamples(
        observations={key: value for key, value in batch.items() if isinstance(value, torch.Tensor)},
        chains=sample.chain,
        step_index=sample.step_index,
        old_logprobs=sample.logprob,
        old_values=sample.value,
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        returns=torch.zeros(BATCH),
    )
    weight = adapter.policy.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    policy_update(policy, make_optimizer(policy, cfg.algorithm), samples, cfg.algorithm, "cpu")
    step = (weight.detach() - before).abs()
    assert 0.5 * cfg.algorithm.actor_lr < step.max().item() <= 1.01 * cfg.algorithm.actor_lr  # one Adam step
    assert (step > 0).float().mean() > 0.5  # the float32 weights did move...
    in_bf16 = before.to(torch.bfloat16) != weight.detach().to(torch.bfloat16)
    assert in_bf16.float().mean() < 0.1  # ...where bf16 weights would have kept (nearly) all old values
