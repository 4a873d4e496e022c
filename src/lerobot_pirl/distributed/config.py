"""`lerobot-pirl-learner` / `lerobot-pirl-actor` configuration: the trainer's flags plus `--transport.*`.

    lerobot-pirl-learner --policy.path=<sft> --env.type=metaworld_state --env.task=push-v3 \
        --transport.num_actors=2 --output_dir=outputs/push
    lerobot-pirl-actor   --policy.path=<sft> --env.type=metaworld_state --env.task=push-v3 \
        --transport.actor_id=0

Both processes take the SAME training flags (policy, env, algorithm, rollout, seed): the learner checks
at connection time that an actor's rollout settings match its own and the actor refuses otherwise.
`--rollout.num_envs` is per actor: one iteration collects num_actors × num_envs × decisions_per_env
decisions (PPO) or num_actors × num_envs × episodes_per_env episodes (GRPO).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lerobot_pirl.runtime.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

# The run's shared secret, presented by every actor in gRPC metadata. Given by this variable or by
# --transport.token_file (a secret in neither shell history nor `ps`); else the learner makes one per run.
TOKEN_ENV = "LEROBOT_PIRL_TOKEN"
TOKEN_FILE = "transport_token"  # in the learner's output dir, mode 0600


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class TransportConfig:
    # Where the learner listens / the actors connect. Loopback by default: serving other machines is
    # an explicit choice, and then TLS (tls_cert/tls_key on the learner, tls_ca on actors) should be on.
    host: str = "127.0.0.1"
    port: int = 50051  # learner: 0 picks a free port (logged)
    num_actors: int = 1  # learner: actors whose rollouts form one update batch (ids 0..num_actors-1)
    actor_id: int = 0  # actor: its id, which also selects its disjoint episode-seed stream

    # Learner: after the first rollout of a version arrives, wait this long for the other actors, then
    # update with what arrived (and log who is missing). A lost actor only costs this much per version.
    straggler_timeout_s: float = 600.0
    # Actor: give up (exit 1) after the learner has been unreachable for this long; retries back off
    # exponentially up to reconnect_max_backoff_s in between.
    reconnect_timeout_s: float = 600.0
    reconnect_max_backoff_s: float = 10.0
    upload_timeout_s: float = 600.0  # actor: deadline of one rollout upload

    # Payload limits (MiB). The learner refuses bigger rollout uploads; the actor bigger parameter
    # payloads (raise it when training a whole VLA: its fp32 weights alone are ~12 GB).
    max_upload_mb: float = 2048.0
    max_parameters_mb: float = 16384.0

    # TLS for remote actors (PEM files). Learner: its certificate chain and private key. Actor: the
    # root certificate to trust (the learner's own certificate when self-signed); `tls` alone trusts
    # the system roots. tls_server_name overrides the name checked against the certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls: bool = False
    tls_server_name: str | None = None
    # Serving or reaching a host beyond loopback without TLS exposes the parameters, the token and the
    # rollouts to the network: refused unless this is set.
    insecure: bool = False
    # The run's token. Learner: read it from this file instead of making one (default: $LEROBOT_PIRL_TOKEN,
    # else <output_dir>/transport_token, made at the first start). Actor: the token to present (the
    # learner logs the flag to pass); waited for while the learner has not written it yet.
    token_file: Path | None = None

    # Multi-GPU learner (torchrun): how long non-zero ranks may wait for rank 0 (which waits for
    # actors, evaluates and checkpoints) before torch.distributed gives up.
    dist_timeout_s: float = 7200.0
    # DDP must know whether some trainable parameters get no gradient (VLAs may hold such); finding
    # them costs one autograd-graph walk per micro-batch, small next to a VLA forward.
    ddp_find_unused_parameters: bool = True

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def learner_uses_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def actor_uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None

    def check(self, role: str) -> None:
        """Refuse bad values (ConfigError) for the `learner` or an `actor` before anything starts."""
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--transport.port must be in 0..65535, got {self.port}")
        if self.num_actors < 1:
            raise ConfigError(f"--transport.num_actors must be >= 1, got {self.num_actors}")
        if self.actor_id < 0:
            raise ConfigError(f"--transport.actor_id must be >= 0, got {self.actor_id}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--transport.tls_cert and --transport.tls_key go together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--transport.{name}={path} is not a file")
        for name in ("straggler_timeout_s", "reconnect_timeout_s", "upload_timeout_s", "dist_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--transport.{name} must be > 0")
        if min(self.max_upload_mb, self.max_parameters_mb) <= 0:
            raise ConfigError("--transport.max_upload_mb and max_parameters_mb must be > 0")
        encrypted = self.learner_uses_tls if role == "learner" else self.actor_uses_tls
        if not (is_loopback(self.host) or encrypted or self.insecure):
            tls_flags = (
                "--transport.tls_cert/--transport.tls_key" if role == "learner" else "--transport.tls_ca"
            )
            raise ConfigError(
                f"--transport.host={self.host} is beyond this machine and the link is not encrypted: set "
                f"{tls_flags}, or --transport.insecure=true on a network you trust"
            )
        if role == "learner" and self.token_file is not None and not Path(self.token_file).is_file():
            raise ConfigError(f"--transport.token_file={self.token_file} is not a file")


@dataclass
class DistributedTrainConfig(TrainConfig):
    """TrainConfig (every `lerobot-pirl-train` flag, `--policy.path` included) + `--transport.*`."""

    transport: TransportConfig = field(default_factory=TransportConfig)

    def validate(self, role: str = "learner") -> None:
        super().validate()
        self.transport.check(role)


def rollout_signature(cfg: TrainConfig) -> dict[str, object]:
    """The settings learner and actors must share: a mismatch makes rollouts the learner cannot use."""
    policy = cfg.policy
    return {
        "env_type": cfg.env.type,
        "env_task": str(getattr(cfg.env, "task", "")),
        "policy_type": policy.type if policy is not None else "flow_mlp",
        "algorithm": cfg.algorithm.type,
        "exploration": cfg.algorithm.exploration,
        "noise_level": cfg.algorithm.noise_level,
        "group_size": getattr(cfg.algorithm, "group_size", 0),
        "num_envs": cfg.rollout.num_envs,
        "decisions_per_env": cfg.rollout.decisions_per_env,
        "episodes_per_env": cfg.rollout.episodes_per_env,
        "n_action_steps": cfg.rollout.n_action_steps,
        "num_inference_steps": cfg.rollout.num_inference_steps,
        "sparse_reward": cfg.rollout.sparse_reward,
        "end_on_success": cfg.rollout.end_on_success,
        "rename_map": dict(cfg.rename_map),  # which env camera the policy reads as which
    }
