"""π0 through the RL layer on one GPU: rollout decisions/s, PPO update samples/s and peak memory for
hybrid Flow-SDE (one denoising step recomputed per sample) and Flow-Noise (all K steps), expert-only
and with LoRA on the expert. With ``--scale=tiny --device=cpu`` the same comparison on the tiny
offline models (the issue's target: Flow-SDE update cost per sample <= 1.5/K x Flow-Noise's).

    HF_HUB_OFFLINE=1 python benchmarks/vla_gpu.py                                  (full π0, needs a GPU)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vla_gpu.py --scale=tiny --device=cpu
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vla_gpu.py --scale=tiny --device=cpu --shape=libero \
        --update_epochs=4 --prefix_modes='[recompute,update_cache,rollout]'   (issue 15: LIBERO's prefix)

What is measured, all through the package's own code:
- rollout: ``FlowRLPolicy.sample`` on ``observations`` preprocessed observations (one 224 px camera,
  state, a padded prompt of ``prompt_tokens`` real tokens out of the config's ``tokenizer_max_length``),
  K denoising steps, C executed actions; decisions/s = observations / time of one call.
- update: ``algorithms.update.policy_update`` (``FlowRLPolicy.evaluate`` + PPO loss + backward, one
  AdamW step per minibatch of all ``observations`` samples, gradient accumulation over micro-batches)
  on samples drawn by ``sample`` from the same observations; samples/s = observations / time of one
  epoch. The optimizer state exists before timing (one warm-up update).
- peak memory: ``torch.cuda.max_memory_allocated`` during the timed calls, everything included
  (weights, gradients, AdamW state, activations, the prefix cache); ``weights_gib`` is what was
  allocated before.
- ``--shape=libero``: LeRobot's LIBERO inputs, two 224 px cameras and a 48-token prompt (π0's
  ``tokenizer_max_length``), 560 prefix tokens; the tiny models then resize cameras to 256 px, so that
  their 16 px patches give π0's 256 tokens per camera. The critic is each policy type's default (π0:
  expert features). ``--update_epochs`` (reference: 4) and ``--prefix_modes`` set the update: the
  prefix recomputed in every epoch (``recompute``), computed in the first and reused (``update_cache``),
  or kept from the rollout (``rollout``, the trainer's default when it fits); the update's cost per
  sample is per sample and epoch.

Full scale builds π0 at its real widths with random weights (timings do not depend on their values):
PaliGemma 2B + Gemma 300M expert, chunk 50, LeRobot's ``dtype="bfloat16"``. ``precision=mixed``
(default at full scale) keeps the frozen VLM in bf16 and the trained parameters (expert, projections,
LoRA factors) in float32 under bf16 autocast: pure bf16 weights would round away AdamW steps of the
reference learning rate (5e-6). Prints a table, writes JSON after every row, and stops measuring once
``time_limit_s`` is spent (the rest is recorded as skipped).
"""

import functools
import gc
import itertools
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import draccus
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

from lerobot_pirl.adapters.prefix_cache import keep_context
from lerobot_pirl.adapters.registry import make_adapter
from lerobot_pirl.algorithms.config import PPOConfig
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.rl_policy import FlowRLPolicy

PRECISIONS = ("float32", "bfloat16", "mixed")
PREFIX_MODES = ("recompute", "update_cache", "rollout")
UPDATE_CACHE_GIB = {"recompute": 0.0, "update_cache": 64.0, "rollout": 0.0}  # --algorithm.prefix_cache_gib
PALIGEMMA_VOCAB = 257_152  # the real pi0/pi05 vocabulary (token ids are drawn from it)


