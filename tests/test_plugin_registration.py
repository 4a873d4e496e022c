"""LeRobot finds the package's plugin types (issue 16, item 6): `import lerobot_pirl` registers them, and
LeRobot's own CLIs import it through the `lerobot_policy_pirl` distribution, with no
`--discover_packages_path`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=ENVIRONMENT, capture_output=True, text=True, timeout=300
    )


def test_import_lerobot_pirl_alone_registers_the_policy_and_env_types(tmp_path):
    folder = save_tiny_flow_mlp(tmp_path / "policy")
    result = run_python(
        "import lerobot_pirl\n"
        "from lerobot.configs.policies import PreTrainedConfig\n"
        "from lerobot.envs.configs import EnvConfig\n"
        f"config = PreTrainedConfig.from_pretrained({str(folder)!r})\n"
        "print(config.type, config.chunk_size, EnvConfig.get_choice_class('metaworld_state').__name__)\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["flow_mlp", "4", "MetaWorldStateEnvConfig"]


def test_lerobot_plugin_discovery_imports_the_package():
    result = run_python(
        "from lerobot.configs.policies import PreTrainedConfig\n"
        "from lerobot.utils.import_utils import register_third_party_plugins\n"
        "before = 'flow_mlp' in PreTrainedConfig.get_known_choices()\n"
        "register_third_party_plugins()\n"
        "print(before, 'flow_mlp' in PreTrainedConfig.get_known_choices())\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]


def test_lerobot_eval_runs_a_flow_mlp_checkpoint_without_discover_packages_path(tmp_path):
    folder = save_tiny_flow_mlp(tmp_path / "policy")
    command = shutil.which("lerobot-eval") or str(Path(sys.executable).parent / "lerobot-eval")
    output_dir = tmp_path / "eval"
    result = subprocess.run(
        [
            command,
            f"--policy.path={folder}",
            "--policy.device=cpu",
            "--env.type=metaworld_state",
            "--env.task=reach-v3",
            "--env.episode_length=8",
            "--eval.n_episodes=2",
            "--eval.batch_size=2",
            "--eval.use_async_envs=false",
            f"--output_dir={output_dir}",
        ],
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    overall = json.loads((output_dir / "eval_info.json").read_text())["overall"]
    assert overall["n_episodes"] == 2
    assert 0.0 <= overall["pc_success"] <= 100.0


def test_the_train_entry_point_imports_neither_torch_nor_lerobot():
    # It starts the env-worker forkserver before those imports (issue 13), so it must not need them.
    result = run_python(
        "import sys, lerobot_pirl_launch.train\n"
        "print(sorted(m for m in ('torch', 'lerobot', 'lerobot_pirl') if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
