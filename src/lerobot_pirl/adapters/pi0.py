"""FlowAdapter for LeRobot's pi0 (PaliGemma VLM + Gemma action expert); pi05 subclasses it.

Shape legend: B batch, P prefix tokens (images + language), H chunk_size, A max_action_dim,
S max_state_dim, F VLM width, W expert width.

The prefix pass mirrors the first half of ``PI0Pytorch.sample_actions``; each velocity is the model's
own ``denoise_step``, which clones the KV cache before the expert appends to it, so one context serves
any number of (grad-enabled) velocity calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lerobot_pirl.adapters.vla_base import VLAFlowAdapter


@dataclass
class PaliGemmaPrefix:
    """Adapter-private context data of pi0/pi05."""

    past_key_values: object  # transformers DynamicCache of the prefix, never mutated by velocity calls
    prefix_pad_masks: Tensor  # (B, P) bool, valid prefix tokens
    state: Tensor | None  # (B, S) padded state (pi0); None for pi05, whose state is in the prompt


class PI0Adapter(VLAFlowAdapter):
    """Drives a ``PI0Policy`` step by step. Options: see :class:`VLAFlowAdapter`."""

    _num_steps_field = "num_inference_steps"

    def _vlm_width(self) -> int:
        return self.policy.model.paligemma_with_expert.paligemma.config.text_config.hidden_size

    def _trunk_modules(self) -> list[nn.Module]:
        return [self.policy.model.paligemma_with_expert.paligemma]

    def _vision_modules(self) -> list[nn.Module]:
        return [self.policy.model.paligemma_with_expert.paligemma.model.vision_tower]

    def _expert_module_prefix(self) -> str:
        return "model.paligemma_with_expert.gemma_expert.model"

    def _state(self, batch: dict[str, Tensor]) -> Tensor | None:
        return self.policy.prepare_state(batch)  # (B, S)

    def _encode_prefix(self, batch: dict[str, Tensor]) -> tuple[PaliGemmaPrefix, Tensor, Tensor]:
        policy, model = self.policy, self.policy.model
        images, img_masks = policy._preprocess_images(batch)
        lang_tokens, lang_masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
        prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
            images, img_masks, lang_tokens, lang_masks
        )  # (B, P, F), (B, P), (B, P)
        attention_4d = prepare_attention_masks_4d(make_att_2d_masks(prefix_pad_masks, prefix_att_masks))
        position_ids = torch.cumsum(prefix_pad_masks, dim=1) - 1  # (B, P)
        model.paligemma_with_expert.paligemma.model.language_model.config._attn_implementation = "eager"
        (prefix_out, _), past_key_values = model.paligemma_with_expert.forward(
            attention_mask=attention_4d,
            position_ids=position_ids,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
        )  # prefix_out (B, P, F)
        data = PaliGemmaPrefix(past_key_values, prefix_pad_masks, self._state(batch))
        return data, prefix_out, prefix_pad_masks

    def _denoise(self, data: PaliGemmaPrefix, x_t: Tensor, t: Tensor) -> Tensor:
        return self.policy.model.denoise_step(
            state=data.state,
            prefix_pad_masks=data.prefix_pad_masks,
            past_key_values=data.past_key_values,
            x_t=x_t,
            timestep=t,
        )
