"""The smallest real πRL training: a flow_mlp policy learns a continuous bandit on the CPU.

A flow_mlp is first fitted to actions far from the optimum (SFT), then PPO/GRPO with Flow-SDE or
Flow-Noise moves its deterministic (ODE) action toward the target of `PointTargetEnv`. Used by the
learning test and by `python -m lerobot_pirl.testing.learning_check`, which prints the result.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_pirl.adapters.flow_mlp import FlowMLPAdapter
from lerobot_pirl.algorithms.config import GRPOConfig, PPOConfig
from lerobot_pirl.algorithms.grpo import grpo_samples
from lerobot_pirl.algorithms.ppo import ppo_samples
from lerobot_pirl.algorithms.update import make_optimizer, policy_update
from lerobot_pirl.policies.flow_mlp.configuration_flow_mlp import FlowMLPConfig
from lerobot_pirl.policies.flow_mlp.modeling_flow_mlp import FlowMLPPolicy
from lerobot_pirl.policies.flow_mlp.processor_flow_mlp import make_flow_mlp_pre_post_processors
from lerobot_pirl.rl_policy import FlowRLPolicy
from lerobot_pirl.rollout.collector import ChunkCollector
from lerobot_pirl.testing.toy_envs import PointTargetEnv

TARGET = (0.5, -0.5)
SFT_ACTION = (-0.5, 0.5)  # squared distance 2 from the target per step


def sft_policy(seed: int = 0, steps: int = 300) -> tuple[FlowMLPPolicy, object, object]:
    """A flow_mlp fitted to act at SFT_ACTION (plus a little spread), with identity normalisation."""
    torch.manual_seed(seed)
    config = FlowMLPConfig(
        input_features={OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(2,))},
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        chunk_size=4,
        n_action_steps=4,
        num_inference_steps=4,
        feature_dim=64,
        hidden_dim=64,
        num_layers=2,
        device="cpu",
        push_to_hub=False,
    )
    stats = {key: {"mean": torch.zeros(2), "std": torch.ones(2)} for key in (OBS_STATE, ACTION)}
    policy = FlowMLPPolicy(config)
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-3)
    state = torch.tensor([0.3, -0.2]).expand(128, 2)
    for _ in range(steps):
        actions = torch.tensor(SFT_ACTION) + 0.05 * torch.randn(128, 4, 2)  # (B, H, D)
        loss, _ = policy.forward({OBS_STATE: state, ACTION: actions})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    return policy, preprocessor, postprocessor


def squared_error(policy: FlowRLPolicy, collector: ChunkCollector) -> float:
    """Mean per-step ||a - target||² of the deterministic (ODE) actions, in env units."""
    observation, _ = collector.vec_env.reset(seed=0)
    with torch.no_grad():
        sample = policy.sample(
            collector.policy_inputs(observation), "ode", generator=torch.Generator().manual_seed(0)
        )
    actions = collector.postprocessor(sample.actions)  # (N, C, D)
    return float(((actions - torch.tensor(TARGET)) ** 2).sum(-1).mean())


def run_learning_check(
    algorithm: str = "ppo",
    exploration: str = "flow_sde",
    iterations: int = 40,
    seed: int = 0,
    num_envs: int = 16,
) -> dict[str, float]:
    """Returns the squared error of the deterministic action before and after RL, and the wall time."""
    torch.manual_seed(seed)
    policy, preprocessor, postprocessor = sft_policy(seed)
    common = {"exploration": exploration, "update_epochs": 4, "minibatch_size": 64, "micro_batch_size": None}
    common |= {"actor_lr": 3e-3, "noise_std_min": 0.1, "noise_std_max": 0.4, "entropy_coef": 0.0}
    if algorithm == "ppo":
        cfg = PPOConfig(critic_lr=1e-2, gamma=0.0, value_head_hidden=(64,), **common).resolved("flow_mlp")
    else:
        cfg = GRPOConfig(group_size=4, **common)
    rl_policy = FlowRLPolicy(FlowMLPAdapter(policy), **cfg.policy_settings(), n_action_steps=None)
    vec_env = gym.vector.SyncVectorEnv([lambda: PointTargetEnv(target=TARGET) for _ in range(num_envs)])
    collector = ChunkCollector(
        vec_env, rl_policy, preprocessor, postprocessor, sparse_reward=False, end_on_success=False, seed=seed
    )
    optimizer = make_optimizer(rl_policy, cfg)
    start = time.perf_counter()
    initial = squared_error(rl_policy, collector)
    for _ in range(iterations):
        if algorithm == "ppo":
            samples = ppo_samples(collector.collect(1, exploration), cfg)
        else:
            groups = collector.take_seeds(num_envs // cfg.group_size)
            batch = collector.collect_episodes(
                [s for s in groups for _ in range(cfg.group_size)], exploration
            )
            samples, _ = grpo_samples(batch, cfg)
        policy_update(rl_policy, optimizer, samples, cfg, "cpu")
    final = squared_error(rl_policy, collector)
    vec_env.close()
    return {"initial_error": initial, "final_error": final, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = ("algorithm", "exploration", "error before", "error after", "ratio", "s")
    print("{:10s} {:12s} {:>13s} {:>12s} {:>6s} {:>6s}".format(*header))
    for algorithm, exploration in (("ppo", "flow_sde"), ("ppo", "flow_noise"), ("grpo", "flow_sde")):
        r = run_learning_check(algorithm, exploration, args.iterations, args.seed)
        ratio = r["final_error"] / r["initial_error"]
        print(
            f"{algorithm:10s} {exploration:12s} {r['initial_error']:13.3f} {r['final_error']:12.3f} "
            f"{ratio:6.2f} {r['seconds']:6.1f}"
        )


if __name__ == "__main__":
    main()