@dataclass
class VLAGPUConfig:
    scale: str = "full"  # "full" (real widths, random init) | "tiny" (the offline test models)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    policies: list[str] = field(default_factory=lambda: ["pi0"])  # tiny scale also takes pi05, smolvla
    observations: int = 64  # rollout batch = update samples per minibatch
    num_steps: int = 4  # K
    n_action_steps: int = 5  # C
    chunk_size: int = 50  # H (pi0's default)
    shape: str = "one_camera"  # "one_camera" | "libero" (two 224 px cameras, a 48-token prompt)
    cameras: int | None = None  # square cameras; None: 1, or 2 for the LIBERO shape
    image_size: int | None = None  # camera side; None: 224 at full scale and for LIBERO, else 32
    prompt_tokens: int | None = None  # real tokens of the instruction (the rest is padding); None: 24 / 48
    # Tiny scale: the side the model resizes cameras to, and the padded prompt length; None: 32 and the
    # tiny model's own, or 256 and 48 for the LIBERO shape.
    tiny_image_resolution: int | None = None
    tiny_tokenizer_max_length: int | None = None
    update_epochs: int = 1  # epochs over the samples per timed update (reference: 4)
    prefix_modes: list[str] = field(default_factory=lambda: ["recompute"])  # recompute|update_cache|rollout
    micro_batch_sizes: list[int] = field(default_factory=lambda: [16, 32])
    variants: list[str] = field(default_factory=lambda: ["expert", "lora16"])  # "lora<rank>"
    explorations: list[str] = field(default_factory=lambda: ["flow_sde", "flow_noise"])
    precision: str | None = None  # None: "mixed" at full scale, "float32" at tiny scale
    repeats: int = 3
    # Time Flow-SDE and Flow-Noise updates alternately (one call each, `repeats` times) so that a busy
    # shared CPU slows both alike. None: on for CPU, off for CUDA (two live AdamW states would inflate
    # each other's peak memory, and a GPU is not shared).
    interleave: bool | None = None
    time_limit_s: float = 300.0  # stop starting new measurements after this (model build included)
    threads: int = 1  # CPU threads (tiny models are fastest on one)
    seed: int = 0
    output: Path = Path("benchmarks/results/vla_gpu.json")

    def __post_init__(self):
        if self.scale not in ("full", "tiny"):
            raise ValueError(f"--scale must be full or tiny, got {self.scale}")
        if self.precision is None:
            self.precision = "mixed" if self.scale == "full" else "float32"
        if self.shape not in ("one_camera", "libero"):
            raise ValueError(f"--shape must be one_camera or libero, got {self.shape}")
        libero = self.shape == "libero"
        if self.cameras is None:
            self.cameras = 2 if libero else 1
        if self.image_size is None:
            self.image_size = 224 if self.scale == "full" or libero else 32
        if self.prompt_tokens is None:
            self.prompt_tokens = 48 if libero else 24
        if self.tiny_image_resolution is None:
            self.tiny_image_resolution = 256 if libero else 32
        if self.tiny_tokenizer_max_length is None and libero:
            self.tiny_tokenizer_max_length = 48
        if self.interleave is None:
            self.interleave = not self.device.startswith("cuda")
        unknown = set(self.prefix_modes) - set(PREFIX_MODES)
        if unknown:
            raise ValueError(f"--prefix_modes must be among {PREFIX_MODES}, got {sorted(unknown)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}")


# ----------------------------------------------------------------------------------------------------------
# Models and inputs


def camera_keys(cfg: VLAGPUConfig) -> list[str]:
    """One camera keeps the earlier runs' name; several take LeRobot's LIBERO names (image, image2, ...)."""
    if cfg.cameras == 1:
        return ["observation.image"]
    return ["observation.images.image"] + [f"observation.images.image{i + 1}" for i in range(1, cfg.cameras)]


def features(cfg: VLAGPUConfig):
    camera = PolicyFeature(type=FeatureType.VISUAL, shape=(3, cfg.image_size, cfg.image_size))
    inputs = {**dict.fromkeys(camera_keys(cfg), camera), OBS_STATE: PolicyFeature(FeatureType.STATE, (8,))}
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(7,))}
    return inputs, outputs


