"""Offline test helpers (no hub, no download).

- ``lerobot_pirl.testing.toy_adapter``: an analytic FlowAdapter for testing the RL layer alone.
- ``lerobot_pirl.testing.tiny_models``: tiny, randomly initialised pi0 / pi05 / smolvla policies with
  their LeRobot processors and local tokenizers.

Import the submodule you need; this package imports nothing eagerly so the toy helpers stay light.
"""
