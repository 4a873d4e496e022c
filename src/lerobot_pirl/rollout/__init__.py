"""Chunked collection over LeRobot vector envs -> RolloutBatch; env-side helpers."""