def build_policy(cfg: VLAGPUConfig, policy_type: str):
    """The LeRobot policy (eval mode, on cfg.device) and its prompt vocabulary size."""
    inputs, outputs = features(cfg)
    bf16_weights = cfg.precision in ("bfloat16", "mixed")
    sizes = dict(chunk_size=cfg.chunk_size, n_action_steps=cfg.n_action_steps, num_steps=cfg.num_steps)
    if cfg.scale == "tiny":
        from lerobot_pirl.testing import tiny_models

        maker = {
            "pi0": tiny_models.make_tiny_pi0,
            "pi05": tiny_models.make_tiny_pi05,
            "smolvla": tiny_models.make_tiny_smolvla,
        }[policy_type]
        extra = {"dtype": "bfloat16"} if bf16_weights and policy_type != "smolvla" else {}
        if cfg.tiny_tokenizer_max_length is not None:
            extra["tokenizer_max_length"] = cfg.tiny_tokenizer_max_length
        policy = maker(
            inputs, outputs, image_resolution=cfg.tiny_image_resolution, device=cfg.device, **sizes, **extra
        ).policy
        vocab = tiny_models.TinyPaliGemmaSizes().vocab_size
    else:
        if policy_type not in ("pi0", "pi05"):
            raise ValueError("full scale builds pi0 or pi05")
        from lerobot.policies.pi0 import PI0Config, PI0Policy
        from lerobot.policies.pi05 import PI05Config, PI05Policy

        config_class, policy_class = {"pi0": (PI0Config, PI0Policy), "pi05": (PI05Config, PI05Policy)}[
            policy_type
        ]
        config = config_class(
            input_features=inputs,
            output_features=outputs,
            chunk_size=cfg.chunk_size,
            n_action_steps=cfg.n_action_steps,
            num_inference_steps=cfg.num_steps,
            dtype="bfloat16" if bf16_weights else "float32",
            device=cfg.device,
            push_to_hub=False,
        )
        with torch.device(cfg.device):  # initialise the 4 B parameters where they live
            policy = policy_class(config)
        vocab = PALIGEMMA_VOCAB
    if bf16_weights and policy_type == "smolvla":
        policy.to(torch.bfloat16)  # smolvla has no dtype option; the trainable part is upcast below
    return policy.to(cfg.device).eval(), vocab


def make_observations(cfg: VLAGPUConfig, policy, vocab: int) -> dict[str, torch.Tensor]:
    """A preprocessed observation batch: images in [0, 1], normalised state, a padded prompt."""
    generator = torch.Generator().manual_seed(cfg.seed)
    n, max_tokens = cfg.observations, policy.config.tokenizer_max_length
    valid = min(cfg.prompt_tokens, max_tokens)
    batch = {
        **{
            key: torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=generator)  # (B, 3, S, S)
            for key in camera_keys(cfg)
        },
        OBS_STATE: torch.rand(n, 8, generator=generator) * 2 - 1,  # (B, 8)
        OBS_LANGUAGE_TOKENS: torch.randint(4, vocab, (n, max_tokens), generator=generator),  # (B, L)
        OBS_LANGUAGE_ATTENTION_MASK: torch.arange(max_tokens).expand(n, max_tokens) < valid,  # (B, L)
    }
    return {key: value.to(cfg.device) for key, value in batch.items()}


def make_rl_policies(cfg: VLAGPUConfig, policy, variant: str) -> tuple[dict[str, FlowRLPolicy], list]:
    """One FlowRLPolicy per exploration over one adapter; returns them and the parameters upcast to fp32."""
    lora_rank = int(variant.removeprefix("lora")) if variant.startswith("lora") else 0
    autocast = torch.bfloat16 if cfg.precision in ("bfloat16", "mixed") else None
    adapter = make_adapter(policy, num_steps=cfg.num_steps, lora_rank=lora_rank, autocast_dtype=autocast)
    upcast = []
    if cfg.precision == "mixed":
        for param in adapter.policy.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                upcast.append(param)
    policy_type = policy.config.type  # its default critic (pi0: expert features)
    rl_policies = {
        exploration: FlowRLPolicy(
            adapter,
            **PPOConfig(exploration=exploration).resolved(policy_type).policy_settings(),
            n_action_steps=cfg.n_action_steps,
        ).to(cfg.device)
        for exploration in cfg.explorations
    }
    return rl_policies, upcast


# ----------------------------------------------------------------------------------------------------------
# Measurements


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def allocated_gib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None


