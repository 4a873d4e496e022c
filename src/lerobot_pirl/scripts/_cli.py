"""Shared CLI plumbing: logging, one `<program>: error: <reason>` line per bad input (exit status 2),
and the end-of-training report."""

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.serialization._torch
from draccus.utils import ParsingError

from lerobot_pirl.runtime.config import ConfigError
from lerobot_pirl.runtime.metrics import OutputWriteError
from lerobot_pirl_launch.train import flag_value

# LeRobot's notices that are harmless for what we run, each a screenful or a line on every start: the
# 100-line torchcodec traceback before it falls back to pyav (FFmpeg's shared libraries are missing; our
# datasets hold no video), the video codec it picks for datasets that store images, and the weights
# notice of huggingface_hub, whose logger is named after its file.
HARMLESS_NOTICES = {
    "lerobot.utils.import_utils": "'torchcodec' is installed but cannot be loaded",
    "lerobot.configs.video": "Using video codec",
    # names the staging folder of a checkpoint, renamed a moment later; we log the final one
    huggingface_hub.serialization._torch.__file__: "Model weights successfully saved to",
}
_NOTICE_FILTERS = {  # one filter object per logger, so that setting logging up twice adds it once
    name: (lambda record, text=text: text not in str(record.msg)) for name, text in HARMLESS_NOTICES.items()
}


def setup_logging(tag: str = "") -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(levelname)s %(asctime)s {tag + ' ' if tag else ''}%(message)s",
        datefmt="%H:%M:%S",
        force=True,  # an imported library may have configured the root logger already
    )
    for logger_name, notice_filter in _NOTICE_FILTERS.items():
        logging.getLogger(logger_name).addFilter(notice_filter)


def root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def report_training(result) -> int:
    """Print a TrainResult's `SFT x% → RL y%` line and checkpoint. A run that stopped early prints its
    newest good checkpoint and a `stopped:` line instead, exit status 1."""
    if result.stopped_by_error:
        if result.checkpoint_dir is not None:
            print(f"checkpoint: {result.checkpoint_dir}")
        print(f"stopped: {result.stopped_by_error}", file=sys.stderr)
        return 1
    if result.checkpoint_dir is not None:
        print(result.summary())
        print(f"checkpoint: {result.checkpoint_dir}")
    return 0


def run(main: Callable[[], int], program: str) -> None:
    """Run a `@parser.wrap()` main. Bad input ends as one error line: our ConfigErrors, and draccus'
    ParsingError for a bad flag value (e.g. an unknown task, which the env config rejects in
    `__post_init__`), whose cause holds the real reason."""
    config_path = flag_value(sys.argv[1:], "--config_path")
    if config_path is not None and not Path(config_path).expanduser().is_file():
        print(f"{program}: error: --config_path={config_path}: no such file", file=sys.stderr)
        sys.exit(2)
    try:
        status = main()
    except ConfigError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        status = 2
    except ParsingError as error:
        print(f"{program}: error: {root_cause(error)}", file=sys.stderr)
        status = 2
    except OutputWriteError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        status = 1
    sys.exit(status)
