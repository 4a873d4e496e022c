"""Tiny, randomly initialised, fully offline pi0 / pi05 / smolvla policies for tests and benchmarks.

Each ``make_tiny_<type>`` returns a :class:`TinyPolicy` ``(policy, preprocessor, postprocessor)``: a real
LeRobot policy object of that type (same classes, same forward code, only the widths shrunk) and its
real LeRobot processor pipelines, with a local word-level tokenizer instead of a hub download.

How the models are shrunk (LeRobot 0.6.1 has no small variant):

- pi0 / pi05 build their PaliGemma + Gemma expert from the module-level ``get_gemma_config`` and the
  classes ``PaliGemmaForConditionalGenerationWithPiGemma`` / ``PiGemmaForCausalLM`` named in
  ``modeling_pi0`` / ``modeling_pi05``. :func:`tiny_paligemma_architecture` swaps those three names for
  tiny versions while it is active (SigLIP, projector width and the hard-coded 257,152-token vocabulary
  are shrunk in the config before the modules are built). Keep 8 query heads and 1 KV head: LeRobot's
  joint attention hard-codes ``8 * head_dim``. Loading a saved tiny pi0/pi05 checkpoint needs the same
  context, since its config still names ``gemma_2b`` / ``gemma_300m``.
- smolvla builds its VLM from ``config.vlm_model_name``; we point it at a local folder holding a tiny
  ``SmolVLMConfig`` and processor (written once, see ``vlm_dir``) with ``load_vlm_weights=False``.

Typical use::

    inputs, outputs = make_tiny_features(image_shape=(3, 32, 32), state_dim=4, action_dim=4)
    policy, preprocessor, postprocessor = make_tiny_pi0(inputs, outputs, chunk_size=8, num_steps=4)
    batch = preprocessor(make_tiny_observation(inputs, batch_size=4))
    actions = policy.predict_action_chunk(batch)  # (4, 8, 4)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor

# Words the tiny tokenizer knows. Anything else maps to <unk>; pi05 writes the discretised state as
# numbers 0..255 into its prompt, hence the digits.
_SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
# SmolVLA reads these ids from its processor's tokenizer (``fake_image_token_id`` ...).
_SMOLVLM_IMAGE_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
_TASK_VOCABULARY = (
    "task state action pick place put push pull open close turn lift reach move grasp the a an up down "
    "on in into to of from and cube block bowl plate drawer door button window peg red green blue "
    "yellow black white left right top bottom front back table"
)
_TASK_WORDS = _TASK_VOCABULARY.split()
_PUNCTUATION = list(":;,.!?-_'\"()")


@dataclass(frozen=True)
class TinyPaliGemmaSizes:
    """Widths of the tiny pi0/pi05 backbone (real pi0: VLM 2048 wide, expert 1024, depth 18)."""

    vlm_width: int = 64
    vlm_mlp_dim: int = 128
    expert_width: int = 32  # differs from vlm_width so pooled (F) and hidden (W) sizes cannot be confused
    expert_mlp_dim: int = 64
    depth: int = 2  # VLM and expert depth; LeRobot zips their layers, so they must be equal
    head_dim: int = 16  # 8 query heads and 1 KV head are hard-coded by LeRobot
    vision_width: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    vision_mlp_dim: int = 64
    patch_size: int = 16
    vocab_size: int = 512  # replaces PaliGemma's hard-coded 257,152 (embedding tables dominate otherwise)


@dataclass(frozen=True)
class TinySmolVLMSizes:
    """Widths of the tiny SmolVLM backbone of smolvla (the expert is 0.75x as wide by default)."""

    text_width: int = 64
    text_mlp_dim: int = 128
    depth: int = 4  # smolvla alternates self-attention and cross-attention layers every 2 layers
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    vision_width: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    vision_mlp_dim: int = 64
    patch_size: int = 16
    scale_factor: int = 2  # SmolVLM's pixel shuffle: (image/patch)^2 / scale^2 tokens per image
    vocab_size: int = 512


class TinyPolicy(NamedTuple):
    policy: Any  # a PI0Policy / PI05Policy / SmolVLAPolicy
    preprocessor: PolicyProcessorPipeline
    postprocessor: PolicyProcessorPipeline


# ----------------------------------------------------------------------------------------------------------
# Features, stats, observations


def make_tiny_features(
    image_shape: tuple[int, int, int] = (3, 32, 32),
    state_dim: int = 4,
    action_dim: int = 4,
    image_keys: Iterable[str] = ("observation.image",),
) -> tuple[dict[str, PolicyFeature], dict[str, PolicyFeature]]:
    """LeRobot ``(input_features, output_features)``: cameras (C, H, W), a state vector, an action vector."""
    inputs = {key: PolicyFeature(type=FeatureType.VISUAL, shape=tuple(image_shape)) for key in image_keys}
    inputs[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    return inputs, outputs


def make_tiny_stats(
    input_features: dict[str, PolicyFeature], output_features: dict[str, PolicyFeature]
) -> dict[str, dict[str, Tensor]]:
    """Dataset stats under which every LeRobot normalisation mode is the identity on the non-visual features.

    mean 0 / std 1 (MEAN_STD), min -1 / max 1 (MIN_MAX), q01 -1 / q99 1 (QUANTILES, used by pi05),
    q10 -1 / q90 1 (QUANTILE10). Values in [-1, 1] stay in pi05's state discretisation range.
    """
    stats: dict[str, dict[str, Tensor]] = {}
    for key, feature in {**input_features, **output_features}.items():
        if feature.type is FeatureType.VISUAL:
            continue
        zeros, ones = torch.zeros(feature.shape), torch.ones(feature.shape)
        stats[key] = {
            "mean": zeros,
            "std": ones,
            "min": -ones,
            "max": ones,
            "q01": -ones,
            "q99": ones,
            "q10": -ones,
            "q90": ones,
        }
    return stats


def make_tiny_observation(
    input_features: dict[str, PolicyFeature],
    batch_size: int,
    task: str | list[str] = "pick up the red cube",
    seed: int = 0,
) -> dict[str, Any]:
    """A raw, env-like observation batch for a preprocessor: images in [0, 1] (B, C, H, W), state in
    [-1, 1] (B, S), and ``task`` as a list of B strings."""
    generator = torch.Generator().manual_seed(seed)
    observation: dict[str, Any] = {}
    for key, feature in input_features.items():
        if feature.type is FeatureType.VISUAL:
            observation[key] = torch.rand((batch_size, *feature.shape), generator=generator)  # (B, C, H, W)
        elif feature.type is FeatureType.STATE:
            observation[key] = torch.rand((batch_size, *feature.shape), generator=generator) * 2 - 1  # (B, S)
    observation["task"] = [task] * batch_size if isinstance(task, str) else list(task)
    return observation


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def make_tiny_tokenizer(extra_words: Iterable[str] = (), with_smolvlm_tokens: bool = False):
    """A local, deterministic word-level ``PreTrainedTokenizerFast`` (built with ``tokenizers``, no download).

    Lower-cases, splits on whitespace and punctuation, knows a small robot-task vocabulary, the numbers
    0..255 and ``extra_words``; everything else is ``<unk>``. Same arguments, same ids: a tokenizer made
    again later reproduces the one a tiny checkpoint was built with. ``with_smolvlm_tokens`` adds the
    image marker tokens SmolVLA's processor needs.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(_SPECIAL_TOKENS)
    if with_smolvlm_tokens:
        words += list(_SMOLVLM_IMAGE_TOKENS.values())
    words += [str(number) for number in range(256)] + _TASK_WORDS + _PUNCTUATION
    words += [word.lower() for word in extra_words]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra_special = dict(_SMOLVLM_IMAGE_TOKENS) if with_smolvlm_tokens else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens=extra_special,
    )