def timed(fn, cfg: VLAGPUConfig) -> tuple[float, dict]:
    """Median seconds of `repeats` calls after one warm-up, and the peak GiB allocated / reserved by
    PyTorch's CUDA allocator during them (reserved is closer to what nvidia-smi shows)."""
    fn()
    sync(cfg.device)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.repeats):
        sync(cfg.device)
        start = time.perf_counter()
        fn()
        sync(cfg.device)
        times.append(time.perf_counter() - start)
    memory = {"peak_gib": None, "peak_reserved_gib": None}
    if cfg.device.startswith("cuda"):
        memory = {
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return sorted(times)[len(times) // 2], memory


def measure_rollout(cfg: VLAGPUConfig, rl_policy: FlowRLPolicy, batch) -> dict:
    rl_policy.eval()
    seconds, memory = timed(lambda: rl_policy.sample(batch, rl_policy.exploration), cfg)
    return {"decisions_per_s": cfg.observations / seconds, "ms_per_call": 1e3 * seconds, **memory}


def update_samples(rl_policy: FlowRLPolicy, batch) -> dict[str, UpdateSamples]:
    """A rollout's samples per prefix mode: chains and log-probs drawn by the policy itself, random
    advantages; for "rollout" with the context the rollout kept (as the trainer's collector keeps it)."""
    rl_policy.eval()
    sample = rl_policy.sample(batch, rl_policy.exploration, generator=None, keep_context=True)
    n = sample.logprob.shape[0]
    generator = torch.Generator().manual_seed(1)
    plain = UpdateSamples(
        observations=dict(batch),
        chains=sample.chain,
        step_index=sample.step_index,
        old_logprobs=sample.logprob,
        old_values=sample.value,
        advantages=torch.randn(n, generator=generator).to(sample.logprob.device),
        returns=torch.randn(n, generator=generator).to(sample.logprob.device),
    )
    kept = plain.replace(observations={**batch, **keep_context(rl_policy.adapter, sample.context)})
    return {"recompute": plain, "update_cache": plain, "rollout": kept}


def update_config(cfg: VLAGPUConfig, rl_policy: FlowRLPolicy, samples, micro: int, mode: str):
    return PPOConfig(
        exploration=rl_policy.exploration,
        update_epochs=cfg.update_epochs,
        minibatch_size=len(samples),
        micro_batch_size=micro,
        prefix_cache_gib=UPDATE_CACHE_GIB[mode],
    ).resolved(rl_policy.policy_type)


def recording(update, last_metrics: dict):
    """`update` that keeps the metrics of its last call (the prefix passes it ran)."""

    def call():
        last_metrics.update(update())

    return call


def per_sample(seconds: float, num_samples: int, epochs: int, metrics: dict) -> dict:
    """Rates per sample and epoch, and the prefix passes per sample of one update."""
    return {
        "samples_per_s": num_samples * epochs / seconds,
        "ms_per_sample": 1e3 * seconds / (num_samples * epochs),
        "prefix_passes_per_sample": metrics.get("update/prefix_passes", 0.0) / num_samples,
    }


def measure_update(
    cfg: VLAGPUConfig, rl_policy: FlowRLPolicy, samples: UpdateSamples, micro: int, mode: str
) -> dict:
    algorithm = update_config(cfg, rl_policy, samples, micro, mode)
    optimizer = make_optimizer(rl_policy, algorithm)
    metrics: dict = {}
    update = functools.partial(policy_update, rl_policy, optimizer, samples, algorithm, cfg.device)
    try:
        seconds, memory = timed(recording(update, metrics), cfg)
    finally:
        optimizer.state.clear()  # the AdamW moments of the trained parameters
        rl_policy.zero_grad(set_to_none=True)
        free_memory(cfg.device)
    return {**per_sample(seconds, len(samples), cfg.update_epochs, metrics), **memory}


def measure_updates_interleaved(
    cfg: VLAGPUConfig,
    rl_policies: dict[str, FlowRLPolicy],
    samples: dict[str, UpdateSamples],
    micro: int,
    mode: str,
) -> dict[str, dict]:
    """`measure_update` for every exploration at once, their calls alternating (CPU; no memory figures)."""
    updates, optimizers, metrics = {}, [], {exploration: {} for exploration in rl_policies}
    for exploration, rl_policy in rl_policies.items():
        algorithm = update_config(cfg, rl_policy, samples[exploration][mode], micro, mode)
        optimizers.append(make_optimizer(rl_policy, algorithm))
        updates[exploration] = recording(
            functools.partial(
                policy_update, rl_policy, optimizers[-1], samples[exploration][mode], algorithm, cfg.device
            ),
            metrics[exploration],
        )
    times: dict[str, list[float]] = {exploration: [] for exploration in updates}
    try:
        for update in updates.values():
            update()  # warm-up: creates the AdamW state
        for _ in range(cfg.repeats):
            for exploration, update in updates.items():
                sync(cfg.device)
                start = time.perf_counter()
                update()
                sync(cfg.device)
                times[exploration].append(time.perf_counter() - start)
    finally:
        for optimizer in optimizers:
            optimizer.state.clear()
        for rl_policy in rl_policies.values():
            rl_policy.zero_grad(set_to_none=True)
        free_memory(cfg.device)
    results = {}
    for exploration, seconds in times.items():
        median = sorted(seconds)[len(seconds) // 2]
        n = len(samples[exploration][mode])
        results[exploration] = per_sample(median, n, cfg.update_epochs, metrics[exploration])
    return results


def interleaved_result(results: dict[str, dict], exploration: str, error: Exception | None) -> dict:
    if error is not None:
        raise error
    return results[exploration]


class Recorder:
    """Collects rows, prints each, rewrites the JSON after every row, enforces the time limit."""

    def __init__(self, cfg: VLAGPUConfig):
        self.cfg = cfg
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        self.meta = {
            "config": json.loads(json.dumps(draccus.encode(cfg), default=str)),
            "machine": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
        }

    def time_left(self) -> bool:
        return time.perf_counter() - self.started < self.cfg.time_limit_s

    def run(self, row: dict, measure, check_time: bool = True) -> None:
        if check_time and not self.time_left():
            row["skipped"] = "time limit"
        else:
            try:
                row.update(measure())
            except Exception as error:  # e.g. out of memory: record it, keep measuring the rest
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                free_memory(self.cfg.device)
        row["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        self.cfg.output.parent.mkdir(parents=True, exist_ok=True)
        summary = sde_vs_noise(self.rows, self.cfg.num_steps)
        self.cfg.output.write_text(
            json.dumps({**self.meta, "rows": self.rows, "sde_vs_noise": summary}, indent=2, default=str)
        )


def sde_vs_noise(rows: list[dict], num_steps: int) -> list[dict]:
    """Flow-SDE / Flow-Noise update cost per sample, per (policy, variant, micro-batch, prefix cache);
    target 1.5/K."""
    updates = {
        (r["policy"], r["variant"], r["micro_batch"], r.get("prefix", "recompute"), r["exploration"]): r
        for r in rows
        if r["kind"] == "update" and "ms_per_sample" in r
    }
    summary = []
    for (policy, variant, micro, prefix, exploration), sde in updates.items():
        noise = updates.get((policy, variant, micro, prefix, "flow_noise"))
        if exploration != "flow_sde" or noise is None:
            continue
        ratio = sde["ms_per_sample"] / noise["ms_per_sample"]
        summary.append(
            {
                "policy": policy,
                "variant": variant,
                "micro_batch": micro,
                "prefix": prefix,
                "prefix_passes_per_sample": sde.get("prefix_passes_per_sample"),
                "sde_ms_per_sample": sde["ms_per_sample"],
                "noise_ms_per_sample": noise["ms_per_sample"],
                "ratio": ratio,
                "target": 1.5 / num_steps,
                "meets_target": ratio <= 1.5 / num_steps,
            }
        )
    return summary


def measure_variant(cfg: VLAGPUConfig, policy_type: str, policy, batch, variant: str, recorder) -> list:
    """Rollout and update rows of one variant; returns the parameters it upcast to float32."""
    rl_policies, upcast = make_rl_policies(cfg, policy, variant)
    adapter = next(iter(rl_policies.values())).adapter
    common = {
        "policy": policy_type,
        "variant": variant,
        "precision": cfg.precision,
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "trainable_M": sum(p.numel() for p in adapter.parameters() if p.requires_grad) / 1e6,
        "trainable_dtypes": sorted({str(p.dtype) for p in adapter.parameters() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in adapter.parameters() if not p.requires_grad}),
        "K": cfg.num_steps,
        "C": cfg.n_action_steps,
        "H": adapter.sizes.chunk_size,
        "observations": cfg.observations,
        "cameras": cfg.cameras,
        "image_size": cfg.image_size,
        "prompt_tokens": cfg.prompt_tokens,
        "update_epochs": cfg.update_epochs,
        "value_features": next(iter(rl_policies.values())).value_features,
    }
    samples = {}
    for exploration, rl_policy in rl_policies.items():
        row = {"kind": "rollout", **common, "exploration": exploration}
        row["weights_gib"] = allocated_gib(cfg.device)
        recorder.run(row, functools.partial(measure_rollout, cfg, rl_policy, batch))
        samples[exploration] = update_samples(rl_policy, batch)
        if cfg.interleave:
            continue
        for micro, mode in itertools.product(cfg.micro_batch_sizes, cfg.prefix_modes):
            row = {"kind": "update", **common, "exploration": exploration, "micro_batch": micro}
            row |= {"prefix": mode, "weights_gib": allocated_gib(cfg.device)}
            sampled = samples[exploration][mode]
            recorder.run(row, functools.partial(measure_update, cfg, rl_policy, sampled, micro, mode))
        samples.pop(exploration)
        free_memory(cfg.device)
    if cfg.interleave:
        for micro, mode in itertools.product(cfg.micro_batch_sizes, cfg.prefix_modes):
            results: dict[str, dict] = {}
            error: Exception | None = None
            if recorder.time_left():
                try:
                    results = measure_updates_interleaved(cfg, rl_policies, samples, micro, mode)
                except Exception as caught:  # recorded on each row below
                    error = caught
            for exploration in rl_policies:
                row = {"kind": "update", **common, "exploration": exploration, "micro_batch": micro}
                row["prefix"] = mode
                measured = functools.partial(interleaved_result, results, exploration, error)
                recorder.run(row, measured, check_time=not results and error is None)
    return upcast


def measure_policy(cfg: VLAGPUConfig, policy_type: str, recorder: Recorder) -> None:
    build_start = time.perf_counter()
    policy, vocab = build_policy(cfg, policy_type)
    batch = make_observations(cfg, policy, vocab)
    sync(cfg.device)
    print(f"built {policy_type} in {time.perf_counter() - build_start:.1f} s", flush=True)
    upcast: list = []
    for variant in cfg.variants:
        for param in upcast:  # the last variant's trained parameters go back to the model dtype
            param.data = param.data.to(torch.bfloat16)
        if not recorder.time_left():
            recorder.run({"kind": "variant", "policy": policy_type, "variant": variant}, dict)
            continue
        upcast = measure_variant(cfg, policy_type, policy, batch, variant, recorder)
        free_memory(cfg.device)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@draccus.wrap()
def main(cfg: VLAGPUConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    recorder = Recorder(cfg)
    print(json.dumps(recorder.meta), flush=True)
    for policy_type in cfg.policies:
        measure_policy(cfg, policy_type, recorder)

    columns = ["kind", "policy", "variant", "exploration", "micro_batch", "prefix"]
    columns += ["decisions_per_s", "samples_per_s", "ms_per_sample", "prefix_passes_per_sample"]
    columns += ["weights_gib", "peak_gib"]
    print("\n" + " | ".join(columns))
    for row in recorder.rows:
        note = row.get("error") or row.get("skipped") or ""
        print(" | ".join(fmt(row.get(column)) for column in columns) + (f" | {note}" if note else ""))
    print("\nFlow-SDE / Flow-Noise update cost per sample (target <= 1.5/K):")
    for entry in sde_vs_noise(recorder.rows, cfg.num_steps):
        print(
            f"  {entry['policy']} {entry['variant']} micro {entry['micro_batch']} "
            f"prefix {entry['prefix']}: "
            f"{entry['sde_ms_per_sample']:.3g} / {entry['noise_ms_per_sample']:.3g} ms "
            f"= {entry['ratio']:.3f} "
            f"(target {entry['target']:.3f}: {'met' if entry['meets_target'] else 'NOT met'})"
        )
    recorder.write()
    print(f"wrote {cfg.output} ({time.perf_counter() - recorder.started:.0f} s)")


if __name__ == "__main__":
    main()
