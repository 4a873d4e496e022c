"""Pick the FlowAdapter for a LeRobot policy, and load flow-policy checkpoints safely.

``load_flow_policy`` goes through LeRobot's own loaders (``get_policy_class(...).from_pretrained`` and
``make_pre_post_processors`` with the checkpoint's saved processors) and then checks that the weights
really arrived: ``PI0Policy.from_pretrained`` / ``PI05Policy.from_pretrained`` print a warning and
return a randomly initialised model when the weights file cannot be read or does not fit, and LeRobot's
generic loader uses ``strict=False``. We refuse such loads with one error line.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lerobot_pirl.adapters.base import FlowAdapter

SUPPORTED_POLICY_TYPES = ("pi0", "pi05", "smolvla", "flow_mlp")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VALUES_CHECKED = 8  # small tensors compared by value after loading (random init never matches them)


class FlowPolicyLoadError(RuntimeError):
    """A checkpoint could not be loaded as a working flow policy (bad path, missing or unusable weights)."""


def make_adapter(policy: nn.Module, **options: Any) -> FlowAdapter:
    """The FlowAdapter for ``policy``, chosen by ``policy.config.type``.

    ``options`` go to the adapter's constructor: for pi0/pi05/smolvla ``train_vlm``, ``lora_rank``,
    ``lora_alpha``, ``autocast_dtype``, ``gradient_checkpointing``, ``num_steps`` (see
    :class:`lerobot_pirl.adapters.vla_base.VLAFlowAdapter`); for flow_mlp see ``FlowMLPAdapter``.
    """
    policy_type = getattr(getattr(policy, "config", None), "type", None)
    if policy_type == "pi0":
        from lerobot_pirl.adapters.pi0 import PI0Adapter

        return PI0Adapter(policy, **options)
    if policy_type == "pi05":
        from lerobot_pirl.adapters.pi05 import PI05Adapter

        return PI05Adapter(policy, **options)
    if policy_type == "smolvla":
        from lerobot_pirl.adapters.smolvla import SmolVLAAdapter

        return SmolVLAAdapter(policy, **options)
    if policy_type == "flow_mlp":
        from lerobot_pirl.adapters.flow_mlp import FlowMLPAdapter

        return FlowMLPAdapter(policy, **options)
    raise ValueError(_unsupported_message(policy_type))


def load_flow_policy(
    path_or_repo_id: str | Path,
    device: str = "cpu",
    tokenizer: Any | None = None,
    tokenizer_name: str | None = None,
    **options: Any,
) -> tuple[nn.Module, Any, Any]:
    """Load a pi0 / pi05 / smolvla / flow_mlp checkpoint with its own processors.

    Args:
        path_or_repo_id: a checkpoint folder (``config.json`` + ``model.safetensors`` + the processor
            files; a LeRobot ``checkpoints/<step>`` folder holding ``pretrained_model/`` works too) or a
            hub repo id (downloaded, or taken from the local cache when offline).
        device: where the policy and the preprocessor's outputs go.
        tokenizer: a tokenizer object used instead of the one named in the saved preprocessor (pi0/pi05
            name the gated ``google/paligemma-3b-pt-224``; pass one to work offline).
        tokenizer_name: a hub id or local folder to load the tokenizer from instead (ignored when
            ``tokenizer`` is given); unlike an object, the name is saved with the preprocessor.
        options: policy config fields to override before the model is built, e.g. ``num_inference_steps=4``
            or ``n_action_steps=5`` (unknown names raise).

    Returns:
        ``(policy, preprocessor, postprocessor)``, the policy in eval mode.

    Raises:
        FlowPolicyLoadError: bad path, missing files, weights that do not cover the model.
        ValueError: a policy type without a FlowAdapter, or an unknown config override.
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    folder = _resolve_checkpoint_folder(str(path_or_repo_id))
    policy_type = json.loads((folder / CONFIG_FILE).read_text()).get("type")
    if policy_type not in SUPPORTED_POLICY_TYPES:
        raise ValueError(_unsupported_message(policy_type))
    if policy_type == "flow_mlp":
        import lerobot_pirl.policies.flow_mlp  # noqa: F401  (registers the config type with draccus)

    config = PreTrainedConfig.from_pretrained(folder)
    for name, value in options.items():
        if not hasattr(config, name):
            raise ValueError(f"{type(config).__name__} has no field '{name}' to override")
        setattr(config, name, value)
    config.device = device

    try:
        policy = get_policy_class(policy_type).from_pretrained(folder, config=config)
    except Exception as error:
        raise FlowPolicyLoadError(
            f"could not build the {policy_type} policy from '{folder}': {_first_line(error)}"
        ) from error
    _check_weights_loaded(policy, folder / WEIGHTS_FILE)
    policy.to(device).eval()

    check_processor_steps(folder)
    preprocessor_overrides: dict[str, dict[str, Any]] = {"device_processor": {"device": device}}
    if _has_tokenizer_step(folder / PREPROCESSOR_FILE):
        if tokenizer is not None:
            preprocessor_overrides["tokenizer_processor"] = {"tokenizer": tokenizer}
        elif tokenizer_name is not None:
            local = Path(tokenizer_name).expanduser()  # a folder is saved absolute: usable from anywhere
            name = str(local.absolute()) if local.is_dir() else tokenizer_name
            preprocessor_overrides["tokenizer_processor"] = {"tokenizer_name": name}
    try:
        preprocessor, postprocessor = make_pre_post_processors(
            policy.config, pretrained_path=str(folder), preprocessor_overrides=preprocessor_overrides
        )
    except Exception as error:
        hint = (
            " (its tokenizer could not be loaded: give --policy_options.tokenizer=<hub id or local folder>)"
            if tokenizer is None and _has_tokenizer_step(folder / PREPROCESSOR_FILE)
            else ""
        )
        raise FlowPolicyLoadError(
            f"could not load the processors saved in '{folder}'{hint}: {_first_line(error)}"
        ) from error
    return policy, preprocessor, postprocessor


