"""Ready example configs shipped in the wheel (LIBERO: ``libero/{pi0,pi05}/*.yaml``)."""

# Standard library only: importing this must not pull torch or lerobot in.
from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent


def example_path(name: str) -> Path:
    """The path of `name` (e.g. ``libero/pi0/spatial_ppo_flow_sde_1gpu.yaml``) inside EXAMPLES_DIR."""
    path = EXAMPLES_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"no example file {name!r} under {EXAMPLES_DIR}")
    return path
