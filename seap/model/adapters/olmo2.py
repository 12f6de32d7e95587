"""OLMo 2 (``olmo2``) and OLMo 3 (``olmo3``, the same layers plus sliding-window layers with
their own rotary table): Llama projections, norms *after* each sublayer
(``post_attention_layernorm``, ``post_feedforward_layernorm``; no input norm), and an
RMSNorm over the **whole** query projection (``q_norm``: ``heads x head_dim`` wide) and
key projection (``k_norm``), applied before the heads are split.

Those two norms are pruned with the heads. Their weight keeps the kept heads' entries;
because the RMS is taken over the whole projection, soft pruning (zeroed rows, full width)
and a narrower norm differ unless the narrower one is corrected: over ``K`` kept of ``N``
entries, ``x / sqrt(sum/N + eps)`` equals ``sqrt(N/K) x / sqrt(sum/K + eps N/K)``, so the
hard-pruned norm gets its weight times ``sqrt(N/K)`` and epsilon times ``N/K`` (recorded per
layer in a saved checkpoint). Soft and hard pruning then give the same logits. Removing
heads still changes the kept heads' normalisation (the RMS no longer sees the removed ones)
compared with the dense model: that is the model's own coupling, which the refit, fitted on
the pruned layer's real inputs, absorbs in part."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from seap.model.adapters.base import ArchitectureAdapter


def _narrow_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep ``keep`` (boolean) entries of a whole-projection RMSNorm, exact for zeroed inputs."""
    full = norm.weight.numel()
    kept = int(keep.sum())
    if kept == full:
        return
    ratio = full / kept
    norm.weight = nn.Parameter(norm.weight.detach()[keep.to(norm.weight.device)] * ratio ** 0.5,
                               requires_grad=norm.weight.requires_grad)
    norm.variance_epsilon = norm.variance_epsilon * ratio


class Olmo2Adapter(ArchitectureAdapter):
    name = "olmo2"
    model_types = ("olmo2", "olmo3")

    def prune_norms(self, layer: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, hard: bool) -> None:
        if not hard:  # zeroed rows leave the full-width norm exact as it is
            return
        attn = self.layer_modules(layer).attention  # (the surgery's own copy of the layer: the base is untouched)
        _narrow_norm(attn.q_norm, q_rows)
        _narrow_norm(attn.k_norm, kv_rows)

    def layer_record(self, layer: nn.Module) -> dict[str, Any]:
        attn = self.layer_modules(layer).attention
        return {"q_norm_eps": float(attn.q_norm.variance_epsilon), "k_norm_eps": float(attn.k_norm.variance_epsilon)}

    def resize_layer(self, layer: nn.Module, sizes: Mapping[str, Any], head_dim: int, hidden: int,
                     has_bias: Callable[[str], bool]) -> None:
        super().resize_layer(layer, sizes, head_dim, hidden, has_bias)
        attn = self.layer_modules(layer).attention
        for name, heads in (("q_norm", sizes["num_attention_heads"]), ("k_norm", sizes["num_key_value_heads"])):
            norm = getattr(attn, name)
            norm.weight = nn.Parameter(torch.empty(heads * head_dim, dtype=norm.weight.dtype,
                                                   device=norm.weight.device), requires_grad=False)
            if f"{name}_eps" in sizes:
                norm.variance_epsilon = float(sizes[f"{name}_eps"])
