"""Qwen3-MoE (``qwen3_moe``): Qwen3 attention (per-head q/k norms) and a routed block of fused
experts in ``mlp`` (router ``mlp.gate``), except in the layers of ``mlp_only_layers`` (and
those off ``decoder_sparse_step``), which keep a dense MLP. Top-k weights are renormalised when
``norm_topk_prob`` is set."""

from __future__ import annotations

from seap.model.adapters.moe import MoeAdapter


class Qwen3MoeAdapter(MoeAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
