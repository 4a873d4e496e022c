"""FlowAdapter for LeRobot's smolvla (SmolVLM trunk + interleaved self/cross-attention expert).

Shape legend: B batch, P prefix tokens (images + language + state, padded to ``prefix_length``),
H chunk_size, A max_action_dim, S max_state_dim, F VLM width, W expert width.

The prefix pass mirrors the first half of ``VLAFlowMatching.sample_actions``; each velocity is the
model's own ``denoise_step``. Unlike pi0, smolvla's ``denoise_step`` appends the suffix keys/values to
the cache it is given and crops it back afterwards, which would tie every call's autograd graph to the
previous call's through the shared cache tensors; we hand it a clone each time (as pi0 does itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lerobot.policies.common.vla_utils import clone_past_key_values, make_att_2d_masks
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lerobot_pirl.adapters.vla_base import VLAFlowAdapter


@dataclass
class SmolVLAPrefix:
    """Adapter-private context data of smolvla."""

    past_key_values: object  # transformers DynamicCache of the prefix, never mutated by velocity calls
    prefix_pad_masks: Tensor  # (B, P) bool, valid prefix tokens


class SmolVLAAdapter(VLAFlowAdapter):
    """Drives a ``SmolVLAPolicy`` step by step. Options: see :class:`VLAFlowAdapter`.

    smolvla puts the state into the VLM prefix, so its ``state_proj`` belongs to the trunk (frozen unless
    ``train_vlm``). The vision encoder follows ``config.freeze_vision_encoder`` (True by default).
    """

    _num_steps_field = "num_steps"

    def __init__(self, policy: nn.Module, **options):
        config = policy.config
        if config.adapt_to_pi_aloha:
            raise NotImplementedError(
                "smolvla with adapt_to_pi_aloha=True is not supported: its action space transform lives "
                "outside denoise_step"
            )
        if not config.use_cache:
            raise ValueError("the smolvla adapter needs config.use_cache=True (it runs the prefix once)")
        super().__init__(policy, **options)

    def _vlm_width(self) -> int:
        return self.policy.model.vlm_with_expert.config.text_config.hidden_size

    def _trunk_modules(self) -> list[nn.Module]:
        model = self.policy.model
        return [model.vlm_with_expert.vlm, model.state_proj]

    def _vision_modules(self) -> list[nn.Module]:
        return [self.policy.model.vlm_with_expert.get_vlm_model().vision_model]

    def _expert_module_prefix(self) -> str:
        return "model.vlm_with_expert.lm_expert"

    def _encode_prefix(self, batch: dict[str, Tensor]) -> tuple[SmolVLAPrefix, Tensor, Tensor]:
        policy, model = self.policy, self.policy.model
        images, img_masks = policy.prepare_images(batch)
        state = policy.prepare_state(batch)  # (B, S)
        lang_tokens, lang_masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
        prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
            images, img_masks, lang_tokens, lang_masks, state=state
        )  # (B, P, F), (B, P), (B, P)
        attention_2d = make_att_2d_masks(prefix_pad_masks, prefix_att_masks)  # (B, P, P)
        position_ids = torch.cumsum(prefix_pad_masks, dim=1) - 1  # (B, P)
        (prefix_out, _), past_key_values = model.vlm_with_expert.forward(
            attention_mask=attention_2d,
            position_ids=position_ids,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
        )  # prefix_out (B, P, F)
        return SmolVLAPrefix(past_key_values, prefix_pad_masks), prefix_out, prefix_pad_masks

    def _denoise(self, data: SmolVLAPrefix, x_t: Tensor, t: Tensor) -> Tensor:
        return self.policy.model.denoise_step(
            prefix_pad_masks=data.prefix_pad_masks,
            past_key_values=clone_past_key_values(data.past_key_values),
            x_t=x_t,
            timestep=t,
        )
