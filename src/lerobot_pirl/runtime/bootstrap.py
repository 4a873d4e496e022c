"""The few-shot SFT starting point of the main job: scripted MetaWorld demos -> flow_mlp, cached.

πRL starts from a supervised policy that succeeds sometimes (the paper's few-shot SFT baselines sit at
40-77%; from a policy that almost never succeeds RL has nothing to learn from). Without
`--policy.path`, `lerobot-pirl-train` records imperfect expert demos of the task (by default 20, with
action noise 0.5: `BootstrapConfig`) and trains a flow_mlp on them with LeRobot's flow-matching loss,
once; later runs reuse the cached checkpoint.

A multi-task config (`--env.task=MT10`, a list) records every task's demos with the same per-task recipe
(each task's demos cached on their own, so suites that share tasks share them) and trains one flow_mlp
on all of them, conditioned on the task (`FlowMLPConfig.task_vocabulary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from lerobot.configs.types import FeatureType
from lerobot.datasets.compute_stats import aggregate_stats
from lerobot.utils.constants import ACTION
from lerobot.utils.feature_utils import dataset_to_policy_features

from lerobot_pirl.policies.flow_mlp.configuration_flow_mlp import FlowMLPConfig
from lerobot_pirl.policies.flow_mlp.modeling_flow_mlp import FlowMLPPolicy
from lerobot_pirl.policies.flow_mlp.processor_flow_mlp import make_flow_mlp_pre_post_processors
from lerobot_pirl.progress import progress_bar

if TYPE_CHECKING:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

logger = logging.getLogger(__name__)


def chunked_dataset_tensors(dataset: LeRobotDataset, chunk_size: int) -> dict[str, torch.Tensor]:
    """All frames in memory with their action chunks, as LeRobot's delta timestamps would give them.

    Returns observation tensors (M, ...), `action` (M, H, D) and `action_is_pad` (M, H): the chunk of
    frame i is the actions i..i+H-1 of its episode, the steps past the episode end repeating the last
    action and marked as padding (LeRobot's convention, which its loss masks out).
    """
    frames = dataset.hf_dataset.with_format("torch")[:]
    episode = frames["episode_index"]  # (M,)
    actions = frames[ACTION].float()  # (M, D)
    num_frames = actions.shape[0]
    offsets = torch.arange(chunk_size)
    index = torch.arange(num_frames)[:, None] + offsets[None, :]  # (M, H)
    index = index.clamp(max=num_frames - 1)
    is_pad = episode[index] != episode[:, None]  # past this episode's end
    last_of_episode = torch.zeros(num_frames, dtype=torch.long)
    for ep in episode.unique():
        members = torch.nonzero(episode == ep).flatten()
        last_of_episode[members] = members.max()
    index = torch.minimum(index, last_of_episode[:, None])
    tensors = {
        key: value.float()
        for key, value in frames.items()
        if key.startswith("observation.") and isinstance(value, torch.Tensor)
    }
    tensors[ACTION] = actions[index]  # (M, H, D)
    tensors["action_is_pad"] = is_pad
    return tensors


def frame_tasks(dataset: LeRobotDataset) -> list[str]:
    """The task instruction of every frame of `dataset` (M,), in frame order."""
    names = {
        int(index): str(task)
        for task, index in zip(dataset.meta.tasks.index, dataset.meta.tasks["task_index"], strict=True)
    }
    return [names[int(i)] for i in dataset.hf_dataset.with_format("torch")["task_index"]]


def train_flow_mlp(
    dataset: LeRobotDataset | list[LeRobotDataset],
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float = 1e-3,
    config_overrides: dict | None = None,
    task_conditioned: bool = False,
) -> Path:
    """Supervised flow matching of a flow_mlp on `dataset` (or several, pooled frame by frame); saves
    policy + processors to `output_dir`. `task_conditioned`: the policy reads each frame's task
    instruction (its vocabulary: every instruction of the datasets, in order of appearance)."""
    datasets = dataset if isinstance(dataset, list) else [dataset]
    torch.manual_seed(seed)
    features = dataset_to_policy_features(datasets[0].meta.features)
    tasks = [task for d in datasets for task in frame_tasks(d)]  # (M,)
    config = FlowMLPConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        device="cpu",
        push_to_hub=False,
        task_vocabulary=list(dict.fromkeys(tasks)) if task_conditioned else None,
        **(config_overrides or {}),
    )
    policy = FlowMLPPolicy(config)
    stats = aggregate_stats([d.meta.stats for d in datasets]) if len(datasets) > 1 else datasets[0].meta.stats
    preprocessor, postprocessor = make_flow_mlp_pre_post_processors(config, dataset_stats=stats)
    parts = [chunked_dataset_tensors(d, config.chunk_size) for d in datasets]
    data = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    num_frames = data[ACTION].shape[0]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    policy.train()
    progress = progress_bar(range(steps), desc="SFT flow_mlp", leave=False)
    log_every = max(1, steps // 4)
    for step in progress:
        index = torch.randint(0, num_frames, (batch_size,), generator=generator)
        batch = preprocessor({**{k: v[index] for k, v in data.items()}, "task": [tasks[i] for i in index]})
        loss, _ = policy.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % log_every == 0:
            logger.info("SFT flow_mlp step %d/%d: loss %.4f", step + 1, steps, loss.item())
    policy.eval()
    policy.save_pretrained(output_dir)
    preprocessor.save_pretrained(output_dir)
    postprocessor.save_pretrained(output_dir)
    return output_dir


def bootstrap_flow_policy(env_cfg, cfg, seed: int) -> Path:
    """The cached few-shot flow_mlp checkpoint for `env_cfg`'s MetaWorld task or tasks (made on first use)."""
    if env_cfg.type != "metaworld_state":
        raise ValueError(
            "without --policy.path the few-shot bootstrap needs --env.type=metaworld_state; "
            "pass --policy.path=<a flow policy checkpoint> for other envs"
        )
    if len(env_cfg.tasks) > 1:
        return _bootstrap_suite(env_cfg, cfg, seed)
    # The RL episode length is not part of the recipe: the experts finish within ~150 steps, so demos
    # recorded under MetaWorld's 500-step limit serve every shorter training limit too.
    recipe = {
        "task": env_cfg.task,
        "image_size": env_cfg.image_size,
        "seed": seed,
        **{k: str(v) for k, v in asdict(cfg).items() if k != "cache_dir"},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.cache_dir).expanduser() / f"{env_cfg.task}-{key}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # two runs started together must not both build the cache
        return _bootstrap_locked(env_cfg, cfg, seed, root, recipe)


def _bootstrap_locked(env_cfg, cfg, seed: int, root: Path, recipe: dict) -> Path:
    policy_dir = root / "policy"
    if (policy_dir / "model.safetensors").exists():
        logger.info("Using the cached few-shot policy %s", policy_dir)
        return policy_dir

    logger.info(
        "Bootstrapping a few-shot flow_mlp on %s (%d demos); cached in %s", env_cfg.task, cfg.num_demos, root
    )
    if root.exists():  # an interrupted earlier bootstrap
        shutil.rmtree(root)
    root.mkdir(parents=True)
    dataset = _record_demos(env_cfg.task, root / "demos", env_cfg, cfg, seed)
    staging = root / "policy.partial"
    train_flow_mlp(dataset, staging, steps=cfg.sft_steps, batch_size=cfg.batch_size, seed=seed)
    (root / "recipe.json").write_text(json.dumps(recipe, indent=2))
    staging.rename(policy_dir)
    return policy_dir


def _record_demos(task: str, folder: Path, env_cfg, cfg, seed: int):
    """`cfg.num_demos` scripted demos of `task` recorded into `folder` (a new LeRobotDataset)."""
    # Imported here: recording needs the `datasets` package, a cache hit does not.
    import datasets

    from lerobot_pirl.rollout.scripted_demos import record_metaworld_demos

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a `Map:` bar per saved episode, in our own demo set
    try:
        return record_metaworld_demos(
            task,
            cfg.num_demos,
            folder,
            action_noise=cfg.action_noise,
            seed=seed,
            image_size=env_cfg.image_size,
        )
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _demo_recipe(task: str, env_cfg, cfg, seed: int) -> dict:
    return {
        "task": task,
        "image_size": env_cfg.image_size,
        "seed": seed,
        "num_demos": cfg.num_demos,
        "action_noise": cfg.action_noise,
    }


def _cached_demos(task: str, env_cfg, cfg, seed: int):
    """`task`'s few-shot demos (recorded on first use into the cache, under their own recipe)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    recipe = _demo_recipe(task, env_cfg, cfg, seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.cache_dir).expanduser() / "demos" / f"{task}-{key}"
    root.parent.mkdir(parents=True, exist_ok=True)
    done = root / "recipe.json"  # written last: a folder without it is an interrupted recording
    with FileLock(str(root) + ".lock"):
        if done.exists():
            return LeRobotDataset("local/metaworld_expert_demos", root=root / "dataset")
        if root.exists():
            shutil.rmtree(root)
        dataset = _record_demos(task, root / "dataset", env_cfg, cfg, seed)
        done.write_text(json.dumps(recipe, indent=2))
        return dataset


def _bootstrap_suite(env_cfg, cfg, seed: int) -> Path:
    """One task-conditioned flow_mlp trained on the demos of every task of `env_cfg` (cached)."""
    tasks = env_cfg.tasks
    recipe = {
        "tasks": list(tasks),
        "image_size": env_cfg.image_size,
        "seed": seed,
        **{k: str(v) for k, v in asdict(cfg).items() if k != "cache_dir"},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    name = env_cfg.task if "," not in env_cfg.task else f"{len(tasks)}tasks"
    root = Path(cfg.cache_dir).expanduser() / f"{name}-{key}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        policy_dir = root / "policy"
        if (policy_dir / "model.safetensors").exists():
            logger.info("Using the cached few-shot multi-task policy %s", policy_dir)
            return policy_dir
        logger.info(
            "Bootstrapping one few-shot flow_mlp on %d tasks (%d demos each); cached in %s",
            len(tasks),
            cfg.num_demos,
            root,
        )
        demos = [_cached_demos(task, env_cfg, cfg, seed) for task in tasks]
        if root.exists():
            shutil.rmtree(root)
        staging = root / "policy.partial"
        train_flow_mlp(
            demos, staging, steps=cfg.sft_steps, batch_size=cfg.batch_size, seed=seed, task_conditioned=True
        )
        (root / "recipe.json").write_text(json.dumps(recipe, indent=2))
        staging.rename(policy_dir)
        return policy_dir
