"""The CLIs' logging drops LeRobot's known-harmless start-up notices and nothing else."""

import logging

from lerobot_pirl.scripts._cli import setup_logging


def test_torchcodec_fallback_and_codec_notices_are_dropped_other_warnings_kept(caplog):
    setup_logging()  # replaces the root's handlers, caplog's too
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    import_utils = logging.getLogger("lerobot.utils.import_utils")
    import_utils.warning(
        "Could not load libtorchcodec...\n(100 lines)\n'torchcodec' is installed but cannot be loaded "
        "(see the error above). Falling back to 'pyav' as a default decoder."
    )
    logging.getLogger("lerobot.configs.video").info("Using video codec: libsvtav1")
    import huggingface_hub.serialization._torch as hub_torch

    hub_torch.logger.info(
        "Model weights successfully saved to run/checkpoints/000010.partial/pretrained_model!"
    )
    import_utils.warning("'rerun' is required but not installed")
    logging.getLogger("lerobot.configs.video").warning("No hardware encoder available")
    assert [r.getMessage() for r in caplog.records] == [
        "'rerun' is required but not installed",
        "No hardware encoder available",
    ]
