"""The ``flow_mlp`` LeRobot policy type; importing this package registers it with draccus."""

from .configuration_flow_mlp import FlowMLPConfig
from .modeling_flow_mlp import FlowMLPModel, FlowMLPPolicy
from .processor_flow_mlp import make_flow_mlp_pre_post_processors

__all__ = ["FlowMLPConfig", "FlowMLPModel", "FlowMLPPolicy", "make_flow_mlp_pre_post_processors"]
