"""The learner process: the trainer's loop with the actors as its batch source.

One iteration (version v = completed iterations):
    1. publish v: the trainable parameters + each actor's seed range (payloads.ParametersMessage);
    2. wait for every actor's rollout of v, or `straggler_timeout_s` after the first arrived; then go on
       with what arrived and log who is missing;
    3. advantages per actor batch (GAE runs per env, GRPO groups never cross actors), in actor order,
       update (DDP across ranks under torchrun), publish v+1 — then evaluate and checkpoint like the
       trainer while the actors already collect v+1.
Set-up, evaluation, checkpoints (LeRobot layout, crash-safe), metrics and budget are the trainer's own
(`Trainer` with `ActorServer` as its source and `LearnerUpdate` as its update). `--resume=true` continues
from the last checkpoint with the same version numbers and seed ranges, under a new run id so actors
collect afresh.

Determinism: the update's minibatch order comes from a generator seeded with (seed, iteration), and
each actor seeds its RNGs with its seed range's start, so a run is reproducible whatever the timing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from pathlib import Path

import torch

from lerobot_pirl.algorithms.samples import UpdateSamples
from lerobot_pirl.algorithms.update import policy_update
from lerobot_pirl.distributed.config import DistributedTrainConfig, rollout_signature
from lerobot_pirl.distributed.ddp import (
    SKIP,
    STOP,
    UPDATE,
    DDPPolicy,
    DistContext,
    broadcast_command,
    close_distributed,
    distributed_policy_update,
    init_distributed,
)
from lerobot_pirl.distributed.payloads import (
    MIB,
    ParametersMessage,
    RolloutMessage,
    RolloutSpec,
    frozen_fingerprint,
    trainable_state,
)
from lerobot_pirl.distributed.transport import (
    LearnerServicer,
    ParameterBoard,
    RolloutBoard,
    learner_token,
    start_learner_server,
)
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.runtime.config import ConfigError
from lerobot_pirl.runtime.factory import resolve_device, resolve_policy_source
from lerobot_pirl.runtime.trainer import Collected, Trainer, TrainResult

logger = logging.getLogger(__name__)

# How long the learner waits, once training is over, for the actors' streams to deliver "finished".
FINISH_GRACE_S = 5.0


def update_generator(seed: int, iteration: int) -> torch.Generator:
    """The minibatch order of update `iteration`: fixed by the run's seed, whatever happened before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


class ActorServer:
    """The learner's BatchSource: serves policy versions over gRPC and gathers the actors' rollouts."""

    def __init__(self, trainer: Trainer, dist: DistContext):
        cfg: DistributedTrainConfig = trainer.cfg
        self.trainer, self.dist, self.transport = trainer, dist, cfg.transport
        self.fingerprint = frozen_fingerprint(trainer.policy)
        self.run_id = uuid.uuid4().hex[:12]
        self.seed_budget = trainer.algorithm.seed_budget(cfg.rollout)
        self.signature = rollout_signature(cfg)
        self.stop_event = threading.Event()
        self.parameters = ParameterBoard()
        self.rollouts = RolloutBoard()
        token, token_flag = learner_token(self.transport, trainer.output_dir)
        self.servicer = LearnerServicer(
            self.parameters,
            self.rollouts,
            self._rollout_spec(),
            max_upload_bytes=int(self.transport.max_upload_mb * MIB),
            token=token,
            num_actors=self.transport.num_actors,
            upload_timeout_s=self.transport.upload_timeout_s,
        )
        self.server, self.port = start_learner_server(self.transport, self.servicer)
        logger.info("actors connect with: --transport.port=%d and the run's token: %s", self.port, token_flag)

    def _rollout_spec(self) -> RolloutSpec:
        """What every actor batch must look like: this policy's sizes and one real observation's
        preprocessed tensors (from an eval env, through the same processors as the actors')."""
        trainer, rollout = self.trainer, self.trainer.cfg.rollout
        sizes = trainer.policy.adapter.sizes
        with trainer.evaluation_collector() as collector, torch.no_grad():
            observation = collector.reset([trainer.cfg.eval.seed + i for i in range(collector.num_envs)])
            inputs = ChunkCollector._storable(collector.policy_inputs(observation))
        return RolloutSpec(
            num_envs=rollout.num_envs,
            num_steps=sizes.num_steps,
            chunk_size=sizes.chunk_size,
            action_dim=sizes.action_dim,
            num_batches=trainer.algorithm.batches_per_rollout(rollout),
            observations={k: (tuple(v.shape[1:]), v.dtype) for k, v in inputs.items()},
        )

    def seed_starts(self) -> list[int]:
        start = self.trainer.state.next_env_seed
        return [start + a * self.seed_budget for a in range(self.transport.num_actors)]

    def publish(self, finished: bool = False) -> None:
        """Publish version = completed iterations (and open its rollout round unless training is over)."""
        version = self.trainer.state.iteration
        message = ParametersMessage(
            run_id=self.run_id,
            version=version,
            num_actors=self.transport.num_actors,
            seed_starts=self.seed_starts(),
            seed_budget=self.seed_budget,
            frozen_fingerprint=self.fingerprint,
            signature=self.signature,
            finished=finished,
            tensors=trainable_state(self.trainer.policy),
        )
        data = message.encode()
        if not finished:
            self.rollouts.open(self.run_id, version, self.transport.num_actors)
        self.parameters.publish(version, data, finished)
        logger.info(
            "published version %d%s (%.2f MiB)", version, " (finished)" if finished else "", len(data) / MIB
        )

    # ---- BatchSource ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.publish()

    def collect(self) -> Collected | None:
        result = self.rollouts.wait(self.transport.straggler_timeout_s, self.stop_event)
        if result is None:
            return None
        if result.timed_out:
            missing = sorted(set(range(result.expected)) - {m.actor_id for m in result.rollouts})
            logger.warning(
                "version %d: going on with %d/%d actor rollouts after the %.0f s straggler timeout "
                "(missing actors %s)",
                self.trainer.state.iteration,
                len(result.rollouts),
                result.expected,
                self.transport.straggler_timeout_s,
                missing,
            )
        batches = [batch for message in result.rollouts if self._usable(message) for batch in message.batches]
        self.trainer.state.next_env_seed += self.transport.num_actors * self.seed_budget
        metrics = {
            "transport/actors": float(len(result.rollouts)),
            "transport/actors_expected": float(result.expected),
            "transport/timed_out": float(result.timed_out),
            "transport/rejected_payloads": float(self.servicer.rejected),
        }
        env_steps = sum(m.env_steps for m in result.rollouts)
        return Collected(batches, env_steps, result.wait_s, metrics)

    def _usable(self, message: RolloutMessage) -> bool:
        """A rollout the algorithm cannot learn from (e.g. GRPO episodes that did not finish) is dropped."""
        try:
            for batch in message.batches:
                self.trainer.algorithm.check_batch(batch)
        except ValueError as error:
            logger.error("dropped the rollout of actor %d: %s", message.actor_id, error)
            return False
        return True

    def after_update(self, final_iteration: bool) -> None:
        if not final_iteration:
            self.publish()  # actors collect v+1 while the trainer evaluates and checkpoints

    def after_checkpoint(self) -> None:
        pass  # the episodes in flight live in the actors, which keep them across a learner restart

    def close(self, completed: bool) -> None:
        """Stop serving. After a completed run the actors are told to exit; after an interruption they
        are not (they keep retrying, and a `--resume=true` learner picks them up again)."""
        if self.server is not None:
            if completed:
                self.publish(finished=True)
                deadline = time.monotonic() + FINISH_GRACE_S
                while self.servicer.open_streams > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.servicer.stopping.set()
            self.server.stop(grace=1.0).wait()
            self.server = None
        if self.dist.is_distributed:
            try:
                broadcast_command(self.dist, self.trainer.device, STOP)
            finally:
                close_distributed(self.dist)


