"""Speed and memory of the pi0 / pi05 / smolvla FlowAdapters, and ODE parity with LeRobot on the device.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vla_adapters_speed.py --scale=tiny --device=cpu
    HF_HUB_OFFLINE=1 python benchmarks/vla_adapters_speed.py --scale=full --device=cuda   (needs a GPU)

scale=tiny uses the test models of ``lerobot_pirl.testing.tiny_models``; scale=full builds randomly
initialised models at the real widths (pi0/pi05: PaliGemma 2B + Gemma 300M expert, bf16 weights as
LeRobot trains them, 224 px camera, chunk 50; smolvla: SmolVLM2-500M widths cut to 16 layers, 512 px,
autocast bf16) — timings do not depend on the weights' values. Per policy and batch size it reports:
the max |our ODE - sample_actions| from the same noise (without autocast), the prefix pass (encode)
and one velocity call without grad, one velocity call + backward, and the time and peak memory of
backpropagating through all K calls of a chain, without and with ``gradient_checkpointing``.
Prints a table, writes JSON.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import draccus
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

from lerobot_pirl.adapters.registry import make_adapter
from lerobot_pirl.testing.tiny_models import (
    TinySmolVLMSizes,
    make_tiny_features,
    make_tiny_pi0,
    make_tiny_pi05,
    make_tiny_smolvla,
)

# SmolVLM2-500M-Video-Instruct's widths (smolvla keeps its first 16 of 32 text layers).
SMOLVLM2_500M = TinySmolVLMSizes(
    text_width=960,
    text_mlp_dim=2560,
    depth=16,
    num_heads=15,
    num_kv_heads=5,
    head_dim=64,
    vision_width=768,
    vision_depth=12,
    vision_heads=12,
    vision_mlp_dim=3072,
    patch_size=16,
    scale_factor=4,
    vocab_size=49280,
)


@dataclass
class VLASpeedConfig:
    scale: str = "tiny"  # "tiny" | "full"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    policies: list[str] = field(default_factory=lambda: ["pi0", "pi05", "smolvla"])
    batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    num_steps: int = 4
    repeats: int = 5
    threads: int = 1  # CPU threads (tiny models are fastest on one)
    output: Path = Path("benchmarks/results/vla_adapters_speed.json")


def build(policy_type: str, scale: str, device: str):
    """(policy, features, tokens per prompt, autocast dtype) at the requested scale."""
    if scale == "tiny":
        inputs, outputs = make_tiny_features()
        maker = {"pi0": make_tiny_pi0, "pi05": make_tiny_pi05, "smolvla": make_tiny_smolvla}[policy_type]
        policy = maker(inputs, outputs, device=device).policy.to(device)
        return policy, inputs, 16, None
    inputs = {
        "observation.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)),
        OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(8,)),
    }
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(7,))}
    if policy_type == "smolvla":
        with torch.device(device):
            policy = make_tiny_smolvla(
                inputs,
                outputs,
                chunk_size=50,
                n_action_steps=50,
                image_resolution=512,
                sizes=SMOLVLM2_500M,
                vlm_dir=Path("/tmp/smolvlm2_500m_widths"),
                device=device,
            ).policy
        return policy.to(device), inputs, 48, torch.bfloat16
    from lerobot.policies.pi0 import PI0Config, PI0Policy
    from lerobot.policies.pi05 import PI05Config, PI05Policy

    config_class, policy_class = {"pi0": (PI0Config, PI0Policy), "pi05": (PI05Config, PI05Policy)}[
        policy_type
    ]
    config = config_class(
        input_features=inputs, output_features=outputs, dtype="bfloat16", device=device, push_to_hub=False
    )
    with torch.device(device):  # initialise the 4 B parameters where they live
        policy = policy_class(config)
    return policy.eval(), inputs, config.tokenizer_max_length, None


def make_batch(inputs, n_tokens: int, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch: dict[str, torch.Tensor] = {}
    for key, feature in inputs.items():
        batch[key] = torch.rand((batch_size, *feature.shape), generator=generator).to(device)
    tokens = torch.randint(4, 400, (batch_size, n_tokens), generator=generator)  # ids valid in every vocab
    mask = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    mask[:, : max(1, n_tokens * 2 // 3)] = True  # a third of the prompt is padding, as after tokenising
    batch[OBS_LANGUAGE_TOKENS] = tokens.to(device)
    batch[OBS_LANGUAGE_ATTENTION_MASK] = mask.to(device)
    return batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_gib(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def lerobot_ode(policy_type, policy, batch, noise):
    tokens, masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
    if policy_type == "smolvla":
        images, image_masks = policy.prepare_images(batch)
        return policy.model.sample_actions(
            images, image_masks, tokens, masks, policy.prepare_state(batch), noise=noise
        )
    images, image_masks = policy._preprocess_images(batch)
    if policy_type == "pi05":
        return policy.model.sample_actions(images, image_masks, tokens, masks, noise=noise)
    return policy.model.sample_actions(
        images, image_masks, tokens, masks, policy.prepare_state(batch), noise=noise
    )


def measure_batch(cfg: VLASpeedConfig, policy_type: str, policy, adapter, batch, autocast_dtype) -> dict:
    sizes = adapter.sizes
    batch_size = batch[OBS_LANGUAGE_TOKENS].shape[0]
    noise = torch.randn(batch_size, sizes.chunk_size, sizes.action_dim, device=cfg.device)  # (B, H, A)
    t = torch.full((batch_size,), 0.5, device=cfg.device)
    grid = [torch.full_like(t, 1.0 - k / sizes.num_steps) for k in range(sizes.num_steps)]
    with torch.no_grad():
        adapter.autocast_dtype = None  # parity in the policy's own dtype: LeRobot's sampler has no autocast
        x = noise
        parity_context = adapter.encode(batch)
        for t_k in grid:
            v, _ = adapter.velocity(parity_context, x, t_k)
            x = x - v / sizes.num_steps
        parity = (x - lerobot_ode(policy_type, policy, batch, noise).float()).abs().max().item()
        del parity_context
        adapter.autocast_dtype = autocast_dtype
        context = adapter.encode(batch)
        encode_ms = timed_ms(lambda: adapter.encode(batch), cfg.device, cfg.repeats)
        velocity_ms = timed_ms(lambda: adapter.velocity(context, noise, t), cfg.device, cfg.repeats)

    def one_call_backward():
        adapter.zero_grad(set_to_none=True)
        v, hidden = adapter.velocity(context, noise, t)
        (v.square().mean() + hidden.mean()).backward()

    def chain_backward():  # Flow-Noise's update: gradients through all K velocity calls of a chain
        adapter.zero_grad(set_to_none=True)
        loss = sum(adapter.velocity(context, noise, t_k)[0].square().mean() for t_k in grid)
        loss.backward()

    row = {
        "policy": policy_type,
        "scale": cfg.scale,
        "device": cfg.device,
        "batch": batch_size,
        "sizes": asdict(sizes),
        "ode_parity_max_abs": parity,
        "encode_ms": encode_ms,
        "velocity_ms": velocity_ms,
        "velocity_fwd_bwd_ms": timed_ms(one_call_backward, cfg.device, cfg.repeats),
        "velocity_fwd_bwd_peak_gib": peak_gib(one_call_backward, cfg.device),
        "chain_K_bwd_ms": timed_ms(chain_backward, cfg.device, cfg.repeats),
        "chain_K_bwd_peak_gib": peak_gib(chain_backward, cfg.device),
    }
    adapter.gradient_checkpointing = True
    row["chain_K_bwd_checkpointed_ms"] = timed_ms(chain_backward, cfg.device, cfg.repeats)
    row["chain_K_bwd_checkpointed_peak_gib"] = peak_gib(chain_backward, cfg.device)
    adapter.gradient_checkpointing = False
    adapter.zero_grad(set_to_none=True)
    return row


def measure(cfg: VLASpeedConfig, policy_type: str) -> list[dict]:
    policy, inputs, n_tokens, autocast_dtype = build(policy_type, cfg.scale, cfg.device)
    adapter = make_adapter(policy, num_steps=cfg.num_steps, autocast_dtype=autocast_dtype)
    counts = {
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "trainable_expert_M": sum(p.numel() for p in adapter.expert_parameters() if p.requires_grad) / 1e6,
    }
    rows = []
    for batch_size in cfg.batch_sizes:
        batch = make_batch(inputs, n_tokens, batch_size, cfg.device)
        rows.append({**counts, **measure_batch(cfg, policy_type, policy, adapter, batch, autocast_dtype)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@draccus.wrap()
def main(cfg: VLASpeedConfig) -> None:
    torch.set_num_threads(cfg.threads)
    rows = []
    for policy_type in cfg.policies:
        rows += measure(cfg, policy_type)
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    columns = [
        "policy",
        "batch",
        "params_M",
        "ode_parity_max_abs",
        "encode_ms",
        "velocity_ms",
        "velocity_fwd_bwd_ms",
        "velocity_fwd_bwd_peak_gib",
        "chain_K_bwd_ms",
        "chain_K_bwd_peak_gib",
        "chain_K_bwd_checkpointed_ms",
        "chain_K_bwd_checkpointed_peak_gib",
    ]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(fmt(row[column]) for column in columns))
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps({"config": draccus.encode(cfg), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
