"""What learner and actors send each other: safetensors tensors + JSON metadata (never pickle).

Every payload is one safetensors file in memory; its `__metadata__` holds one JSON document under
`lerobot_pirl` with the protocol number and the message kind. Decoding never runs code from the
payload: safetensors reads raw tensor bytes and checks offsets, the JSON is checked field by field,
and a rollout is checked against what the learner expects (shapes, dtypes, index ranges, finite
values of sane magnitude) before anything else sees it. Every failure is a PayloadError.

Messages
    parameters (learner -> every actor)   tensors: the trainable parameters of FlowRLPolicy by name
        (action expert / LoRA / whole policy as configured, plus noise and value heads);
        metadata: run_id, version, num_actors, seed_starts[actor], seed_budget, frozen_fingerprint,
        signature (the rollout settings actors must share), finished.
    rollout (actor -> learner)            tensors: `<b>/<field>` and `<b>/observations/<key>` for each
        RolloutBatch b the actor collected for this version (1 for PPO, episodes_per_env for GRPO);
        metadata: run_id, version, actor_id, seed_start, seeds_used, env_steps and extras of each
        batch, episode statistics, collect_s.

Shape legend (rollouts, see rollout/batch.py)
    T  decisions per env, N envs of one actor, E episodes of one batch
    K  denoising steps, H chunk_size, A model action width
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from lerobot_pirl.rollout.batch import PER_DECISION_DTYPES, PER_EPISODE_DTYPES, TENSOR_FIELDS, RolloutBatch

PROTOCOL = 1
METADATA_KEY = "lerobot_pirl"
PARAMETERS_KIND = "parameters"
ROLLOUT_KIND = "rollout"
# A safetensors header describes tensors, it does not hold them; anything this large is hostile.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MIB = 1024 * 1024

# Why a payload was refused; the server maps each to a gRPC status code.
MALFORMED = "malformed"
TOO_LARGE = "too_large"
STALE = "stale"  # for a version or learner run that is not the current one
DUPLICATE = "duplicate"
UNKNOWN_ACTOR = "unknown_actor"


class PayloadError(ValueError):
    """A payload that is malformed, too large, or not for the current run and version."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- the container ----------------------------------------------------------------------------------


def encode_payload(tensors: dict[str, Tensor], metadata: dict[str, Any]) -> bytes:
    """One safetensors blob; `metadata` (JSON-serialisable) travels in its header."""
    document = json.dumps({"protocol": PROTOCOL, **metadata}, separators=(",", ":"), allow_nan=False)
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors_save(cpu_tensors, metadata={METADATA_KEY: document})


