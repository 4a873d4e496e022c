"""The learner process: publishes policy versions, gathers the actors' rollouts, updates, evaluates.

One iteration (version v = completed iterations):
    1. publish v: the trainable parameters + each actor's seed range (payloads.ParametersMessage);
    2. wait for every actor's rollout of v, or `straggler_timeout_s` after the first arrived; then go on
       with what arrived and log who is missing;
    3. advantages per actor rollout (GAE runs per env, GRPO groups never cross actors), concatenate,
       update (DDP across ranks under torchrun), publish v+1 — then evaluate and checkpoint like the
       trainer while the actors already collect v+1.
Checkpoints are the trainer's (LeRobot layout, crash-safe); `--resume=true` continues from the last
one with the same version numbers and seed ranges, under a new run id so actors collect afresh.

Determinism: the update's minibatch order comes from a generator seeded with (seed, iteration), and
each actor seeds its RNGs with its seed range's start, so a run is reproducible whatever the timing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import torch
from lerobot.envs.utils import close_envs
from lerobot.utils.random_utils import set_seed

from lerobot_pirl.algorithms.config import GRPOConfig
from lerobot_pirl.algorithms.grpo import grpo_samples
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import (
    UpdateSamples,
    make_lr_scheduler,
    make_optimizer,
    policy_update,
)
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.runtime.checkpoint import (
    TRAIN_CONFIG_FILE,
    TrainerState,
    last_checkpoint,
    restore_training_state,
    save_config,
)
from lerobot_pirl.runtime.ddp import (
    SKIP,
    STOP,
    UPDATE,
    DDPPolicy,
    broadcast_command,
    close_distributed,
    distributed_policy_update,
    init_distributed,
)
from lerobot_pirl.runtime.distributed_config import (
    DistributedTrainConfig,
    rollout_seed_budget,
    rollout_signature,
)
from lerobot_pirl.runtime.metrics import MetricsLog
from lerobot_pirl.runtime.payloads import (
    MIB,
    ParametersMessage,
    RolloutMessage,
    RolloutSpec,
    frozen_fingerprint,
    trainable_state,
)
from lerobot_pirl.runtime.trainer import (
    ConfigError,
    Rollout,
    Trainer,
    TrainResult,
    build_collector,
    build_rl_policy,
    resolve_device,
    resolve_policy_source,
)
from lerobot_pirl.runtime.transport import (
    LearnerServicer,
    ParameterBoard,
    RolloutBoard,
    learner_token,
    start_learner_server,
)

logger = logging.getLogger(__name__)

# How long the learner waits, once training is over, for the actors' streams to deliver "finished".
FINISH_GRACE_S = 5.0


def update_generator(seed: int, iteration: int) -> torch.Generator:
    """The minibatch order of update `iteration`: fixed by the run's seed, whatever happened before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def rollout_samples(
    rollouts: list[RolloutMessage], cfg: DistributedTrainConfig
) -> tuple[UpdateSamples | None, list[RolloutBatch], dict[str, float]]:
    """Advantages per actor batch (as the trainer computes them per rollout), concatenated in actor order.

    A rollout the algorithm cannot use (e.g. GRPO episodes that did not finish) is dropped with an error.
    """
    algorithm = cfg.algorithm
    parts: list[UpdateSamples] = []
    batches: list[RolloutBatch] = []
    kept_fractions: list[float] = []
    for message in rollouts:
        try:
            if isinstance(algorithm, GRPOConfig):
                pairs = [grpo_samples(batch, algorithm) for batch in message.batches]
                actor_parts = [samples for samples, _ in pairs]
                kept_fractions += [extras["grpo/kept_group_fraction"] for _, extras in pairs]
            else:
                actor_parts = [ppo_samples(batch, algorithm) for batch in message.batches]
        except ValueError as error:
            logger.error("dropped the rollout of actor %d: %s", message.actor_id, error)
            continue
        parts += actor_parts
        batches += message.batches
    extras = {"grpo/kept_group_fraction": sum(kept_fractions) / len(kept_fractions)} if kept_fractions else {}
    samples = UpdateSamples.concatenate(parts) if parts else None
    return samples, batches, extras