@contextlib.contextmanager
def _tokenizer_loads_as(tokenizer) -> Iterator[None]:
    """Make LeRobot's TokenizerProcessorStep get ``tokenizer`` whatever name it asks for.

    pi0/pi05's processor factories hard-code the gated ``google/paligemma-3b-pt-224``. Building the
    pipeline through LeRobot's own factory under this patch keeps the saved processor config identical
    to a real checkpoint's (it names that tokenizer); loading it back takes the tokenizer as an override.
    """
    from lerobot.processor import tokenizer_processor

    class _FixedTokenizer:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return tokenizer

    with mock.patch.object(tokenizer_processor, "AutoTokenizer", _FixedTokenizer):
        yield


# ----------------------------------------------------------------------------------------------------------
# pi0 / pi05


@contextlib.contextmanager
def tiny_paligemma_architecture(sizes: TinyPaliGemmaSizes = TinyPaliGemmaSizes()) -> Iterator[None]:
    """While active, PI0Policy / PI05Policy construct the tiny backbone described by ``sizes``.

    Wrap both building and loading (``from_pretrained`` / ``load_flow_policy``) of tiny pi0/pi05
    checkpoints in it. Policies built inside keep working after the context exits.
    """
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    def tiny_gemma_config(variant: str):
        # The VLM is "gemma_2b" and the expert "gemma_300m" by default; keep that split.
        is_vlm = variant == "gemma_2b"
        return modeling_pi0.GemmaConfig(
            width=sizes.vlm_width if is_vlm else sizes.expert_width,
            depth=sizes.depth,
            mlp_dim=sizes.vlm_mlp_dim if is_vlm else sizes.expert_mlp_dim,
            num_heads=8,
            num_kv_heads=1,
            head_dim=sizes.head_dim,
        )

    with contextlib.ExitStack() as stack:
        for module in (modeling_pi0, modeling_pi05):
            vlm_class = module.PaliGemmaForConditionalGenerationWithPiGemma
            expert_class = module.PiGemmaForCausalLM

            class TinyPaliGemma(vlm_class):
                def __init__(self, config, **kwargs):
                    vision = config.vision_config
                    vision.hidden_size = sizes.vision_width
                    vision.num_hidden_layers = sizes.vision_depth
                    vision.num_attention_heads = sizes.vision_heads
                    vision.intermediate_size = sizes.vision_mlp_dim
                    vision.patch_size = sizes.patch_size
                    # LeRobot pins the projector to 2048 (gemma_2b's width): project to the tiny width.
                    vision.projection_dim = config.text_config.hidden_size
                    config.text_config.vocab_size = sizes.vocab_size
                    super().__init__(config, **kwargs)

            class TinyGemmaExpert(expert_class):
                def __init__(self, config, **kwargs):
                    config.vocab_size = sizes.vocab_size  # its lm_head is never used
                    super().__init__(config, **kwargs)

            stack.enter_context(mock.patch.object(module, "get_gemma_config", tiny_gemma_config))
            stack.enter_context(
                mock.patch.object(module, "PaliGemmaForConditionalGenerationWithPiGemma", TinyPaliGemma)
            )
            stack.enter_context(mock.patch.object(module, "PiGemmaForCausalLM", TinyGemmaExpert))
        yield