class LearnerUpdate:
    """The update of version v on every rank: minibatch order from `update_generator(seed, v)`, and under
    torchrun rank 0 broadcasts the samples first and DDP averages the gradients."""

    def __init__(self, trainer: Trainer, dist: DistContext):
        self.trainer, self.dist = trainer, dist
        transport = trainer.cfg.transport
        self.policy = (
            DDPPolicy(trainer.policy, trainer.device, transport.ddp_find_unused_parameters)
            if dist.is_distributed
            else trainer.policy
        )

    def __call__(self, samples: UpdateSamples | None) -> dict[str, float]:
        t = self.trainer
        generator = update_generator(t.cfg.seed, t.state.iteration)
        if self.dist.is_distributed:
            command, samples = broadcast_command(
                self.dist, t.device, SKIP if samples is None else UPDATE, samples
            )
            if command == SKIP:
                return {"update/num_samples": 0.0}
            return distributed_policy_update(
                self.policy, t.optimizer, samples, t.cfg.algorithm, t.device, generator, self.dist
            )
        if samples is None:
            return {"update/num_samples": 0.0}
        return policy_update(t.policy, t.optimizer, samples, t.cfg.algorithm, t.device, generator)

    def follow(self) -> TrainResult:
        """Ranks > 0: apply rank 0's updates until it says stop."""
        t = self.trainer
        try:
            while True:
                command, samples = broadcast_command(self.dist, t.device)
                if command == STOP:
                    break
                if command == UPDATE:
                    generator = update_generator(t.cfg.seed, t.state.iteration)
                    distributed_policy_update(
                        self.policy, t.optimizer, samples, t.cfg.algorithm, t.device, generator, self.dist
                    )
                t.scheduler.step()
                t.state.iteration += 1
        finally:
            close_distributed(self.dist)
        return TrainResult(sft=None, final=None, state=t.state, checkpoint_dir=None)


def _ranked_policy_source(dist: DistContext):
    """Rank 0 resolves first (it may bootstrap the few-shot policy); the others then hit its cache."""
    if not dist.is_distributed:
        return resolve_policy_source
    import torch.distributed

    def policy_source(cfg: DistributedTrainConfig, resume_from: Path | None):
        source = resolve_policy_source(cfg, resume_from) if dist.is_main else None
        torch.distributed.barrier()
        return source if dist.is_main else resolve_policy_source(cfg, resume_from)

    return policy_source


def build_learner(cfg: DistributedTrainConfig) -> Trainer:
    """The trainer of this rank: rank 0 serves the actors, evaluates and checkpoints; the others follow."""
    dist, device = init_distributed(resolve_device(cfg.device), cfg.transport.dist_timeout_s)
    if dist.is_distributed and cfg.algorithm.target_kl is not None:
        raise ConfigError(
            "--algorithm.target_kl stops epochs on each rank's own KL, which would desynchronise DDP; "
            "unset it for a multi-GPU learner"
        )
    return Trainer(
        cfg,
        source=functools.partial(ActorServer, dist=dist),
        update=functools.partial(LearnerUpdate, dist=dist),
        device=device,
        main=dist.is_main,
        policy_source=_ranked_policy_source(dist),
    )


def learn(cfg: DistributedTrainConfig) -> TrainResult:
    trainer = build_learner(cfg)
    return trainer.run() if trainer.main else trainer.update.follow()