def _read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON document of a payload's header, read without touching the tensor bytes."""
    if len(data) < 8:
        raise PayloadError(MALFORMED, f"payload of {len(data)} bytes is shorter than a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise PayloadError(MALFORMED, f"safetensors header of {header_size} bytes does not fit the payload")
    try:
        header = json.loads(data[8 : 8 + header_size])
        document = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise PayloadError(MALFORMED, f"payload header is not lerobot-pirl metadata ({error!r})") from error
    if not isinstance(document, dict):
        raise PayloadError(MALFORMED, "payload metadata is not a JSON object")
    if document.get("protocol") != PROTOCOL:
        raise PayloadError(
            MALFORMED, f"protocol {document.get('protocol')!r} is not this version's ({PROTOCOL})"
        )
    return document


def decode_payload(data: bytes, max_bytes: int, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a payload of `kind`; PayloadError for anything else."""
    if len(data) > max_bytes:
        raise PayloadError(
            TOO_LARGE, f"payload of {len(data) / MIB:.1f} MiB exceeds {max_bytes / MIB:.1f} MiB"
        )
    metadata = _read_metadata(data)
    if metadata.get("kind") != kind:
        raise PayloadError(MALFORMED, f"expected a {kind} payload, got {metadata.get('kind')!r}")
    try:
        tensors = safetensors_load(bytes(data))
    except Exception as error:  # safetensors raises its own SafetensorError for every malformed input
        raise PayloadError(MALFORMED, f"tensor data is not valid safetensors ({error})") from error
    return tensors, metadata


# ---- metadata fields ----------------------------------------------------------------------------------


def _get(metadata: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = metadata.get(name)
    # bool is an int in Python; a flag where a count belongs (or the reverse) is malformed all the same.
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in (kind if isinstance(kind, tuple) else (kind,))) or not isinstance(
        value, kind
    ):
        raise PayloadError(MALFORMED, f"metadata field {name!r} must be {kind}, got {value!r:.80}")
    return value


def _int_list(metadata: dict[str, Any], name: str) -> list[int]:
    values = _get(metadata, name, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PayloadError(MALFORMED, f"metadata field {name!r} must be a list of integers")
    return values


def _float_dict(value: Any, name: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise PayloadError(MALFORMED, f"metadata field {name!r} must map names to numbers")
    return {k: float(v) for k, v in value.items()}


# ---- parameters ---------------------------------------------------------------------------------------


def trainable_state(policy: torch.nn.Module) -> dict[str, Tensor]:
    """What changes during RL: the parameters that require grad (adapter, noise head, value head)."""
    return {name: p for name, p in policy.named_parameters() if p.requires_grad}


def frozen_fingerprint(policy: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A hash of what the actors must already hold: the frozen parameters (a strided sample of each, cheap
    even for a VLA) and the names, shapes and dtypes of the trainable ones."""
    digest = hashlib.sha256()
    for name, p in policy.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
        if not p.requires_grad and p.numel() > 0:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor]
            digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class ParametersMessage:
    run_id: str  # changes every time a learner process starts (a resumed learner is a new run id)
    version: int  # = the learner's completed iterations
    num_actors: int
    seed_starts: list[int]  # first reset seed of each actor's rollout of this version
    seed_budget: int  # seeds each actor may draw: [seed_starts[a], seed_starts[a] + seed_budget)
    frozen_fingerprint: str
    signature: dict[str, Any]  # rollout settings learner and actors must share
    finished: bool = False  # training is over: actors exit
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.version)

    def encode(self) -> bytes:
        metadata = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tensors"}
        return encode_payload(self.tensors, {"kind": PARAMETERS_KIND, **metadata})

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> ParametersMessage:
        tensors, metadata = decode_payload(data, max_bytes, PARAMETERS_KIND)
        message = cls(
            run_id=_get(metadata, "run_id", str),
            version=_get(metadata, "version", int),
            num_actors=_get(metadata, "num_actors", int),
            seed_starts=_int_list(metadata, "seed_starts"),
            seed_budget=_get(metadata, "seed_budget", int),
            frozen_fingerprint=_get(metadata, "frozen_fingerprint", str),
            signature=_get(metadata, "signature", dict),
            finished=_get(metadata, "finished", bool),
            tensors=tensors,
        )
        if message.version < 0 or message.num_actors < 1 or len(message.seed_starts) != message.num_actors:
            raise PayloadError(MALFORMED, "parameters metadata: bad version, num_actors or seed_starts")
        return message


