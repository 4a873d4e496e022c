"""The pi0 / pi05 / smolvla FlowAdapters against LeRobot's own code, on tiny offline models.

Shapes: B batch, H chunk_size, A max_action_dim, D real action dim, K steps, F VLM width, W expert width.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lerobot_pirl.adapters.registry import FlowPolicyLoadError, load_flow_policy, make_adapter
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
BATCH = 3
INPUTS, OUTPUTS = make_tiny_features(image_shape=(3, 32, 32), state_dim=4, action_dim=4)
# The small projections around the expert, fully trained next to LoRA (smolvla's state_proj is trunk).
EXPECTED_HEADS = {
    "pi0": {f"model.{name}" for name in ("action_in_proj", "action_out_proj", "state_proj")}
    | {"model.action_time_mlp_in", "model.action_time_mlp_out"},
    "pi05": {"model.action_in_proj", "model.action_out_proj", "model.time_mlp_in", "model.time_mlp_out"},
    "smolvla": {"model.action_in_proj", "model.action_out_proj"}
    | {"model.action_time_mlp_in", "model.action_time_mlp_out"},
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two OpenMP threads make every
    small matmul wait ~30 ms at the barrier (measured: 0.02 ms vs 32 ms for a 108x64 @ 64x128 linear)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=POLICY_TYPES)
def tiny(request, tmp_path_factory):
    """(policy type, policy, preprocessor, postprocessor, preprocessed batch), built once per module."""
    policy_type = request.param
    if policy_type == "pi0":
        policy, pre, post = make_tiny_pi0(INPUTS, OUTPUTS, chunk_size=8, n_action_steps=4, num_steps=4)
    elif policy_type == "pi05":
        policy, pre, post = make_tiny_pi05(INPUTS, OUTPUTS, chunk_size=8, n_action_steps=4, num_steps=4)
    else:
        vlm_dir = tmp_path_factory.mktemp("tiny_smolvlm") / "vlm"
        policy, pre, post = make_tiny_smolvla(
            INPUTS, OUTPUTS, chunk_size=8, n_action_steps=4, num_steps=4, vlm_dir=vlm_dir
        )
    batch = pre(make_tiny_observation(INPUTS, BATCH, seed=1))
    return policy_type, policy, pre, post, batch


def fresh_adapter(tiny, **options):
    """An adapter on a private copy of the policy (adapters set requires_grad, LoRA rewrites modules)."""
    return make_adapter(copy.deepcopy(tiny[1]), **options)


def fixed_noise(adapter, seed: int = 7) -> torch.Tensor:
    sizes = adapter.sizes
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, sizes.chunk_size, sizes.action_dim, generator=generator)  # (B, H, A)


def ode_sample(adapter, batch, noise) -> torch.Tensor:
    """Our Euler chain: encode once, x <- x - v/K from t = 1."""
    num_steps = adapter.sizes.num_steps
    context = adapter.encode(batch)
    x = noise
    for k in range(num_steps):
        t = torch.full((BATCH,), 1.0 - k / num_steps)
        v, _ = adapter.velocity(context, x, t)
        x = x - v / num_steps
    return x


def lerobot_sample_actions(policy_type, policy, batch, noise) -> torch.Tensor:
    """The policy's own (no_grad) sampler, full padded width (B, H, A)."""
    tokens, masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
    if policy_type == "pi0":
        images, image_masks = policy._preprocess_images(batch)
        return policy.model.sample_actions(
            images, image_masks, tokens, masks, policy.prepare_state(batch), noise=noise
        )
    if policy_type == "pi05":
        images, image_masks = policy._preprocess_images(batch)
        return policy.model.sample_actions(images, image_masks, tokens, masks, noise=noise)
    images, image_masks = policy.prepare_images(batch)
    return policy.model.sample_actions(
        images, image_masks, tokens, masks, policy.prepare_state(batch), noise=noise
    )


@pytest.mark.parametrize("num_steps", [None, 3])
def test_ode_over_velocity_matches_lerobot_sample_actions(tiny, num_steps):
    policy_type, _, _, _, batch = tiny
    adapter = fresh_adapter(tiny, num_steps=num_steps)
    noise = fixed_noise(adapter)
    ours = ode_sample(adapter, batch, noise)
    reference = lerobot_sample_actions(policy_type, adapter.policy, batch, noise)
    assert adapter.sizes.num_steps == (num_steps or 4)
    assert ours.shape == reference.shape == noise.shape
    assert (ours - reference).abs().max().item() <= 1e-5
    assert (reference - noise).abs().max().item() > 1e-2  # the model did move the sample


