"""Multi-GPU learner: `torchrun --nproc_per_node=N lerobot-pirl-learner ...` with DDP.

Rank 0 owns the gRPC server, builds the update samples from the actors' rollouts and broadcasts them
(one safetensors blob) to every rank; each rank takes an equal, disjoint shard (the same seeded
permutation everywhere) and runs the ordinary `policy_update` with a policy whose `evaluate` goes
through DistributedDataParallel, so gradients of the trainable parameters are averaged across ranks
before clipping and the optimiser step, and parameters stay identical on every rank.

Why the result equals the single-process update: advantages are normalised once over the whole
batch (not per shard), the loss weights were scaled to mean 1 over the whole batch when it was built,
each rank's minibatch is minibatch_size / N, and DDP's gradient average of N equal shard means is the
mean over the global minibatch. With one minibatch per epoch it is the same
update up to float summation order; with several, the same algorithm on differently drawn minibatches.

Shape legend
    M  decisions of one update (all actors), M_r = floor(M / N) per rank; N ranks
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lerobot_pirl.algorithms.config import AlgorithmConfig
from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.algorithms.update import policy_update, standardized_advantages
from lerobot_pirl.distributed.payloads import decode_payload, encode_payload
from lerobot_pirl.rl_policy import FlowRLPolicy, PolicyEvaluation

logger = logging.getLogger(__name__)

SAMPLES_KIND = "update_samples"
# Commands rank 0 broadcasts before each update.
STOP, UPDATE, SKIP = 0, 1, 2
# Metrics that are means over samples: averaged over ranks (equal shards) for the log.
MEAN_METRICS = (
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/approx_kl_k1",
    "losses/clipfrac",
    "losses/clipfrac_active",
    "losses/value_loss",
    "losses/explained_variance",
    "policy/logprob_mean",
    "policy/noise_std",
    "grad/actor_norm",
    "grad/critic_norm",
)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def communication_device(self, device: torch.device) -> torch.device:
        return device if self.backend == "nccl" else torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs).

    Returns the context and the device of this rank (cuda:LOCAL_RANK on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    logger.info("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return DistContext(rank, world_size, local_rank, backend), device


def close_distributed(ctx: DistContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---- moving the batch ---------------------------------------------------------------------------------


def encode_samples(samples: UpdateSamples) -> bytes:
    samples = samples.compacted()  # the rows in use only
    tensors = {name: getattr(samples, name) for name in UpdateSamples.tensor_fields()}
    tensors.update({f"observations/{k}": v for k, v in samples.observations.items()})
    return encode_payload(tensors, {"kind": SAMPLES_KIND})


def decode_samples(data: bytes) -> UpdateSamples:
    tensors, _ = decode_payload(data, max_bytes=len(data), kind=SAMPLES_KIND)
    prefix = "observations/"
    return UpdateSamples(
        observations={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
        **{name: tensors[name] for name in UpdateSamples.tensor_fields()},
    )


def broadcast_command(
    ctx: DistContext, device: torch.device, command: int = STOP, samples: UpdateSamples | None = None
) -> tuple[int, UpdateSamples | None]:
    """Rank 0 sends (command, samples) to every rank; the others pass nothing and get them back."""
    comm_device = ctx.communication_device(device)
    data = encode_samples(samples) if ctx.is_main and command == UPDATE else b""
    header = torch.tensor([command, len(data)], dtype=torch.int64, device=comm_device)  # (2,)
    dist.broadcast(header, src=0)
    command, size = int(header[0]), int(header[1])
    if command != UPDATE:
        return command, None
    if ctx.is_main:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(comm_device)  # (bytes,)
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=comm_device)  # (bytes,)
    dist.broadcast(buffer, src=0)
    if ctx.is_main:
        return command, samples
    return command, decode_samples(buffer.cpu().numpy().tobytes())


# ---- the update -----------------------------------------------------------------------------------------


def normalize_advantages_globally(
    samples: UpdateSamples, cfg: AlgorithmConfig
) -> tuple[UpdateSamples, AlgorithmConfig]:
    """Normalise over the whole batch (policy_update's formula) and switch its per-shard normalisation off."""
    if not cfg.normalize_advantages or len(samples) <= 1:
        return samples, cfg
    return standardized_advantages(samples, cfg), dataclasses.replace(cfg, normalize_advantages=False)


def shard_samples(samples: UpdateSamples, ctx: DistContext, generator: torch.Generator) -> UpdateSamples:
    """This rank's M_r samples: every rank draws the same permutation and takes every N-th entry
    (M mod N samples are left out: unequal shards would make DDP's collective calls mismatch)."""
    order = torch.randperm(len(samples), generator=generator)  # (M,)
    usable = len(samples) - len(samples) % ctx.world_size
    if usable < len(samples):
        logger.debug("left %d of %d samples out to shard evenly", len(samples) - usable, len(samples))
    return samples.select(order[:usable][ctx.rank :: ctx.world_size], "cpu", expand=False)


class _Evaluate(nn.Module):
    """FlowRLPolicy.evaluate as a forward(), which is what DDP hooks."""

    def __init__(self, policy: FlowRLPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, observations: dict[str, Tensor], chains: Tensor, step_index: Tensor, context=None):
        evaluation = self.policy.evaluate(observations, chains, step_index, context=context)
        return evaluation.logprob, evaluation.entropy, evaluation.value, evaluation.noise_std


class DDPPolicy:
    """Stands in for a FlowRLPolicy inside `policy_update`: `evaluate` runs through DDP (gradient
    all-reduce), everything else is the wrapped policy's."""

    def __init__(self, policy: FlowRLPolicy, device: torch.device, find_unused_parameters: bool):
        self.policy = policy
        self.ddp = DistributedDataParallel(
            _Evaluate(policy),
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the policy's buffers (time grid, action mask) are constants
            find_unused_parameters=find_unused_parameters,
        )

    def evaluate(
        self, observations: dict[str, Tensor], chains: Tensor, step_index: Tensor, context=None
    ) -> PolicyEvaluation:
        return PolicyEvaluation(*self.ddp(observations, chains, step_index, context=context))

    def __getattr__(self, name: str):
        return getattr(self.policy, name)


def average_metrics(metrics: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Rank 0's metrics with the per-sample means averaged over ranks and the sample count summed."""
    keys = [k for k in MEAN_METRICS if k in metrics]
    values = [metrics[k] for k in keys] + [metrics.get("update/num_samples", 0.0)]
    reduced = torch.tensor(
        values, dtype=torch.float64, device=ctx.communication_device(device)
    )  # (len(keys)+1,)
    dist.all_reduce(reduced)
    averaged = dict(metrics)
    for i, key in enumerate(keys):
        averaged[key] = float(reduced[i]) / ctx.world_size
    averaged["update/num_samples"] = float(reduced[-1])
    averaged["dist/world_size"] = float(ctx.world_size)
    return averaged


def distributed_policy_update(
    policy: DDPPolicy,
    optimizer: torch.optim.Optimizer,
    samples: UpdateSamples,
    cfg: AlgorithmConfig,
    device: torch.device,
    generator: torch.Generator,
    ctx: DistContext,
) -> dict[str, float]:
    """policy_update over this rank's shard with DDP; call it on every rank with the same samples,
    config and generator seed."""
    samples, cfg = normalize_advantages_globally(samples, cfg)
    shard = shard_samples(samples, ctx, generator)
    local_cfg = dataclasses.replace(cfg, minibatch_size=max(1, cfg.minibatch_size // ctx.world_size))
    metrics = policy_update(policy, optimizer, shard, local_cfg, device, generator)
    return average_metrics(metrics, ctx, device)
