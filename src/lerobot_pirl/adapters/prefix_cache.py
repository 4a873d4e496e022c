"""The frozen VLM prefix of every update sample, computed once per iteration (issue 15).

Shape legend: M samples of the update, B micro-batch, P prefix tokens, F VLM width, L layers,
h key/value heads, d head width.

An update recomputes each sample's prefix (images + prompt through the VLM) in every epoch, although a
frozen VLM gives the same keys and values each time. `PrefixCache` keeps them from the first epoch on the
update device and gathers a micro-batch's context from them afterwards: the prefix then runs once per
sample per iteration instead of once per sample per epoch. The context is what `encode` would return, so
log-probs, losses and gradients are unchanged (to float rounding of a different batch composition).

The rollout already ran each prefix once: where the budget allows, the collector keeps that context in
the stored observation (keys under `KEPT_PREFIX`, `keep_context` / `kept_context`), and the update reads
it from there, so the prefix then runs once per decision in all. Both are the same model under the same
autocast in one process, so the kept context is the one the update would compute.

Valid only while the trunk does not train (`train_vlm=false`); `for_update` returns None otherwise, and
when the samples' keys and values would not fit the memory budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from lerobot_pirl.adapters.base import FlowAdapter, FlowContext

logger = logging.getLogger(__name__)
GIB = 1024**3
_logged: set[str] = set()  # each reason for (not) caching is logged once per process


def _log_once(message: str, *args) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message, *args)


@dataclass
class _Layout:
    """Where each tensor of an adapter's context goes: its private data is a dataclass whose fields are
    tensors (batch first), None, or a transformers DynamicCache (keys/values (B, h, P, d) per layer)."""

    template: Any  # the data of the first context, to rebuild others by `dataclasses.replace`
    caches: dict[str, list[Any]]  # field name -> each layer's sliding-window setting

    @classmethod
    def of(cls, data: Any) -> _Layout:
        caches = {}
        for field in fields(data):
            value = getattr(data, field.name)
            if value is not None and not isinstance(value, Tensor):
                caches[field.name] = [window for _keys, _values, window in value]
        return cls(data, caches)

    def tensors(self, context: FlowContext) -> dict[str, Tensor]:
        """The context as named batch-first tensors."""
        named = {"pooled": context.pooled}
        for field in fields(context.data):
            value = getattr(context.data, field.name)
            if field.name in self.caches:
                for layer, (keys, values, _window) in enumerate(value):
                    named[f"{field.name}.{layer}.keys"] = keys
                    named[f"{field.name}.{layer}.values"] = values
            elif isinstance(value, Tensor):
                named[field.name] = value
        return named

    def context(self, named: dict[str, Tensor]) -> FlowContext:
        from transformers import DynamicCache

        changes = {}
        for field in fields(self.template):
            if field.name in self.caches:
                layers = [
                    (named[f"{field.name}.{layer}.keys"], named[f"{field.name}.{layer}.values"], window)
                    for layer, window in enumerate(self.caches[field.name])
                ]
                changes[field.name] = DynamicCache(tuple(layers))
            elif field.name in named:
                changes[field.name] = named[field.name]
        return FlowContext(data=replace(self.template, **changes), pooled=named["pooled"])


KEPT_PREFIX = "prefix_cache."  # observation keys of a context kept from the rollout


def can_cache(adapter: FlowAdapter) -> bool:
    """The adapter's context can be kept (a VLA) and stays valid (its trunk is frozen)."""
    if not getattr(adapter, "supports_prefix_cache", False):
        return False
    return not any(p.requires_grad for p in adapter.trunk_parameters())


def keep_context(adapter: FlowAdapter, context: FlowContext) -> dict[str, Tensor]:
    """The context as observation entries (B, ...) under KEPT_PREFIX; `kept_context` rebuilds it."""
    if getattr(adapter, "kept_prefix_layout", None) is None:
        adapter.kept_prefix_layout = _Layout.of(context.data)
    named = adapter.kept_prefix_layout.tensors(context)
    return {KEPT_PREFIX + name: tensor.detach() for name, tensor in named.items()}


def kept_context(adapter: FlowAdapter, observations: dict[str, Tensor]) -> FlowContext | None:
    """The context the rollout kept in `observations`, or None when it kept none."""
    layout = getattr(adapter, "kept_prefix_layout", None)
    named = {k[len(KEPT_PREFIX) :]: v for k, v in observations.items() if k.startswith(KEPT_PREFIX)}
    if layout is None or not named:
        return None
    return layout.context(named)


def context_gib(named: dict[str, Tensor]) -> float:
    """GiB of one batch of kept context entries."""
    return sum(t.numel() * t.element_size() for t in named.values()) / GIB


class PrefixCache:
    """Contexts of the M samples of one update, filled as the first epoch computes them."""

    def __init__(self, adapter: FlowAdapter, num_samples: int, budget_gib: float):
        self.adapter = adapter
        self.num_samples = num_samples
        self.budget_gib = budget_gib
        self.layout: _Layout | None = None
        self.store: dict[str, Tensor] = {}  # name -> (M, ...)
        self.filled: Tensor | None = None  # (M,) bool
        self.enabled = True

    @classmethod
    def for_update(
        cls, adapter: FlowAdapter, num_samples: int, budget_gib: float, epochs: int = 2
    ) -> PrefixCache | None:
        """A cache for this update, or None where it would be wrong, useless (one epoch: every prefix
        runs once anyway) or is switched off."""
        if budget_gib <= 0 or epochs < 2 or not getattr(adapter, "supports_prefix_cache", False):
            return None
        if not can_cache(adapter):
            _log_once("prefix cache off: the VLM trains (--policy_options.train_vlm), so its prefix changes")
            return None
        return cls(adapter, num_samples, budget_gib)

    def context(self, indices: Tensor, observations: dict[str, Tensor]) -> tuple[FlowContext, int]:
        """The context of samples `indices` (B,) of the update, and how many of them ran the prefix
        (a context the rollout kept is read by the update before it asks here)."""
        if self.filled is not None and bool(self.filled[indices].all()):
            rows = indices.to(self.filled.device)
            return self.layout.context({name: stored[rows] for name, stored in self.store.items()}), 0
        context = self.adapter.encode(observations)
        if self.enabled:
            self._keep(indices, context)
        return context, len(indices)

    def _keep(self, indices: Tensor, context: FlowContext) -> None:
        if self.layout is None:
            layout = _Layout.of(context.data)
            named = layout.tensors(context)
            per_sample = sum(t.numel() * t.element_size() for t in named.values()) / len(indices)
            needed_gib = per_sample * self.num_samples / GIB
            if needed_gib > self.budget_gib:
                _log_once(
                    "prefix cache off: %.1f GiB for %d samples is more than --algorithm.prefix_cache_gib=%g; "
                    "the prefix is recomputed every epoch",
                    needed_gib,
                    self.num_samples,
                    self.budget_gib,
                )
                self.enabled = False
                return
            _log_once(
                "prefix cache on: %.2f GiB for %d samples; the VLM prefix runs once per sample and iteration",
                needed_gib,
                self.num_samples,
            )
            self.layout = layout
            self.store = {
                name: torch.empty((self.num_samples, *t.shape[1:]), dtype=t.dtype, device=t.device)
                for name, t in named.items()
            }  # (M, ...)
            self.filled = torch.zeros(self.num_samples, dtype=torch.bool, device=context.pooled.device)
        rows = indices.to(self.filled.device)
        for name, tensor in self.layout.tensors(context).items():
            self.store[name][rows] = tensor.detach()
        self.filled[rows] = True