def _first_camera_side(input_features: dict[str, PolicyFeature]) -> int:
    cameras = [feature for feature in input_features.values() if feature.type is FeatureType.VISUAL]
    if not cameras:
        raise ValueError("tiny VLA policies need at least one VISUAL input feature")
    return max(cameras[0].shape[-2:])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _make_tiny_paligemma_policy(
    policy_type: str,
    input_features: dict[str, PolicyFeature],
    output_features: dict[str, PolicyFeature],
    *,
    tokenizer_max_length: int,
    chunk_size: int = 8,
    n_action_steps: int = 4,
    num_steps: int = 4,
    image_resolution: int | None = None,
    tokenizer=None,
    dataset_stats: dict[str, dict[str, Tensor]] | None = None,
    sizes: TinyPaliGemmaSizes = TinyPaliGemmaSizes(),
    seed: int = 0,
    device: str = "cpu",
    **config_kwargs: Any,
) -> TinyPolicy:
    from lerobot.policies.pi0 import PI0Config, PI0Policy
    from lerobot.policies.pi05 import PI05Config, PI05Policy

    config_class, policy_class = {"pi0": (PI0Config, PI0Policy), "pi05": (PI05Config, PI05Policy)}[
        policy_type
    ]
    side = image_resolution or _round_up(_first_camera_side(input_features), sizes.patch_size)
    config = config_class(
        input_features=dict(input_features),
        output_features=dict(output_features),
        chunk_size=chunk_size,
        n_action_steps=n_action_steps,
        num_inference_steps=num_steps,
        image_resolution=(side, side),
        tokenizer_max_length=tokenizer_max_length,
        device=device,
        push_to_hub=False,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]), tiny_paligemma_architecture(sizes):
        torch.manual_seed(seed)
        policy = policy_class(config)
    policy.eval()
    stats = dataset_stats if dataset_stats is not None else make_tiny_stats(input_features, output_features)
    with _tokenizer_loads_as(tokenizer if tokenizer is not None else make_tiny_tokenizer()):
        preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    return TinyPolicy(policy, preprocessor, postprocessor)


