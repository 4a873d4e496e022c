"""`lerobot-pirl-eval`: deterministic (ODE) evaluation of a flow policy with 95% confidence intervals.

    lerobot-pirl-eval --policy.path=outputs/push/checkpoints/last/pretrained_model \\
        --env.type=metaworld_state --env.task=push-v3 --eval.n_episodes=100

    # LIBERO suite evaluation: every task of the suite(s) x its 50 init states
    lerobot-pirl-eval --policy.path=lerobot/pi0_libero_finetuned --env.type=libero \\
        --env.task=libero_spatial,libero_object --env.hard_reset=false \\
        --rollout.num_inference_steps=4 --rollout.n_action_steps=5 --eval.n_episodes=50

The protocol is the trainer's: the same sampler and K, and episode i reset with seed `--eval.seed` + i
and drawing its initial noise from a generator of the same seed. The same command gives the same number,
and it reproduces the trainer's evaluation of a checkpoint given the run's env, `--rollout.*` and
`--eval.*` values (the same `--eval.batch_size` for the last bit). Every task the env config selects is
evaluated on its own (`--eval.n_episodes` per task; on LIBERO episode i starts from init state i),
with per-task, per-suite and overall success. Writes `eval_info.json` in `lerobot-eval`'s layout
(`overall.pc_success`, `per_group`, `per_task[].metrics`, plus Wilson intervals and mean lengths) and
videos (when the env renders) to `--output_dir`, by default `outputs/eval/<date>/<time>_<job_name>`.

No `from __future__ import annotations`: LeRobot's parser reads the config class from `main`'s annotation.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lerobot.configs import parser
from lerobot.configs.policies import PreTrainedConfig
from lerobot.envs.configs import EnvConfig

from lerobot_pirl.runtime.config import (
    ConfigError,
    EvalConfig,
    PolicyOptionsConfig,
    RolloutConfig,
    _default_env,
    check_device,
    check_output_dir,
    load_policy_config,
    timestamped_output_dir,
)
from lerobot_pirl.scripts._cli import run, setup_logging


@dataclass
class EvalEpisodesConfig:
    """`--eval.*` of lerobot-pirl-eval: the trainer's EvalConfig without its training schedule."""

    n_episodes: int = EvalConfig.n_episodes  # per task
    # Parallel eval envs; default: all episodes at once (at most 50) for metaworld_state, else 10.
    batch_size: int | None = None
    num_workers: int | None = None  # env worker processes; None = one per core, at most one per env
    seed: int = EvalConfig.seed  # episode i uses seed + i, as in training
    videos: int = EvalConfig.videos  # episodes to record per task (when the env renders)

    def __post_init__(self):
        self.to_eval_config()  # its value checks, at parse time

    def to_eval_config(self) -> EvalConfig:
        return EvalConfig(**asdict(self))


@dataclass
class EvalRolloutConfig:
    """`--rollout.*` of lerobot-pirl-eval: how the episodes are sampled and scored, as in training."""

    n_action_steps: int | None = None  # C, actions executed per decision; None = the policy's own
    num_inference_steps: int | None = None  # K, denoising steps; None = the policy's own
    sparse_reward: bool = RolloutConfig.sparse_reward  # +1 at the first success; false = the env's reward
    reward_scale: float = RolloutConfig.reward_scale  # multiplies the dense reward
    end_on_success: bool = RolloutConfig.end_on_success  # the episode ends at its first success
    fast_render: bool = RolloutConfig.fast_render  # LIBERO: cheap rendering inside every env worker
    use_async_envs: bool = RolloutConfig.use_async_envs  # LeRobot's one process per env

    def __post_init__(self):
        self.to_rollout_config()  # its value checks, at parse time

    def to_rollout_config(self) -> RolloutConfig:
        return RolloutConfig(**asdict(self))


