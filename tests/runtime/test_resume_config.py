"""What `--resume=true` may change (issue 17): the saved run's settings, except output, logging, budget
and the learner's address."""

import pytest

from lerobot_pirl.distributed.config import DistributedTrainConfig, TransportConfig
from lerobot_pirl.runtime.checkpoint import save_config
from lerobot_pirl.runtime.config import TRAIN_CONFIG_FILE, ConfigError, RolloutConfig


def saved_learner_run(tmp_path) -> DistributedTrainConfig:
    saved = DistributedTrainConfig(
        rollout=RolloutConfig(num_envs=4), transport=TransportConfig(num_actors=2), output_dir=tmp_path
    )
    save_config(saved, tmp_path / TRAIN_CONFIG_FILE)
    return saved


def test_a_resumed_learner_may_listen_elsewhere_and_run_longer(tmp_path):
    saved_learner_run(tmp_path)
    given = DistributedTrainConfig(transport=TransportConfig(port=6000), iterations=90, output_dir=tmp_path)
    given.resume = True
    given.adopt_saved_run(["output_dir", "resume", "transport.port", "iterations"])
    assert (given.transport.port, given.iterations) == (6000, 90)
    assert (given.rollout.num_envs, given.transport.num_actors) == (4, 2)  # the saved run's, not defaults


@pytest.mark.parametrize(
    ("flag", "given"),
    [
        ("transport.num_actors", DistributedTrainConfig(transport=TransportConfig(num_actors=3))),
        ("rollout.num_envs", DistributedTrainConfig(rollout=RolloutConfig(num_envs=8))),
    ],
)
def test_a_resume_that_would_change_the_run_is_refused(tmp_path, flag, given):
    saved_learner_run(tmp_path)
    given.output_dir, given.resume = tmp_path, True
    with pytest.raises(ConfigError, match=f"--{flag} cannot change on --resume=true"):
        given.adopt_saved_run(["output_dir", "resume", flag])