def make_tiny_pi0(
    input_features: dict[str, PolicyFeature],
    output_features: dict[str, PolicyFeature],
    *,
    tokenizer_max_length: int = 32,
    **options: Any,
) -> TinyPolicy:
    """A tiny randomly initialised ``PI0Policy`` with its LeRobot processors (~0.25 M parameters).

    Args:
        input_features / output_features: LeRobot features (see :func:`make_tiny_features`).
        chunk_size: H, actions per model call (8). n_action_steps: C, actions executed per call (4).
        num_steps: K, denoising steps (``num_inference_steps``, 4).
        image_resolution: side the model resizes cameras to (default: the first camera's larger side,
            rounded up to the patch size).
        tokenizer: a tokenizer object (default :func:`make_tiny_tokenizer`); ids must be < vocab_size.
        dataset_stats: normalisation stats (default :func:`make_tiny_stats`, identity normalisation).
        sizes: backbone widths. seed: torch seed for the weights (0; global RNG state is restored).
        device: "cpu" by default. Any other keyword: a ``PI0Config`` field (e.g. ``dtype="bfloat16"``).
    """
    return _make_tiny_paligemma_policy(
        "pi0", input_features, output_features, tokenizer_max_length=tokenizer_max_length, **options
    )


def make_tiny_pi05(
    input_features: dict[str, PolicyFeature],
    output_features: dict[str, PolicyFeature],
    *,
    tokenizer_max_length: int = 48,
    **options: Any,
) -> TinyPolicy:
    """A tiny randomly initialised ``PI05Policy`` with its LeRobot processors; arguments as
    :func:`make_tiny_pi0`. pi05 writes the discretised state into the prompt ("Task: ..., State: 12 200
    ...;\\nAction: "), hence the longer default ``tokenizer_max_length``."""
    return _make_tiny_paligemma_policy(
        "pi05", input_features, output_features, tokenizer_max_length=tokenizer_max_length, **options
    )


# ----------------------------------------------------------------------------------------------------------
# smolvla


def _default_tiny_vlm_root() -> Path:
    root = os.environ.get("LEROBOT_PIRL_CACHE") or Path.home() / ".cache" / "lerobot_pirl"
    return Path(root) / "tiny_smolvlm"