# ----------------------------------------------------------------------------------------------------------


def _unsupported_message(policy_type: object) -> str:
    return (
        f"no FlowAdapter for policy type {policy_type!r}: lerobot-pirl supports the flow-matching types "
        f"{', '.join(SUPPORTED_POLICY_TYPES)}"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _resolve_checkpoint_folder(path_or_repo_id: str) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FlowPolicyLoadError(f"'{path}' is a file, not a checkpoint folder")
        folder = path
    elif _REPO_ID.match(path_or_repo_id):
        from huggingface_hub import snapshot_download

        try:
            downloaded = snapshot_download(
                repo_id=path_or_repo_id, allow_patterns=["*.json", "*.safetensors"]
            )
        except Exception as error:
            raise FlowPolicyLoadError(
                f"'{path_or_repo_id}' is not a local folder and could not be fetched from the hub "
                f"({_first_line(error)})"
            ) from None
        folder = Path(downloaded)
    else:
        raise FlowPolicyLoadError(f"no checkpoint folder at '{path_or_repo_id}'")

    if not (folder / CONFIG_FILE).is_file() and (folder / "pretrained_model" / CONFIG_FILE).is_file():
        folder = folder / "pretrained_model"  # a LeRobot training checkpoint folder
    required = (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FlowPolicyLoadError(
            f"'{folder}' is not a LeRobot policy checkpoint: missing {', '.join(missing)}"
        )
    return folder


def check_processor_steps(folder: Path) -> None:
    """Refuse saved processors that would make LeRobot's loader import code (issue 17).

    LeRobot builds a step named by ``registry_name`` from its registry, but imports any ``"class":
    "module.Name"`` and calls it with the step's ``config``: a folder from the hub or a stranger could name
    ``subprocess.Popen``. Only registered steps, and classes that are registered steps, pass; nothing a
    refused file names is imported.
    """
    from lerobot.processor import ProcessorStepRegistry

    registered = {ProcessorStepRegistry.get(name) for name in ProcessorStepRegistry.list()}
    known_classes = {f"{cls.__module__}.{cls.__qualname__}" for cls in registered}
    for file_name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        try:
            steps = json.loads((folder / file_name).read_text())["steps"]
        except (ValueError, KeyError, TypeError) as error:
            raise FlowPolicyLoadError(f"'{folder / file_name}' is not a processor file ({error})") from None
        for index, step in enumerate(steps if isinstance(steps, list) else [None]):
            if not isinstance(step, dict):
                raise FlowPolicyLoadError(f"'{folder / file_name}': step {index} is not a JSON object")
            if "registry_name" in step:
                continue  # looked up in LeRobot's registry, never imported
            class_path = step.get("class")
            if class_path not in known_classes:
                raise FlowPolicyLoadError(
                    f"'{folder / file_name}': step {index} names {class_path!r}, which is not a registered "
                    "LeRobot processor step; refusing to import it"
                )


def _has_tokenizer_step(preprocessor_file: Path) -> bool:
    steps = json.loads(preprocessor_file.read_text()).get("steps", [])
    return any(step.get("registry_name") == "tokenizer_processor" for step in steps)


def _as_policy_keys(policy: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename checkpoint keys the way the policy's loader does (pi0/pi05 fix openpi-style keys and add the
    ``model.`` prefix; other policies load keys as they are)."""
    fix_keys = getattr(policy, "_fix_pytorch_state_dict_keys", None)
    if fix_keys is None:
        return tensors
    # pi0/pi05 log a warning per patch-embedding key on every call; LeRobot's own load already did.
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_key_warnings)
    try:
        fixed = fix_keys(tensors, policy.config)
    finally:
        root_logger.removeFilter(_drop_key_warnings)
    return {key if key.startswith("model.") else f"model.{key}": value for key, value in fixed.items()}


def _drop_key_warnings(record: logging.LogRecord) -> bool:
    return "might need handling" not in record.getMessage()


def _check_weights_loaded(policy: nn.Module, weights_file: Path) -> None:
    """Raise unless every policy tensor came from ``weights_file`` (names, shapes, and a value sample)."""
    from safetensors import safe_open

    expected = policy.state_dict()
    with safe_open(str(weights_file), framework="pt") as reader:
        file_keys = list(reader.keys())
        shapes = {key: tuple(reader.get_slice(key).get_shape()) for key in file_keys}
        # The smallest tensors (norms, biases) are cheap to read; keep the non-constant ones, which a
        # fresh random initialisation cannot reproduce.
        smallest = sorted(file_keys, key=lambda key: math.prod(shapes[key]))[: 8 * _VALUES_CHECKED]
        sample = {key: reader.get_tensor(key) for key in smallest}
    provided = _as_policy_keys(
        policy, {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    )

    storage_of = {key: _storage_key(value) for key, value in expected.items()}
    provided_storages = {storage_of[key] for key in provided if key in storage_of}
    # The language-model heads never run in the flow path, so a checkpoint may leave them out (torch's
    # strict load still copies every other tensor before it raises, and pi0/pi05 swallow that error).
    missing = [
        key
        for key in expected
        if key not in provided and storage_of[key] not in provided_storages and "lm_head" not in key
    ]
    mismatched = [
        key
        for key in expected
        if key in provided and tuple(provided[key].shape) != tuple(expected[key].shape)
    ]
    informative = {
        key: value for key, value in sample.items() if value.numel() > 1 and value.unique().numel() > 1
    }
    checked = _as_policy_keys(policy, dict(list(informative.items())[:_VALUES_CHECKED]))
    differing = [
        key
        for key, value in checked.items()
        if key in expected
        and tuple(value.shape) == tuple(expected[key].shape)
        and not torch.equal(expected[key].detach().cpu(), value.to(expected[key].dtype))
    ]
    problems = [
        f"{len(found)} tensors {what} (e.g. {found[0]})"
        for found, what in ((missing, "missing"), (mismatched, "of another shape"), (differing, "not loaded"))
        if found
    ]
    if problems:
        raise FlowPolicyLoadError(
            f"the weights in '{weights_file}' do not fit the {policy.config.type} policy: "
            f"{'; '.join(problems)}; refusing a model with random weights"
        )


def _storage_key(tensor: Tensor) -> tuple:
    # Tied tensors (saved once by safetensors) share storage.
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
