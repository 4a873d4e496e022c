"""Run the learner's DDP update on N CPU processes (gloo), for the DDP-vs-single-process test.

Every rank builds the same tiny policy (`check_policy`), reads the same update samples from a
safetensors file (`distributed.ddp.encode_samples`) and runs `distributed_policy_update`; each writes its
trainable parameters and update metrics to `<output_dir>/rank<r>.safetensors`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lerobot_pirl.testing.processes import forkserver_context, free_port


def check_policy(policy_dir: str, algorithm_options: dict, seed: int):
    """The tiny metaworld_state flow_mlp at `policy_dir` wrapped for PPO, heads seeded with `seed`."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.envs.configs import EnvConfig

    from lerobot_pirl.algorithms.config import PPOConfig
    from lerobot_pirl.runtime.config import TrainConfig
    from lerobot_pirl.runtime.factory import build_rl_policy

    policy_config = PreTrainedConfig.from_pretrained(policy_dir)
    policy_config.pretrained_path = Path(policy_dir)
    cfg = TrainConfig(
        policy=policy_config,
        env=EnvConfig.get_choice_class("metaworld_state")(task="reach-v3"),
        algorithm=PPOConfig(**algorithm_options),
        device="cpu",
    )
    torch.manual_seed(seed)
    policy, _, _ = build_rl_policy(cfg, policy_dir, torch.device("cpu"))
    return policy, cfg.algorithm


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    policy_dir: str,
    samples_path: str,
    output_dir: str,
    algorithm_options: dict,
    seed: int,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    from lerobot_pirl.algorithms.update import make_optimizer
    from lerobot_pirl.distributed.ddp import (
        DDPPolicy,
        close_distributed,
        decode_samples,
        distributed_policy_update,
        init_distributed,
    )
    from lerobot_pirl.distributed.payloads import trainable_state

    ctx, device = init_distributed(torch.device("cpu"), timeout_s=120)
    policy, algorithm = check_policy(policy_dir, algorithm_options, seed)
    optimizer = make_optimizer(policy, algorithm)
    samples = decode_samples(Path(samples_path).read_bytes())
    metrics = distributed_policy_update(
        DDPPolicy(policy, device, find_unused_parameters=False),
        optimizer,
        samples,
        algorithm,
        device,
        torch.Generator().manual_seed(seed),
        ctx,
    )
    result = {f"param/{k}": v.detach().clone() for k, v in trainable_state(policy).items()}
    result.update({f"metric/{k}": torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
    save_file(result, str(Path(output_dir) / f"rank{rank}.safetensors"))
    close_distributed(ctx)


def run_ddp_update(
    world_size: int,
    policy_dir: Path,
    samples_path: Path,
    output_dir: Path,
    algorithm_options: dict,
    seed: int,
    timeout_s: float = 120.0,
) -> list[dict[str, Tensor]]:
    """Run the DDP update on `world_size` gloo processes; returns each rank's saved tensors."""
    context = forkserver_context()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(
                rank,
                world_size,
                port,
                str(policy_dir),
                str(samples_path),
                str(output_dir),
                dict(algorithm_options),
                seed,
            ),
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout_s)
            if process.exitcode != 0:
                raise RuntimeError(f"DDP rank exited with {process.exitcode}")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [load_file(str(Path(output_dir) / f"rank{rank}.safetensors")) for rank in range(world_size)]