def test_sizes_come_from_the_config_and_model(tiny):
    _, policy, _, _, batch = tiny
    adapter = fresh_adapter(tiny)
    sizes, config, model = adapter.sizes, policy.config, policy.model
    assert (sizes.chunk_size, sizes.action_dim, sizes.real_action_dim) == (8, config.max_action_dim, 4)
    assert (sizes.num_steps, sizes.n_action_steps) == (4, 4)
    assert sizes.hidden_dim == model.action_out_proj.in_features
    assert sizes.pooled_dim != sizes.hidden_dim  # the tiny VLM and expert widths differ on purpose

    context = adapter.encode(batch)
    v, hidden = adapter.velocity(context, fixed_noise(adapter), torch.full((BATCH,), 0.5))
    assert context.pooled.shape == (BATCH, sizes.pooled_dim) and context.pooled.dtype == torch.float32
    assert v.shape == (BATCH, sizes.chunk_size, sizes.action_dim) and v.dtype == torch.float32
    assert hidden.shape == (BATCH, sizes.chunk_size, sizes.hidden_dim) and hidden.dtype == torch.float32
    # The hidden states are exactly what the model's output projection turns into v.
    torch.testing.assert_close(adapter.policy.model.action_out_proj(hidden), v, rtol=0, atol=1e-6)


def test_pooled_features_ignore_padding_tokens(tiny):
    adapter = fresh_adapter(tiny)
    batch = tiny[4]
    padded = dict(batch)
    extra = 5  # more padding after the prompt: masked out, so the valid tokens and their mean are unchanged
    tokens, masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
    padded[OBS_LANGUAGE_TOKENS] = torch.cat([tokens, torch.zeros(BATCH, extra, dtype=tokens.dtype)], dim=1)
    padded[OBS_LANGUAGE_ATTENTION_MASK] = torch.cat(
        [masks, torch.zeros(BATCH, extra, dtype=torch.bool)], dim=1
    )
    pooled = adapter.encode(batch).pooled
    torch.testing.assert_close(adapter.encode(padded).pooled, pooled, rtol=1e-5, atol=1e-5)
    other = dict(batch)
    other["observation.image"] = 1.0 - batch["observation.image"]
    assert (adapter.encode(other).pooled - pooled).abs().max().item() > 1e-4  # it does see the image


