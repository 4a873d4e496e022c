"""Advantages (GAE, GRPO), the PPO/GRPO losses and the update loop."""

from lerobot_pirl.algorithms.config import AlgorithmConfig, GRPOConfig, PPOConfig

__all__ = ["AlgorithmConfig", "GRPOConfig", "PPOConfig"]
