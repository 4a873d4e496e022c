"""The example configs ship inside the package: `python -m lerobot_pirl.examples` prints their folder, every
yaml there parses into TrainConfig the way `lerobot-pirl-train --config_path=...` reads it, and
`example_path` names a missing file.

No `from __future__ import annotations`: draccus reads the config class from the annotation."""

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import draccus
import pytest
import yaml
from lerobot.configs import parser

import lerobot_pirl.examples
from lerobot_pirl.examples import EXAMPLES_DIR, example_path
from lerobot_pirl.runtime.config import TrainConfig

YAMLS = sorted(EXAMPLES_DIR.rglob("*.yaml"))


def test_module_prints_the_examples_folder():
    result = subprocess.run(
        [sys.executable, "-m", "lerobot_pirl.examples"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    folder = Path(lines[0])
    assert folder.is_absolute() and folder.is_dir()
    assert (folder / "libero" / "pi0" / "spatial_ppo_flow_sde_1gpu.yaml").is_file()
    assert folder == EXAMPLES_DIR.resolve()


def test_example_path_finds_a_config():
    name = "libero/pi0/spatial_ppo_flow_sde_1gpu.yaml"
    assert example_path(name) == EXAMPLES_DIR / name and example_path(name).is_file()


def test_example_path_names_a_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        example_path("nope.yaml")


def test_the_examples_package_imports_only_the_standard_library():
    # `python -m lerobot_pirl.examples` must stay cheap: nothing beyond what `import lerobot_pirl` loads.
    package = Path(lerobot_pirl.examples.__file__).parent
    for source in (package / "__init__.py", package / "__main__.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [node.module or ""]
            else:
                continue
            for name in roots:
                allowed = name.split(".")[0] in sys.stdlib_module_names or name == "lerobot_pirl.examples"
                assert allowed, f"{source.name} imports {name}"


@pytest.fixture
def decode(monkeypatch, tmp_path):
    """What the CLI does with a config file and no flags: LeRobot's extraction of `policy.path` (kept in
    module globals and a temporary file, both isolated here), then draccus's decoding of the rest."""
    monkeypatch.setattr(parser, "_config_path_args", {})
    monkeypatch.setattr(parser, "_config_yaml_overrides", {})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def decode_file(path: Path) -> TrainConfig:
        cleaned = parser.extract_path_fields_from_config(str(path), TrainConfig.__get_path_fields__())
        return draccus.decode(TrainConfig, yaml.safe_load(Path(cleaned).read_text()))

    return decode_file


def test_the_package_holds_the_libero_configs():
    assert len([p for p in YAMLS if p.relative_to(EXAMPLES_DIR).parts[0] == "libero"]) == 48


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(EXAMPLES_DIR)))
def test_every_packaged_yaml_parses_as_a_train_config(decode, path):
    assert isinstance(decode(path), TrainConfig)
