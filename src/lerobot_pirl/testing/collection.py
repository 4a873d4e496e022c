"""One iteration's collection and update samples outside a Trainer, as `LocalCollection` does them."""

from __future__ import annotations

import functools

from lerobot_pirl.algorithms.base import make_algorithm
from lerobot_pirl.runtime.envs import episode_reset_hook


def collect_samples(cfg, collector):
    """(samples, batches, algorithm statistics) of one iteration of `cfg.algorithm` on `collector`."""
    algorithm = make_algorithm(cfg.algorithm)
    batches = algorithm.collect(collector, cfg.rollout, functools.partial(episode_reset_hook, cfg.env))
    samples, stats = algorithm.update_samples(batches)
    return samples, batches, stats