def load_trainable_state(policy: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy received parameters into `policy`; the names, shapes and dtypes must match exactly."""
    own = trainable_state(policy)
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise PayloadError(
            MALFORMED, f"parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, param in own.items():
            value = tensors[name]
            if value.shape != param.shape or value.dtype != param.dtype:
                raise PayloadError(
                    MALFORMED,
                    f"parameter {name}: got {tuple(value.shape)} {value.dtype}, "
                    f"expected {tuple(param.shape)} {param.dtype}",
                )
            param.copy_(value)


# ---- rollouts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutSpec:
    """What the learner expects of every actor batch (from its own policy and one probe observation)."""

    num_envs: int  # N
    num_steps: int  # K
    chunk_size: int  # H
    action_dim: int  # A
    num_batches: int  # 1 (PPO) or episodes_per_env (GRPO)
    observations: dict[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (per-decision shape, dtype)

    def check(self, batch: RolloutBatch, index: int) -> None:
        where = f"batch {index}"
        steps, envs = batch.mask.shape
        if envs != self.num_envs:
            raise PayloadError(MALFORMED, f"{where}: {envs} envs, the learner expects {self.num_envs}")
        chain_shape = (steps, envs, self.num_steps + 1, self.chunk_size, self.action_dim)
        if tuple(batch.chains.shape) != chain_shape:
            raise PayloadError(
                MALFORMED, f"{where}: chains {tuple(batch.chains.shape)}, expected {chain_shape}"
            )
        if set(batch.observations) != set(self.observations):
            raise PayloadError(
                MALFORMED,
                f"{where}: observations {sorted(batch.observations)}, expected {sorted(self.observations)}",
            )
        for key, (shape, dtype) in self.observations.items():
            value = batch.observations[key]
            if tuple(value.shape) != (steps, envs, *shape) or value.dtype != dtype:
                raise PayloadError(
                    MALFORMED,
                    f"{where}: {key} is {tuple(value.shape)} {value.dtype}, "
                    f"expected {(steps, envs, *shape)} {dtype}",
                )
        if ((batch.step_index < 0) | (batch.step_index >= self.num_steps)).any():
            raise PayloadError(MALFORMED, f"{where}: step_index outside [0, {self.num_steps})")


# The largest magnitude a rollout value may have (issue 17: a log-prob of -1e38 was trained on). Chains
# live in the policy's normalised action space, log-probs are means of sums of C x D Gaussian terms,
# rewards and values are scaled returns: what a working policy produces stays orders of magnitude below.
MAX_ROLLOUT_MAGNITUDE = 1e6


def within_magnitude(tensor: Tensor, limit: float = MAX_ROLLOUT_MAGNITUDE) -> bool:
    """Every value of `tensor` finite and within [-limit, limit]: one min/max pass, and a NaN anywhere
    makes the min and max NaN, which fails both comparisons. Integer tensors always pass."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    # Compared in float32: as a float16 scalar, the limit 1e6 would itself round to inf.
    return bool(low.float() >= -limit) and bool(high.float() <= limit)


def _check_structure(batch: RolloutBatch, index: int) -> None:
    """Shapes and dtypes agree with RolloutBatch's contract, indices are in range, floats are finite and
    within MAX_ROLLOUT_MAGNITUDE."""
    where = f"batch {index}"
    if batch.chains.ndim != 5 or batch.chains.dtype != torch.float32:  # what FlowRLPolicy.sample makes
        raise PayloadError(MALFORMED, f"{where}: chains must be a float32 (T, N, K+1, H, A) tensor")
    steps, envs = batch.chains.shape[:2]
    if steps < 1 or envs < 1:
        raise PayloadError(MALFORMED, f"{where}: empty rollout")
    for name, dtype in PER_DECISION_DTYPES.items():
        value = getattr(batch, name)
        if tuple(value.shape) != (steps, envs) or value.dtype != dtype:
            raise PayloadError(MALFORMED, f"{where}: {name} must be ({steps}, {envs}) {dtype}")
    num_episodes = batch.episode_returns.shape[0] if batch.episode_returns.ndim == 1 else -1
    for name, dtype in PER_EPISODE_DTYPES.items():
        value = getattr(batch, name)
        if value.ndim != 1 or value.shape[0] != num_episodes or value.dtype != dtype:
            raise PayloadError(MALFORMED, f"{where}: {name} must be ({num_episodes},) {dtype}")
    index_ok = (batch.episode_index >= -1) & (batch.episode_index < num_episodes)
    if not bool(index_ok.all()) or bool((batch.mask & (batch.episode_index < 0)).any()):
        raise PayloadError(MALFORMED, f"{where}: episode_index out of range")
    if bool((batch.episode_lengths < 0).any()):
        raise PayloadError(MALFORMED, f"{where}: negative episode length")
    if bool((batch.episode_task < 0).any()):
        raise PayloadError(MALFORMED, f"{where}: negative episode task")
    outside = f"NaN, inf or a magnitude above {MAX_ROLLOUT_MAGNITUDE:g}"
    for name in ("chains", "logprobs", "values", "rewards", "next_values", "episode_returns"):
        if not within_magnitude(getattr(batch, name)):
            raise PayloadError(MALFORMED, f"{where}: {name} holds {outside}")
    for key, value in batch.observations.items():
        if value.ndim < 2 or tuple(value.shape[:2]) != (steps, envs):
            raise PayloadError(MALFORMED, f"{where}: observation {key} must start with ({steps}, {envs})")
        if not within_magnitude(value):
            raise PayloadError(MALFORMED, f"{where}: observation {key} holds {outside}")
    if batch.env_steps < 0:
        raise PayloadError(MALFORMED, f"{where}: negative env_steps")


@dataclass
class RolloutMessage:
    run_id: str
    version: int
    actor_id: int
    seed_start: int
    seeds_used: int  # reset seeds the rollout drew, from seed_start on
    batches: list[RolloutBatch]
    collect_s: float = 0.0

    @property
    def env_steps(self) -> int:
        return sum(b.env_steps for b in self.batches)

    def episode_statistics(self) -> dict[str, float]:
        done = torch.cat([b.episode_done for b in self.batches])
        returns = torch.cat([b.episode_returns for b in self.batches])[done]
        successes = torch.cat([b.episode_success for b in self.batches])[done]
        return {
            "episodes": float(done.sum()),
            "successes": float(successes.sum()),
            "mean_return": float(returns.mean()) if done.any() else 0.0,
        }

    def encode(self) -> bytes:
        tensors: dict[str, Tensor] = {}
        for b, batch in enumerate(self.batches):
            for name in TENSOR_FIELDS:
                tensors[f"{b}/{name}"] = getattr(batch, name)
            for key, value in batch.observations.items():
                tensors[f"{b}/observations/{key}"] = value
        metadata = {
            "kind": ROLLOUT_KIND,
            "run_id": self.run_id,
            "version": self.version,
            "actor_id": self.actor_id,
            "seed_start": self.seed_start,
            "seeds_used": self.seeds_used,
            "num_batches": len(self.batches),
            "batch_env_steps": [b.env_steps for b in self.batches],
            "batch_extras": [dict(b.extras) for b in self.batches],
            "episodes": self.episode_statistics(),
            "collect_s": self.collect_s,
        }
        return encode_payload(tensors, metadata)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int, spec: RolloutSpec | None = None) -> RolloutMessage:
        tensors, metadata = decode_payload(data, max_bytes, ROLLOUT_KIND)
        num_batches = _get(metadata, "num_batches", int)
        env_steps = _int_list(metadata, "batch_env_steps")
        extras = _get(metadata, "batch_extras", list)
        if not 1 <= num_batches <= 1024 or len(env_steps) != num_batches or len(extras) != num_batches:
            raise PayloadError(MALFORMED, "rollout metadata: num_batches does not match its lists")
        if spec is not None and num_batches != spec.num_batches:
            raise PayloadError(MALFORMED, f"{num_batches} batches, the learner expects {spec.num_batches}")
        collect_s = _get(metadata, "collect_s", (int, float))
        if not math.isfinite(collect_s):
            raise PayloadError(MALFORMED, "collect_s must be finite")
        expected_names = set()
        batches = []
        for b in range(num_batches):
            names = {f"{b}/{name}" for name in TENSOR_FIELDS}
            missing = sorted(n for n in names if n not in tensors)
            if missing:
                raise PayloadError(MALFORMED, f"rollout lacks tensors {missing[:5]}")
            prefix = f"{b}/observations/"
            observations = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            expected_names |= names | {prefix + key for key in observations}
            batch = RolloutBatch(
                observations=observations,
                **{name: tensors[f"{b}/{name}"] for name in TENSOR_FIELDS},
                env_steps=env_steps[b],
                extras=_float_dict(extras[b], "batch_extras"),
            )
            _check_structure(batch, b)
            if spec is not None:
                spec.check(batch, b)
            batches.append(batch)
        unexpected = sorted(set(tensors) - expected_names)
        if unexpected:
            raise PayloadError(MALFORMED, f"rollout holds unexpected tensors {unexpected[:5]}")
        message = cls(
            run_id=_get(metadata, "run_id", str),
            version=_get(metadata, "version", int),
            actor_id=_get(metadata, "actor_id", int),
            seed_start=_get(metadata, "seed_start", int),
            seeds_used=_get(metadata, "seeds_used", int),
            batches=batches,
            collect_s=float(collect_s),
        )
        if message.version < 0 or message.actor_id < 0 or message.seeds_used < 0:
            raise PayloadError(MALFORMED, "rollout metadata: negative version, actor_id or seeds_used")
        return message
