"""LeRobot policy types shipped by lerobot-pirl; importing this package registers them."""

from . import flow_mlp

__all__ = ["flow_mlp"]
