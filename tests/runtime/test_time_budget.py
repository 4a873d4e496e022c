import time
from types import SimpleNamespace

from lerobot_pirl.runtime.checkpoint import TrainerState
from lerobot_pirl.runtime.trainer import Trainer


def budget_probe(elapsed_before_s: float, running_for_s: float, max_minutes: float) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # only the budget logic, no envs or policy
    trainer.cfg = SimpleNamespace(iterations=10**9, max_env_steps=None, max_minutes=max_minutes)
    trainer.state = TrainerState(elapsed_s=elapsed_before_s)
    trainer._elapsed_before = elapsed_before_s
    trainer._run_started = time.perf_counter() - running_for_s
    return trainer


def test_the_time_budget_counts_each_second_once_also_after_a_resume():
    trainer = budget_probe(elapsed_before_s=50.0, running_for_s=5.0, max_minutes=1.0)
    trainer.state.elapsed_s = trainer._elapsed_s()  # what the loop records after an iteration
    assert 54.9 < trainer.state.elapsed_s < 56.0
    assert not trainer._budget_spent()  # 55 s of a 60 s budget (counting twice would say 60)
    assert budget_probe(elapsed_before_s=50.0, running_for_s=11.0, max_minutes=1.0)._budget_spent()
