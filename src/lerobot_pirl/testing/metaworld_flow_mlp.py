"""A tiny, randomly initialised flow_mlp checkpoint for `--env.type=metaworld_state` (state only).

Tests and benchmarks of the distributed runtime need a real LeRobot checkpoint folder that learner and
actors load from `--policy.path`, not a good policy: identity normalisation (mean 0, std 1) and random
weights keep it instant to make.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

from lerobot_pirl.envs.metaworld_state import ACTION_DIM, AGENT_POS_DIM, ENV_STATE_DIM
from lerobot_pirl.policies.flow_mlp.configuration_flow_mlp import FlowMLPConfig
from lerobot_pirl.policies.flow_mlp.modeling_flow_mlp import FlowMLPPolicy
from lerobot_pirl.policies.flow_mlp.processor_flow_mlp import make_flow_mlp_pre_post_processors


def write_tiny_metaworld_flow_mlp(
    output_dir: Path,
    *,
    seed: int = 0,
    chunk_size: int = 4,
    num_inference_steps: int = 2,
    width: int = 32,
) -> Path:
    """Save a tiny flow_mlp (policy + processors) for the 39-d MetaWorld state env to `output_dir`."""
    torch.manual_seed(seed)
    inputs = {
        OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(AGENT_POS_DIM,)),
        OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(ENV_STATE_DIM,)),
    }
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    config = FlowMLPConfig(
        input_features=inputs,
        output_features=outputs,
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        num_inference_steps=num_inference_steps,
        feature_dim=width,
        hidden_dim=width,
        num_layers=1,
        encoder_num_layers=1,
        time_embed_dim=8,
        use_image=False,
        device="cpu",
        push_to_hub=False,
    )
    stats = {
        key: {"mean": torch.zeros(feature.shape), "std": torch.ones(feature.shape)}
        for key, feature in {**inputs, **outputs}.items()
    }
    policy = FlowMLPPolicy(config)
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    output_dir = Path(output_dir)
    policy.save_pretrained(output_dir)
    preprocessor.save_pretrained(output_dir)
    postprocessor.save_pretrained(output_dir)
    return output_dir
