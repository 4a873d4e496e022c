"""Push a fine-tuned checkpoint to the Hugging Face Hub, as `lerobot-train` pushes its policies."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi, get_token
from lerobot.utils.constants import PRETRAINED_MODEL_DIR

from lerobot_pirl.runtime.checkpoint import TRAINER_STATE_FILE
from lerobot_pirl.runtime.config import ConfigError


def check_push_possible(repo_id: str | None) -> None:
    """Before training: a push needs a repo id and a login (a token); whether the hub is reachable is
    only known at the push, which then fails with one line and leaves the checkpoint in place."""
    if not repo_id:
        raise ConfigError("--policy.push_to_hub=true needs --policy.repo_id=<user>/<name>")
    if get_token() is None:
        raise ConfigError(
            "--policy.push_to_hub=true needs a Hugging Face login: run `hf auth login` or set HF_TOKEN "
            "(or drop the flag and push the checkpoint later with `hf upload`)"
        )


def push_command(repo_id: str, checkpoint_dir: Path) -> str:
    """The command that pushes a checkpoint by hand, as the failed-push message suggests."""
    return f"hf upload {repo_id} {Path(checkpoint_dir) / PRETRAINED_MODEL_DIR} ."


def _model_card(policy_type: str, checkpoint_dir: Path) -> str:
    state_file = checkpoint_dir / "training_state" / TRAINER_STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return (
        "---\nlibrary_name: lerobot\ntags: [lerobot, robotics, reinforcement-learning, lerobot-pirl]\n---\n\n"
        f"# {policy_type} fine-tuned with online RL (lerobot-pirl)\n\n"
        "Fine-tuned with πRL (PPO/GRPO with Flow-Noise / Flow-SDE likelihoods, arXiv 2510.25889) by "
        "[lerobot-pirl](https://github.com/). It is a standard LeRobot checkpoint of its policy type:\n\n"
        "```bash\nlerobot-eval --policy.path=<this repo> --env.type=...\n```\n\n"
        f"RL iterations: {state.get('iteration', '?')}, env steps: {state.get('env_steps', '?')}.\n"
    )


def push_checkpoint(checkpoint_dir: Path, repo_id: str | None, private: bool = False) -> str:
    """Upload checkpoint_dir/pretrained_model (weights, config, processors, train config); returns the URL."""
    if not repo_id:
        raise ValueError("--policy.push_to_hub=true needs --policy.repo_id=<user>/<name>")
    folder = Path(checkpoint_dir) / PRETRAINED_MODEL_DIR
    policy_type = json.loads((folder / "config.json").read_text()).get("type", "policy")
    (folder / "README.md").write_text(_model_card(policy_type, Path(checkpoint_dir)))
    api = HfApi()
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message="Upload policy fine-tuned with lerobot-pirl",
        allow_patterns=["*.safetensors", "*.json", "*.md"],
    )
    return commit.repo_url.url
