"""A tiny, randomly initialised flow_mlp checkpoint for `--env.type=metaworld_state` (state only).

Tests and benchmarks need a real LeRobot checkpoint folder to pass as `--policy.path`, not a good
policy: identity normalisation (mean 0, std 1) and random weights make it instant to write.
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

METAWORLD_FEATURES = {
    OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(AGENT_POS_DIM,)),
    OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(ENV_STATE_DIM,)),
    ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
}

TINY_SIZES = {
    "chunk_size": 4,
    "n_action_steps": 4,
    "num_inference_steps": 2,
    "feature_dim": 32,
    "hidden_dim": 32,
    "num_layers": 1,
    "encoder_num_layers": 1,
    "time_embed_dim": 8,
    "use_image": False,
}


def save_tiny_flow_mlp(
    folder: Path, features: dict[str, PolicyFeature] | None = None, seed: int = 0, **config_overrides
) -> Path:
    """Write policy + processors to `folder` (MetaWorld state features by default); returns it."""
    torch.manual_seed(seed)
    features = features or METAWORLD_FEATURES
    config = FlowMLPConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        device="cpu",
        push_to_hub=False,
        **(TINY_SIZES | config_overrides),
    )
    stats = {
        key: {"mean": torch.zeros(feature.shape), "std": torch.ones(feature.shape)}
        for key, feature in features.items()
    }
    policy = FlowMLPPolicy(config)
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    folder = Path(folder)
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder
