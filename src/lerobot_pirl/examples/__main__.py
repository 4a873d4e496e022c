"""Print the packaged examples folder, for `--config_path=$(python -m lerobot_pirl.examples)/libero/...`."""

from lerobot_pirl.examples import EXAMPLES_DIR

print(EXAMPLES_DIR.resolve())
