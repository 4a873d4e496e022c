"""The actor process: load each published version, collect this actor's share with its own envs, upload.

An actor builds the same policy as the learner from `--policy.path` (or the cached few-shot bootstrap),
checks that its frozen weights and rollout settings match the learner's (fingerprint and signature
in every parameters message), and then loops:

    wait for a version it has not collected (a background thread keeps the stream open, reconnecting
    with exponential backoff) -> load its trainable parameters -> reseed: env resets from this actor's
    own seed range of that version, RNGs from its start -> the algorithm's collection (PPO chunks or
    GRPO groups, all inside this actor; advantages are the learner's) -> upload, retrying while the
    learner is unreachable, dropping the rollout once a newer version exists.

A restarted actor simply joins at the version being collected; a restarted (resumed) learner has a
new run id, so every actor collects its current version afresh.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import grpc
from lerobot.envs.utils import close_envs
from lerobot.utils.random_utils import set_seed

from lerobot_pirl.algorithms.base import make_algorithm
from lerobot_pirl.distributed.config import DistributedTrainConfig, rollout_signature
from lerobot_pirl.distributed.payloads import (
    MIB,
    ParametersMessage,
    RolloutMessage,
    frozen_fingerprint,
    load_trainable_state,
)
from lerobot_pirl.distributed.transport import (
    REFUSED,
    LearnerClient,
    LearnerRefusedError,
    ParameterReceiver,
    actor_token,
    refusal_message,
)
from lerobot_pirl.runtime.config import ConfigError
from lerobot_pirl.runtime.envs import episode_reset_hook
from lerobot_pirl.runtime.factory import (
    build_collector,
    build_rl_policy,
    resolve_device,
    resolve_policy_source,
)

logger = logging.getLogger(__name__)

# ABORTED: the learner still holds this actor's previous upload (one that broke off) for a moment.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
)
SUPERSEDED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)


class LearnerLostError(RuntimeError):
    """The learner stayed unreachable for longer than --transport.reconnect_timeout_s."""


@dataclass
class ActorResult:
    versions_uploaded: int = 0
    versions_dropped: int = 0  # collected but superseded or refused
    env_steps: int = 0
    finished: bool = False  # the learner said training is over


class Actor:
    def __init__(self, cfg: DistributedTrainConfig):
        self.cfg = cfg
        self.actor_id = cfg.transport.actor_id
        self.device = resolve_device(cfg.device)
        set_seed(cfg.seed)
        token = actor_token(cfg.transport, timeout_s=cfg.transport.reconnect_timeout_s)
        self.client = LearnerClient(cfg.transport, self.actor_id, token=token)
        if cfg.policy is None:
            # The few-shot bootstrap is trained once and cached; on the learner's machine, wait until the
            # learner (which bootstraps before it serves) has made it instead of training a racing copy.
            self._wait_for_learner()
        policy_path = resolve_policy_source(cfg, None)  # the SFT policy the learner started from
        self.policy, preprocessor, postprocessor = build_rl_policy(cfg, policy_path, self.device)
        self.algorithm = make_algorithm(cfg.algorithm)
        self.fingerprint = frozen_fingerprint(self.policy)
        self.signature = rollout_signature(cfg)
        self.group_reset = functools.partial(episode_reset_hook, cfg.env)
        self.collector, self.envs = build_collector(
            cfg,
            self.policy,
            preprocessor,
            postprocessor,
            num_envs=cfg.rollout.num_envs,
            device=self.device,
            storage_device=cfg.rollout.storage_device,
            num_workers=cfg.rollout.num_workers,
        )
        self.receiver = ParameterReceiver(
            self.client,
            max_bytes=int(cfg.transport.max_parameters_mb * MIB),
            max_backoff_s=cfg.transport.reconnect_max_backoff_s,
        )
        self.result = ActorResult()
        self._stop_event = threading.Event()

    def _wait_for_learner(self) -> None:
        deadline = time.monotonic() + self.cfg.transport.reconnect_timeout_s
        logger.info("waiting for the learner at %s", self.cfg.transport.address)
        while not self.client.ready(timeout=5.0):
            if time.monotonic() > deadline:
                raise LearnerLostError(f"no learner answered at {self.cfg.transport.address}")
            time.sleep(1.0)

    def check_compatible(self, message: ParametersMessage) -> None:
        """Refuse (ConfigError) to collect for a learner whose policy or rollout settings differ."""
        if self.actor_id >= message.num_actors:
            raise ConfigError(
                f"--transport.actor_id={self.actor_id} but the learner expects {message.num_actors} actors "
                f"(ids 0..{message.num_actors - 1})"
            )
        if message.frozen_fingerprint != self.fingerprint:
            raise ConfigError(
                "this actor's policy differs from the learner's (frozen weights or trainable parameter "
                "names): start both from the same --policy.path and --policy_options"
            )
        differing = {
            key: (mine, message.signature.get(key))
            for key, mine in self.signature.items()
            if message.signature.get(key) != mine
        }
        if differing:
            described = ", ".join(f"{k}: actor {a!r} vs learner {b!r}" for k, (a, b) in differing.items())
            raise ConfigError(f"rollout settings differ from the learner's: {described}")

    def next_parameters(self, done_key: tuple[str, int] | None) -> ParametersMessage | None:
        """The newest version not collected yet (None once stopped); raises LearnerLostError after the
        reconnect timeout."""
        while not self._stop_event.is_set():
            message = self.receiver.wait_for_newer(done_key, timeout=1.0)
            if self.receiver.refused is not None:
                raise LearnerRefusedError(self.receiver.refused)
            if message is not None:
                return message
            unreachable = self.client.unreachable_for()
            if unreachable > self.cfg.transport.reconnect_timeout_s:
                raise LearnerLostError(
                    f"the learner at {self.cfg.transport.address} was unreachable for {unreachable:.0f} s"
                )
        return None

    def collect(self, message: ParametersMessage) -> RolloutMessage:
        seed_start = message.seed_starts[self.actor_id]
        self.collector.next_seed = seed_start
        set_seed(seed_start)  # the policy's sampling noise: reproducible per (actor, version)
        logger.info(
            "actor %d collecting version %d of run %s (seeds from %d)",
            self.actor_id,
            message.version,
            message.run_id,
            seed_start,
        )
        started = time.perf_counter()
        batches = self.algorithm.collect(self.collector, self.cfg.rollout, self.group_reset)
        seeds_used = self.collector.next_seed - seed_start
        if seeds_used > message.seed_budget:
            logger.warning(
                "used %d reset seeds, more than the %d of this actor's range: episodes may repeat another "
                "actor's",
                seeds_used,
                message.seed_budget,
            )
        return RolloutMessage(
            run_id=message.run_id,
            version=message.version,
            actor_id=self.actor_id,
            seed_start=seed_start,
            seeds_used=seeds_used,
            batches=batches,
            collect_s=time.perf_counter() - started,
        )

    def upload(self, rollout: RolloutMessage, key: tuple[str, int]) -> bool:
        """Send the rollout; True once the learner accepted it."""
        data = rollout.encode()
        backoff = 0.2
        while True:
            latest = self.receiver.latest
            if latest is not None and latest.key != key:
                logger.info(
                    "version %d was superseded while collecting; dropped its rollout", rollout.version
                )
                return False
            try:
                self.client.upload(data, timeout=self.cfg.transport.upload_timeout_s)
                logger.info(
                    "actor %d uploaded version %d (%d env steps, %.2f MiB)",
                    self.actor_id,
                    rollout.version,
                    rollout.env_steps,
                    len(data) / MIB,
                )
                return True
            except grpc.RpcError as error:
                code = error.code()
                if code in REFUSED:
                    raise LearnerRefusedError(refusal_message(error)) from error
                if code in SUPERSEDED:
                    logger.info(
                        "the learner no longer wants version %d: %s", rollout.version, error.details()
                    )
                    return False
                if code not in RETRYABLE:
                    logger.error("the learner refused the rollout (%s): %s", code.name, error.details())
                    return False
                if self.client.unreachable_for() > self.cfg.transport.reconnect_timeout_s:
                    raise LearnerLostError(
                        f"could not upload version {rollout.version}: {code.name}"
                    ) from error
                logger.warning("upload failed (%s); retrying in %.1f s", code.name, backoff)
                time.sleep(backoff)
                backoff = min(2 * backoff, self.cfg.transport.reconnect_max_backoff_s)

    def run(self) -> ActorResult:
        self.receiver.start()
        hello = {
            "event": "hello",
            "actor_id": self.actor_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.client.send_event(hello, timeout=2.0)
        done_key = None
        try:
            while True:
                message = self.next_parameters(done_key)
                if message is None:  # stop() was called
                    return self.result
                if message.finished:
                    logger.info(
                        "actor %d: the learner finished training at version %d",
                        self.actor_id,
                        message.version,
                    )
                    self.result.finished = True
                    return self.result
                self.check_compatible(message)
                load_trainable_state(self.policy, message.tensors)
                rollout = self.collect(message)
                done_key = message.key
                if self.upload(rollout, message.key):
                    self.result.versions_uploaded += 1
                    self.result.env_steps += rollout.env_steps
                else:
                    self.result.versions_dropped += 1
        finally:
            self.close()

    def stop(self) -> None:
        """Ask `run()` (in another thread) to return before its next version."""
        self._stop_event.set()

    def close(self) -> None:
        self.receiver.stop()
        self.client.close()
        if self.envs is not None:
            close_envs(self.envs)
            self.envs = None
