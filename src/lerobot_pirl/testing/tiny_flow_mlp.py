"""A randomly initialised flow_mlp checkpoint for MetaWorld's state observations (tests and demos)."""

from __future__ import annotations

from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

from lerobot_pirl.policies.flow_mlp.configuration_flow_mlp import FlowMLPConfig
from lerobot_pirl.policies.flow_mlp.modeling_flow_mlp import FlowMLPPolicy
from lerobot_pirl.policies.flow_mlp.processor_flow_mlp import make_flow_mlp_pre_post_processors

METAWORLD_FEATURES = {
    OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(4,)),
    OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(39,)),
    ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(4,)),
}


def save_tiny_flow_mlp(
    folder: Path, features: dict[str, PolicyFeature] | None = None, seed: int = 0, **config_overrides
) -> Path:
    """Write policy + processors (identity normalisation) to `folder`; returns it."""
    torch.manual_seed(seed)
    features = features or METAWORLD_FEATURES
    sizes = {"feature_dim": 32, "hidden_dim": 32, "num_layers": 2} | config_overrides
    config = FlowMLPConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        device="cpu",
        push_to_hub=False,
        **sizes,
    )
    stats = {
        key: {"mean": torch.zeros(feature.shape), "std": torch.ones(feature.shape)}
        for key, feature in features.items()
    }
    policy = FlowMLPPolicy(config)
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return Path(folder)