class Learner(Trainer):
    """Holds the learner's state; `run()` serves versions until the training budget is spent.

    Under torchrun every rank builds a Learner; rank 0 serves the actors, the others follow its updates.
    It shares the trainer's evaluation protocol, checkpointing, logging and budget (inherited methods)
    but builds its own state: no training envs (the actors have them), a gRPC server instead.
    """

    def __init__(self, cfg: DistributedTrainConfig):  # not Trainer.__init__: it builds training envs
        self.cfg = cfg
        transport = cfg.transport
        self.dist, self.device = init_distributed(resolve_device(cfg.device), transport.dist_timeout_s)
        if self.dist.is_distributed and cfg.algorithm.target_kl is not None:
            raise ConfigError(
                "--algorithm.target_kl stops epochs on each rank's own KL, which would desynchronise DDP; "
                "unset it for a multi-GPU learner"
            )
        self.output_dir = Path(cfg.output_dir)
        if self.dist.is_main:
            self._check_output_dir()
        set_seed(cfg.seed)

        self.resume_from = last_checkpoint(self.output_dir) if cfg.resume else None
        if cfg.resume and self.resume_from is None:
            raise ConfigError(f"--resume=true but {self.output_dir}/checkpoints/last does not exist")
        policy_path = self._policy_source()
        self.policy, self.preprocessor, self.postprocessor = build_rl_policy(
            cfg, policy_path, self.device, apply_cli_overrides=self.resume_from is None
        )
        self.fingerprint = frozen_fingerprint(self.policy)
        self.optimizer = make_optimizer(self.policy, cfg.algorithm)
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.algorithm, cfg.iterations)
        self.state = TrainerState(next_env_seed=cfg.seed)
        if self.resume_from is not None:
            self.state = restore_training_state(self.resume_from, self.policy, self.optimizer, self.scheduler)
            logger.info("resumed from %s at iteration %d", self.resume_from, self.state.iteration)
        self.update_policy = (
            DDPPolicy(self.policy, self.device, transport.ddp_find_unused_parameters)
            if self.dist.is_distributed
            else self.policy
        )
        self.run_id = uuid.uuid4().hex[:12]
        self.seed_budget = rollout_seed_budget(cfg)
        self.signature = rollout_signature(cfg)
        self.stop_event = threading.Event()
        self.server = None
        self.port: int | None = None
        if not self.dist.is_main:
            return

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(
            self.output_dir / "metrics.jsonl",
            resume_from_iteration=self.state.iteration if self.resume_from is not None else None,
        )
        self.eval_collector, self.eval_envs = build_collector(
            cfg,
            self.policy,
            self.preprocessor,
            self.postprocessor,
            num_envs=cfg.eval.batch_size,
            device=self.device,
        )
        self.wandb = self._init_wandb()
        save_config(cfg, self.output_dir / TRAIN_CONFIG_FILE)
        self.parameters = ParameterBoard()
        self.rollouts = RolloutBoard()
        self.servicer = LearnerServicer(
            self.parameters,
            self.rollouts,
            self._rollout_spec(),
            max_upload_bytes=int(transport.max_upload_mb * MIB),
            token=learner_token(),
        )
        self.server, self.port = start_learner_server(transport, self.servicer)

    # ---- set-up helpers -----------------------------------------------------------------------------

    def _policy_source(self):
        """Rank 0 resolves first (it may bootstrap the few-shot policy); the others then hit its cache."""
        if not self.dist.is_distributed:
            return resolve_policy_source(self.cfg, self.resume_from)
        import torch.distributed as dist

        source = resolve_policy_source(self.cfg, self.resume_from) if self.dist.is_main else None
        dist.barrier()
        return source if self.dist.is_main else resolve_policy_source(self.cfg, self.resume_from)

    def _rollout_spec(self) -> RolloutSpec:
        """What every actor batch must look like: this policy's sizes and one real observation's
        preprocessed tensors (from an eval env, through the same processors as the actors')."""
        sizes = self.policy.adapter.sizes
        collector = self.eval_collector
        observation = collector.reset([self.cfg.eval.seed + i for i in range(collector.num_envs)])
        with torch.no_grad():
            inputs = ChunkCollector._storable(collector.policy_inputs(observation))
        return RolloutSpec(
            num_envs=self.cfg.rollout.num_envs,
            num_steps=sizes.num_steps,
            chunk_size=sizes.chunk_size,
            action_dim=sizes.action_dim,
            num_batches=self.cfg.rollout.episodes_per_env
            if isinstance(self.cfg.algorithm, GRPOConfig)
            else 1,
            observations={k: (tuple(v.shape[1:]), v.dtype) for k, v in inputs.items()},
        )

    # ---- protocol -----------------------------------------------------------------------------------

    def seed_starts(self) -> list[int]:
        return [self.state.next_env_seed + a * self.seed_budget for a in range(self.cfg.transport.num_actors)]

    def publish(self, finished: bool = False) -> None:
        """Publish version = completed iterations (and open its rollout round unless training is over)."""
        version = self.state.iteration
        message = ParametersMessage(
            run_id=self.run_id,
            version=version,
            num_actors=self.cfg.transport.num_actors,
            seed_starts=self.seed_starts(),
            seed_budget=self.seed_budget,
            frozen_fingerprint=self.fingerprint,
            signature=self.signature,
            finished=finished,
            tensors=trainable_state(self.policy),
        )
        data = message.encode()
        if not finished:
            self.rollouts.open(self.run_id, version, self.cfg.transport.num_actors)
        self.parameters.publish(version, data, finished)
        logger.info(
            "published version %d%s (%.2f MiB)", version, " (finished)" if finished else "", len(data) / MIB
        )

    # ---- the loop -----------------------------------------------------------------------------------

    def _update(self, samples: UpdateSamples | None) -> dict[str, float]:
        """One update on every rank (rank 0 broadcasts the samples first when distributed)."""
        generator = update_generator(self.cfg.seed, self.state.iteration)
        if self.dist.is_distributed:
            command, samples = broadcast_command(
                self.dist, self.device, SKIP if samples is None else UPDATE, samples
            )
            if command == SKIP:
                return {"losses/num_samples": 0.0}
            return distributed_policy_update(
                self.update_policy,
                self.optimizer,
                samples,
                self.cfg.algorithm,
                self.device,
                generator,
                self.dist,
            )
        if samples is None:
            return {"losses/num_samples": 0.0}
        return policy_update(self.policy, self.optimizer, samples, self.cfg.algorithm, self.device, generator)

    progress_label = "πRL learner"

    def run(self) -> TrainResult:
        if not self.dist.is_main:
            return self._follow()
        return super().run()

    def _start(self) -> None:
        self.publish()

    def _gather(self) -> Rollout | None:
        cfg = self.cfg
        result = self.rollouts.wait(cfg.transport.straggler_timeout_s, self.stop_event)
        if result is None:
            return None
        if result.timed_out:
            arrived = {m.actor_id for m in result.rollouts}
            missing = sorted(set(range(result.expected)) - arrived)
            logger.warning(
                "version %d: going on with %d/%d actor rollouts after the %.0f s straggler timeout "
                "(missing actors %s)",
                self.state.iteration,
                len(result.rollouts),
                result.expected,
                cfg.transport.straggler_timeout_s,
                missing,
            )
        samples, batches, extras = rollout_samples(result.rollouts, cfg)
        self.state.next_env_seed += cfg.transport.num_actors * self.seed_budget
        transport_metrics = {
            "transport/actors": float(len(result.rollouts)),
            "transport/actors_expected": float(result.expected),
            "transport/timed_out": float(result.timed_out),
            "transport/rejected_payloads": float(self.servicer.rejected),
        }
        env_steps = sum(m.env_steps for m in result.rollouts)
        return Rollout(samples, batches, env_steps, result.wait_s, {**transport_metrics, **extras})

    def _after_update(self, final_iteration: bool) -> None:
        if not final_iteration:
            self.publish()  # actors collect v+1 while this process evaluates and checkpoints

    def _close(self, completed: bool) -> None:
        self.shutdown(tell_actors_to_exit=completed)

    def _follow(self) -> TrainResult:
        """Ranks > 0: apply rank 0's updates until it says stop."""
        try:
            while True:
                command, samples = broadcast_command(self.dist, self.device)
                if command == STOP:
                    break
                if command == UPDATE:
                    generator = update_generator(self.cfg.seed, self.state.iteration)
                    distributed_policy_update(
                        self.update_policy,
                        self.optimizer,
                        samples,
                        self.cfg.algorithm,
                        self.device,
                        generator,
                        self.dist,
                    )
                self.scheduler.step()
                self.state.iteration += 1
        finally:
            close_distributed(self.dist)
        return TrainResult(sft=None, final=None, state=self.state, checkpoint_dir=None)

    def shutdown(self, tell_actors_to_exit: bool) -> None:
        """Stop serving. After a completed run the actors are told to exit; after an interruption they
        are not (they keep retrying, and a `--resume=true` learner picks them up again)."""
        if self.server is not None:
            if tell_actors_to_exit:
                self.publish(finished=True)
                deadline = time.monotonic() + FINISH_GRACE_S
                while self.servicer.open_streams > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.servicer.stopping.set()
            self.server.stop(grace=1.0).wait()
            self.server = None
        if self.dist.is_distributed and self.dist.is_main:
            try:
                broadcast_command(self.dist, self.device, STOP)
            finally:
                close_distributed(self.dist)
        if self.dist.is_main and getattr(self, "eval_envs", None) is not None:
            close_envs(self.eval_envs)
            self.eval_envs = None
