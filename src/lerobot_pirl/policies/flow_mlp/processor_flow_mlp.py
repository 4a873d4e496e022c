"""Pre/post processors of ``flow_mlp``, found by LeRobot's factory by naming convention.

Pre: rename -> add batch dim -> device -> normalise (state, env state, action: MEAN_STD by default).
Post: unnormalise the action -> cpu. The model always sees normalised data.
"""

from typing import Any

import torch
from lerobot.processor import PolicyAction, PolicyProcessorPipeline, make_default_pre_post_processors

from .configuration_flow_mlp import FlowMLPConfig


def make_flow_mlp_pre_post_processors(
    config: FlowMLPConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """LeRobot's standard pipeline pair; ``dataset_stats`` feed the (un)normaliser steps."""
    return make_default_pre_post_processors(config, dataset_stats, normalizer_device=config.device)