def test_velocity_is_repeatable_and_trains_only_the_expert(tiny):
    adapter = fresh_adapter(tiny)
    batch = tiny[4]
    context = adapter.encode(batch)
    noise, t = fixed_noise(adapter), torch.full((BATCH,), 0.75)
    v_first, _ = adapter.velocity(context, noise, t)
    v_second, _ = adapter.velocity(context, noise, t)
    assert torch.equal(v_first, v_second)  # the shared prefix cache was not altered by the first call

    (v_first.square().mean() + v_second.square().mean()).backward()  # through two calls on one context
    trainable = [p for p in adapter.expert_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    # Most get a non-zero gradient (pi05's time MLP feeds adaRMS layers whose weights start at zero).
    assert sum(bool(p.grad.abs().sum() > 0) for p in trainable) >= 0.8 * len(trainable)
    assert all(not p.requires_grad and p.grad is None for p in adapter.trunk_parameters())

    # Separate backward passes on one context work too (smolvla's in-place cache crop would break this).
    adapter.zero_grad(set_to_none=True)
    adapter.velocity(context, noise, t)[0].sum().backward()
    adapter.velocity(context, noise, t)[0].sum().backward()

    adapter.zero_grad(set_to_none=True)
    with torch.no_grad():
        v_no_grad, hidden_no_grad = adapter.velocity(context, noise, t)
    assert not v_no_grad.requires_grad and not hidden_no_grad.requires_grad
    assert torch.equal(v_no_grad, v_first)
    assert all(p.grad is None for p in adapter.policy.parameters())


def test_train_vlm_sends_gradients_through_the_cached_prefix(tiny):
    adapter = fresh_adapter(tiny, train_vlm=True)
    context = adapter.encode(tiny[4])
    v, _ = adapter.velocity(context, fixed_noise(adapter), torch.full((BATCH,), 0.5))
    v.sum().backward()
    trunk = adapter.trunk_parameters()
    reached = [p for p in trunk if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(reached) > len(trunk) // 2
    if adapter.policy.config.freeze_vision_encoder:  # smolvla's default: the vision tower stays frozen
        vision = adapter.policy.model.vlm_with_expert.get_vlm_model().vision_model
        assert all(not p.requires_grad and p.grad is None for p in vision.parameters())


def test_lora_trains_only_adapters_and_heads_and_starts_at_the_base_model(tiny):
    batch = tiny[4]
    base = fresh_adapter(tiny)
    lora = fresh_adapter(tiny, lora_rank=4)
    expert_prefix = lora._expert_module_prefix() + "."
    trainable = {name for name, p in lora.policy.named_parameters() if p.requires_grad}
    lora_names = {name for name in trainable if ".lora_" in name}
    heads = trainable - lora_names
    assert lora_names and all(name.startswith(expert_prefix) for name in lora_names)
    assert {name.rsplit(".", 1)[0] for name in heads} == EXPECTED_HEADS[tiny[0]]
    n_wrapped = sum(isinstance(m, LoraLayer) for m in lora.policy.modules())
    assert n_wrapped == 7 * _expert_depth(lora)  # q, k, v, o, gate, up, down in every expert layer

    noise, t = fixed_noise(base), torch.full((BATCH,), 0.6)
    v_base, hidden_base = base.velocity(base.encode(batch), noise, t)
    v_lora, hidden_lora = lora.velocity(lora.encode(batch), noise, t)
    torch.testing.assert_close(v_lora, v_base, rtol=0, atol=1e-6)  # LoRA B starts at zero
    torch.testing.assert_close(hidden_lora, hidden_base, rtol=0, atol=1e-6)

    # After training-like changes, the merged LeRobot state dict reproduces the LoRA model exactly.
    with torch.no_grad():
        for name, p in lora.policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    v_trained, _ = lora.velocity(lora.encode(batch), noise, t)
    assert (v_trained - v_base).abs().max().item() > 1e-3
    merged = fresh_adapter(tiny)
    merged.policy.load_state_dict(lora.policy_state_dict(), strict=True)
    v_merged, _ = merged.velocity(merged.encode(batch), noise, t)
    torch.testing.assert_close(v_merged, v_trained, rtol=1e-5, atol=1e-5)


def _expert_depth(adapter) -> int:
    config = adapter.policy.config
    if config.type == "smolvla":
        return len(adapter.policy.model.vlm_with_expert.lm_expert.layers)
    return len(adapter.policy.model.paligemma_with_expert.gemma_expert.model.layers)


def test_bf16_autocast_returns_float32_close_to_float32(tiny):
    batch = tiny[4]
    full = fresh_adapter(tiny)
    half = fresh_adapter(tiny, autocast_dtype=torch.bfloat16)
    noise, t = fixed_noise(full), torch.full((BATCH,), 0.4)
    context = half.encode(batch)
    v_half, hidden_half = half.velocity(context, noise, t)
    v_full, hidden_full = full.velocity(full.encode(batch), noise, t)
    assert v_half.dtype == hidden_half.dtype == context.pooled.dtype == torch.float32
    assert (v_half - v_full).abs().max().item() <= 0.05 * v_full.abs().max().item()
    assert (hidden_half - hidden_full).abs().max().item() <= 0.05 * hidden_full.abs().max().item()
    v_half.sum().backward()
    assert all(p.grad is not None for p in half.expert_parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    batch = tiny[4]
    plain = fresh_adapter(tiny)
    checkpointed = fresh_adapter(tiny, gradient_checkpointing=True)
    noise, t = fixed_noise(plain), torch.full((BATCH,), 0.9)
    for adapter in (plain, checkpointed):
        v, hidden = adapter.velocity(adapter.encode(batch), noise, t)
        (v.square().sum() + hidden.sum()).backward()
    for p_plain, p_checkpointed in zip(
        plain.expert_parameters(), checkpointed.expert_parameters(), strict=True
    ):
        if p_plain.requires_grad:
            torch.testing.assert_close(p_checkpointed.grad, p_plain.grad, rtol=1e-5, atol=1e-6)


def test_save_and_load_flow_policy_round_trip(tiny, tmp_path):
    policy_type, policy, pre, post, _ = tiny
    policy.save_pretrained(tmp_path)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    tokenizer = make_tiny_tokenizer() if policy_type != "smolvla" else None  # smolvla's is in its VLM folder
    with tiny_paligemma_architecture():
        loaded, loaded_pre, loaded_post = load_flow_policy(tmp_path, tokenizer=tokenizer, n_action_steps=2)
    assert loaded.config.type == policy_type and loaded.config.n_action_steps == 2
    observation = make_tiny_observation(INPUTS, BATCH, seed=5)
    batch, loaded_batch = pre(observation), loaded_pre(make_tiny_observation(INPUTS, BATCH, seed=5))
    assert torch.equal(batch[OBS_LANGUAGE_TOKENS], loaded_batch[OBS_LANGUAGE_TOKENS])
    noise = torch.randn(BATCH, 8, policy.config.max_action_dim, generator=torch.Generator().manual_seed(11))
    actions = post(policy.predict_action_chunk(batch, noise=noise))  # (B, H, D)
    loaded_actions = loaded_post(loaded.predict_action_chunk(loaded_batch, noise=noise))
    assert actions.shape == (BATCH, 8, 4)
    torch.testing.assert_close(loaded_actions, actions, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tiny", ["pi0"], indirect=True)  # the check is generic; pi0 is the silent one
def test_load_refuses_weights_that_do_not_cover_the_model(tiny, tmp_path):
    _, policy, pre, post, _ = tiny
    policy.save_pretrained(tmp_path)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.action_out_proj.bias"]  # PI0Policy.from_pretrained would return a random model
    save_file(weights, tmp_path / "model.safetensors")
    with tiny_paligemma_architecture(), pytest.raises(FlowPolicyLoadError, match="1 tensors missing"):
        load_flow_policy(tmp_path, tokenizer=make_tiny_tokenizer())

    del weights["model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight"]
    save_file({key: value * 0 + 1 for key, value in weights.items()}, tmp_path / "model.safetensors")
    with tiny_paligemma_architecture(), pytest.raises(FlowPolicyLoadError, match="refusing"):
        load_flow_policy(tmp_path, tokenizer=make_tiny_tokenizer())


def test_load_flow_policy_bad_paths_raise_one_clear_line(tmp_path):
    with pytest.raises(FlowPolicyLoadError, match="no checkpoint folder at") as missing:
        load_flow_policy(tmp_path / "does-not-exist")
    with pytest.raises(FlowPolicyLoadError, match="missing config.json, model.safetensors") as empty:
        load_flow_policy(tmp_path)
    (tmp_path / "bogus.json").write_text("{}")
    with pytest.raises(FlowPolicyLoadError, match="is a file"):
        load_flow_policy(tmp_path / "bogus.json")
    with pytest.raises(FlowPolicyLoadError, match="could not be fetched from the hub") as hub:
        load_flow_policy("nobody-pirl-test/no-such-policy")  # offline in tests; a 404 online
    for error in (missing, empty, hub):
        assert "\n" not in str(error.value)


def test_unsupported_policy_types_are_refused(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    config = ACTConfig(
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(4,)),
            "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(4,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(4,))},
        dim_model=16,
        n_heads=2,
        dim_feedforward=32,
        n_encoder_layers=1,
        n_decoder_layers=1,
        use_vae=False,
        chunk_size=4,
        n_action_steps=4,
        pretrained_backbone_weights=None,
        device="cpu",
        push_to_hub=False,
    )
    act = ACTPolicy(config)
    with pytest.raises(ValueError, match=r"'act'.*pi0, pi05, smolvla, flow_mlp"):
        make_adapter(act)
    act.save_pretrained(tmp_path)
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        (tmp_path / name).write_text(json.dumps({"name": name, "steps": []}))
    with pytest.raises(ValueError, match=r"'act'.*pi0, pi05, smolvla, flow_mlp"):
        load_flow_policy(tmp_path)
