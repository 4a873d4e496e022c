"""What the pi0, pi05 and smolvla adapters share: freezing, LoRA, autocast, checkpointing, hooks.

Shape legend (as adapters/base.py)
    B  batch, P prefix tokens (images + language (+ state for smolvla), padded)
    H  chunk_size, A max_action_dim, D real action dim, K denoising steps
    F  VLM width (pooled prefix features), W expert width (hidden state of one action token)

Each subclass supplies three model-specific pieces: which modules form the observation trunk, how to
run the prefix once into the model's KV cache (mirroring the first half of the policy's own
``sample_actions``), and how to call the model's own ``denoise_step`` on that cache. Everything else,
the velocity and the hidden states, comes out of LeRobot's code unchanged: the hidden states are the
input of ``action_out_proj``, read with a forward pre-hook.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

import torch
from lerobot.utils.constants import ACTION
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lerobot_pirl.adapters.base import FlowAdapter, FlowContext, FlowSizes

LORA_ADAPTER_NAME = "default"


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens: tokens (B, P, F), mask (B, P) bool -> (B, F) float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, P, 1)
    total = (tokens.to(torch.float32) * weights).sum(dim=1)  # (B, F)
    return total / weights.sum(dim=1).clamp_min(1.0)


class VLAFlowAdapter(FlowAdapter):
    """Base of the LeRobot VLA adapters (pi0, pi05, smolvla).

    Args:
        policy: the LeRobot policy (PI0Policy, PI05Policy or SmolVLAPolicy); it becomes ``self.policy``.
        train_vlm: train the observation trunk (VLM, and smolvla's state projection) too. Default False:
            the trunk is frozen and ``encode`` runs under ``torch.no_grad()``. When True, the vision
            encoder still stays frozen if the policy config says ``freeze_vision_encoder``.
        lora_rank: > 0 puts peft LoRA adapters of this rank on the expert's attention and MLP
            projections and freezes the expert's base weights; the small projection heads (action in/out,
            time MLP, pi0's state projection) stay fully trainable. Save with :meth:`policy_state_dict`,
            which merges the LoRA weights back into a standard LeRobot state dict.
        lora_alpha: LoRA scale numerator (scaling = alpha / rank); default = rank.
        autocast_dtype: e.g. ``torch.bfloat16``: run the model under ``torch.autocast`` with this dtype.
            The returned velocity, hidden states and pooled features are float32 either way.
        gradient_checkpointing: recompute each ``velocity`` call's expert forward during backward instead
            of keeping its activations (``torch.utils.checkpoint`` around one call). Pays off when many
            calls are backpropagated at once (Flow-Noise, all K steps); one call alone saves nothing.
        num_steps: K, overrides the policy config's number of denoising steps (the policy's own
            ``sample_actions`` then uses it too, so evaluation and training agree).
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        train_vlm: bool = False,
        lora_rank: int = 0,
        lora_alpha: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        num_steps: int | None = None,
    ):
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.policy = policy
        self.train_vlm = train_vlm
        self.lora_rank = lora_rank
        self.autocast_dtype = autocast_dtype
        self.gradient_checkpointing = gradient_checkpointing
        if num_steps is not None:
            setattr(policy.config, self._num_steps_field, num_steps)

        model = policy.model
        config = policy.config
        self._sizes = FlowSizes(
            chunk_size=config.chunk_size,
            action_dim=config.max_action_dim,
            real_action_dim=config.output_features[ACTION].shape[0],
            num_steps=getattr(config, self._num_steps_field),
            n_action_steps=config.n_action_steps,
            pooled_dim=self._vlm_width(),
            hidden_dim=model.action_out_proj.in_features,
        )
        if lora_rank > 0:
            self._inject_lora(lora_rank, lora_alpha if lora_alpha is not None else lora_rank)
        unused = self._unused_parameter_ids()
        # A plain list (not registered twice): the trunk's parameters, fixed once LoRA is in place.
        self._trunk_params = [
            p for module in self._trunk_modules() for p in module.parameters() if id(p) not in unused
        ]
        self._set_requires_grad()

    # ------------------------------------------------------------------------------------------------------
    # Model-specific pieces

    _num_steps_field: str  # the config field holding K
    # The context is a dataclass of tensors and KV caches: `adapters.prefix_cache` may keep it across epochs.
    supports_prefix_cache = True

    @abc.abstractmethod
    def _vlm_width(self) -> int:
        """F, the width of the VLM's prefix outputs."""

    @abc.abstractmethod
    def _trunk_modules(self) -> list[nn.Module]:
        """Modules that run only in the prefix pass (VLM, smolvla's state projection)."""

    @abc.abstractmethod
    def _vision_modules(self) -> list[nn.Module]:
        """The vision encoder, kept frozen under ``train_vlm`` when the config freezes it."""

    @abc.abstractmethod
    def _expert_module_prefix(self) -> str:
        """Dotted name (relative to the policy) of the action expert's transformer."""

    @abc.abstractmethod
    def _encode_prefix(self, batch: dict[str, Tensor]) -> tuple[Any, Tensor, Tensor]:
        """Run the prefix once: (private context data, prefix outputs (B, P, F), valid-token mask (B, P))."""

    @abc.abstractmethod
    def _denoise(self, data: Any, x_t: Tensor, t: Tensor) -> Tensor:
        """The model's own ``denoise_step`` on the cached prefix: v (B, H, A). Must not mutate ``data``."""

    # ------------------------------------------------------------------------------------------------------
    # FlowAdapter

    @property
    def sizes(self) -> FlowSizes:
        return self._sizes

    def encode(self, batch: dict[str, Tensor]) -> FlowContext:
        trunk_trains = any(p.requires_grad for p in self.trunk_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trunk_trains), self._autocast():
            data, prefix_out, prefix_mask = self._encode_prefix(batch)
        return FlowContext(data=data, pooled=masked_mean(prefix_out, prefix_mask))  # pooled (B, F)

    def velocity(self, context: FlowContext, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            v, hidden = checkpoint(self._velocity_and_hidden, context.data, x_t, t, use_reentrant=False)
        else:
            v, hidden = self._velocity_and_hidden(context.data, x_t, t)
        return v.to(torch.float32), hidden.to(torch.float32)  # (B, H, A), (B, H, W)

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self._trunk_params)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The velocity network (expert, projections, LoRA factors), without the trunk and the unused
        language-model heads. With LoRA the expert's frozen base weights are included (requires_grad
        False); filter on ``requires_grad`` to build an optimizer."""
        excluded = {id(p) for p in self.trunk_parameters()} | self._unused_parameter_ids()
        return [p for p in self.policy.parameters() if id(p) not in excluded]

    # ------------------------------------------------------------------------------------------------------
    # Saving

    def policy_state_dict(self) -> dict[str, Tensor]:
        """The policy's state dict in LeRobot's own key layout, LoRA (if any) merged into the base weights.

        ``policy.save_pretrained(folder, state_dict=adapter.policy_state_dict())`` writes a checkpoint of
        the original policy type that LeRobot loads without peft.
        """
        state = self.policy.state_dict()
        if self.lora_rank == 0:
            return state
        from peft.tuners.lora import LoraLayer

        merged: dict[str, Tensor] = {}
        for name, module in self.policy.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                delta = module.get_delta_weight(LORA_ADAPTER_NAME)
                merged[f"{name}.weight"] = (base.weight.detach() + delta.to(base.weight.dtype)).detach()
        standard: dict[str, Tensor] = {}
        for key, value in state.items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            standard[key] = merged.get(key, value)
        return standard

    # ------------------------------------------------------------------------------------------------------
    # Internals

    def _velocity_and_hidden(self, data: Any, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        # Looked up per call: peft may have wrapped the module.
        handle = self.policy.model.action_out_proj.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0])
        )
        try:
            with self._autocast():
                v = self._denoise(data, x_t, t)  # (B, H, A)
        finally:
            handle.remove()
        return v, captured[-1]  # hidden (B, H, W)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.policy.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _unused_parameter_ids(self) -> set[int]:
        # The language-model heads of the VLM and of the expert never run in the flow path.
        return {id(p) for name, p in self.policy.named_parameters() if "lm_head" in name}

    def _inject_lora(self, rank: int, alpha: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        expert = self._expert_module_prefix().replace(".", r"\.")
        # The expert's attention and MLP projections; cf. the policies' `_get_default_peft_targets`
        # (those also adapt the small heads, which we train fully instead).
        target = rf"{expert}\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, bias="none"
        )
        inject_adapter_in_model(lora_config, self.policy, adapter_name=LORA_ADAPTER_NAME)

    def _set_requires_grad(self) -> None:
        trunk = {id(p) for p in self.trunk_parameters()}
        vision = {id(p) for module in self._vision_modules() for p in module.parameters()}
        unused = self._unused_parameter_ids()
        freeze_vision = bool(getattr(self.policy.config, "freeze_vision_encoder", False))
        expert_prefix = self._expert_module_prefix() + "."
        for name, param in self.policy.named_parameters():
            if id(param) in unused:
                trainable = False
            elif id(param) in trunk:
                trainable = self.train_vlm and not (freeze_vision and id(param) in vision)
            elif self.lora_rank > 0 and name.startswith(expert_prefix):
                trainable = ".lora_" in name
            else:
                trainable = True  # expert (without LoRA) and the projection heads
            param.requires_grad_(trainable)
