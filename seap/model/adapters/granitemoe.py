"""Granite-MoE (``granitemoe``): Granite attention and multipliers, and a routed block in
``block_sparse_moe`` whose router (``router``) takes the top-k logits and a softmax over them,
which is the renormalised top-k of the full softmax."""

from __future__ import annotations

from typing import Any

from seap.model.adapters.moe import MoeAdapter


class GraniteMoeAdapter(MoeAdapter):
    name = "granitemoe"
    model_types = ("granitemoe",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    experts_key = "num_local_experts"

    def normalises_top_k(self, config: Any) -> bool:
        return True