def write_tiny_smolvlm(
    folder: str | Path, sizes: TinySmolVLMSizes = TinySmolVLMSizes(), image_size: int = 32
) -> Path:
    """Write a tiny ``SmolVLMConfig`` + processor (tokenizer, image and video processors) to ``folder``.

    SmolVLA reads this folder through ``vlm_model_name`` (config and tokenizer only when
    ``load_vlm_weights=False``). The folder is written atomically and left alone if already complete.
    """
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "processor_config.json").is_file():
        return folder
    tokenizer = make_tiny_tokenizer(with_smolvlm_tokens=True)
    if len(tokenizer) > sizes.vocab_size:
        raise ValueError(f"tiny tokenizer has {len(tokenizer)} tokens > vocab_size {sizes.vocab_size}")
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": sizes.text_width,
            "intermediate_size": sizes.text_mlp_dim,
            "num_hidden_layers": sizes.depth,
            "num_attention_heads": sizes.num_heads,
            "num_key_value_heads": sizes.num_kv_heads,
            "head_dim": sizes.head_dim,
            "vocab_size": sizes.vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": 1024,
        },
        vision_config={
            "hidden_size": sizes.vision_width,
            "intermediate_size": sizes.vision_mlp_dim,
            "num_hidden_layers": sizes.vision_depth,
            "num_attention_heads": sizes.vision_heads,
            "image_size": image_size,
            "patch_size": sizes.patch_size,
        },
        scale_factor=sizes.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(_SMOLVLM_IMAGE_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    image_tokens = (image_size // sizes.patch_size) ** 2 // sizes.scale_factor**2
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
            do_image_splitting=False,
        ),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=image_tokens,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race; its folder is identical
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def make_tiny_smolvla(
    input_features: dict[str, PolicyFeature],
    output_features: dict[str, PolicyFeature],
    *,
    chunk_size: int = 8,
    n_action_steps: int = 4,
    num_steps: int = 4,
    image_resolution: int | None = None,
    tokenizer_max_length: int = 32,
    dataset_stats: dict[str, dict[str, Tensor]] | None = None,
    sizes: TinySmolVLMSizes = TinySmolVLMSizes(),
    vlm_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    **config_kwargs: Any,
) -> TinyPolicy:
    """A tiny randomly initialised ``SmolVLAPolicy`` with its LeRobot processors (~0.45 M parameters).

    The tiny VLM (config + tokenizer) lives in ``vlm_dir``, default
    ``$LEROBOT_PIRL_CACHE/tiny_smolvlm/<hash of sizes>`` (``~/.cache/lerobot_pirl`` if unset); the policy
    config stores that path, so saved checkpoints reload offline while it exists. The processors load
    the tokenizer from that folder too (no tokenizer override needed to reload). Other arguments as
    :func:`make_tiny_pi0`; ``config_kwargs`` go to ``SmolVLAConfig``.
    """
    from lerobot.policies.smolvla import SmolVLAConfig, SmolVLAPolicy

    side = image_resolution or _round_up(
        _first_camera_side(input_features), sizes.patch_size * sizes.scale_factor
    )
    if vlm_dir is None:
        key = json.dumps({**asdict(sizes), "image_size": side}, sort_keys=True)
        vlm_dir = _default_tiny_vlm_root() / hashlib.sha1(key.encode()).hexdigest()[:12]
    vlm_dir = write_tiny_smolvlm(vlm_dir, sizes, image_size=side)
    config = SmolVLAConfig(
        input_features=dict(input_features),
        output_features=dict(output_features),
        chunk_size=chunk_size,
        n_action_steps=n_action_steps,
        num_steps=num_steps,
        resize_imgs_with_padding=(side, side),
        tokenizer_max_length=tokenizer_max_length,
        vlm_model_name=str(vlm_dir),
        load_vlm_weights=False,
        num_vlm_layers=sizes.depth,
        device=device,
        push_to_hub=False,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = SmolVLAPolicy(config)
    policy.eval()
    stats = dataset_stats if dataset_stats is not None else make_tiny_stats(input_features, output_features)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    return TinyPolicy(policy, preprocessor, postprocessor)