@dataclass
class EvalPolicyOptionsConfig:
    """`--policy_options.*` of lerobot-pirl-eval: how a VLA checkpoint is read."""

    tokenizer: str | None = PolicyOptionsConfig.tokenizer  # hub id or local folder, as in training
    pad_missing_cameras: bool = PolicyOptionsConfig.pad_missing_cameras  # blank images for absent cameras

    def to_policy_options(self) -> PolicyOptionsConfig:
        return PolicyOptionsConfig(**asdict(self))


@dataclass
class EvalPipelineConfig:
    policy: PreTrainedConfig | None = None
    env: EnvConfig = field(default_factory=_default_env)
    eval: EvalEpisodesConfig = field(default_factory=EvalEpisodesConfig)
    rollout: EvalRolloutConfig = field(default_factory=EvalRolloutConfig)
    policy_options: EvalPolicyOptionsConfig = field(default_factory=EvalPolicyOptionsConfig)
    rename_map: dict[str, str] = field(default_factory=dict)  # env key -> policy key, as lerobot-eval
    output_dir: Path | None = None  # default: outputs/eval/<date>/<time>_<job_name>, as lerobot-eval
    job_name: str | None = None  # default: <env type>_<policy type>
    device: str | None = None

    def validate(self) -> None:
        policy_path = parser.get_path_arg("policy")
        if not policy_path:
            raise ConfigError("lerobot-pirl-eval needs --policy.path=<checkpoint folder or hub id>")
        self.policy = load_policy_config(policy_path, parser.get_cli_overrides("policy"))
        check_device("--device", self.device)
        if not self.job_name:
            self.job_name = f"{self.env.type}_{self.policy.type}"
        if self.output_dir is None:
            self.output_dir = timestamped_output_dir("outputs/eval", self.job_name)
        check_output_dir(Path(self.output_dir).expanduser().absolute())

    @classmethod
    def __get_path_fields__(cls) -> list[str]:
        return ["policy"]


def evaluate_policy_per_task(cfg: EvalPipelineConfig):
    """Load the policy once, then for every task the env config selects build `eval.batch_size` envs and
    run `eval.n_episodes` ODE episodes. Returns a `runtime.suite_evaluation.SuiteEvalResult`."""
    from lerobot_pirl.runtime.config import TrainConfig
    from lerobot_pirl.runtime.factory import build_rl_policy, resolve_device
    from lerobot_pirl.runtime.suite_evaluation import evaluate_per_task

    device = resolve_device(cfg.device)
    train_cfg = TrainConfig(
        policy=cfg.policy,
        env=cfg.env,
        rollout=cfg.rollout.to_rollout_config(),
        eval=cfg.eval.to_eval_config(),
        policy_options=cfg.policy_options.to_policy_options(),
        rename_map=cfg.rename_map,
    )
    policy, preprocessor, postprocessor = build_rl_policy(train_cfg, cfg.policy.pretrained_path, device)
    video_dir = Path(cfg.output_dir) / "videos" if cfg.output_dir is not None else None
    return evaluate_per_task(
        train_cfg, policy, preprocessor, postprocessor, device=device, video_dir=video_dir
    )


def evaluate_policy(cfg: EvalPipelineConfig):
    """The overall EvalResult of `evaluate_policy_per_task` (all episodes of all selected tasks)."""
    return evaluate_policy_per_task(cfg).overall()


@parser.wrap()
def main(cfg: EvalPipelineConfig) -> int:
    setup_logging()
    cfg.validate()
    begin = time.perf_counter()
    results = evaluate_policy_per_task(cfg)
    eval_s = time.perf_counter() - begin
    if len(results.tasks) > 1:
        print(results.table())
    print(f"success {results.overall().summary()}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    info_path = Path(cfg.output_dir) / "eval_info.json"
    info_path.write_text(json.dumps(results.to_lerobot_eval_info(eval_s), indent=2))
    print(f"results: {info_path}")
    return 0


def cli() -> None:
    run(main, "lerobot-pirl-eval")


if __name__ == "__main__":
    cli()
