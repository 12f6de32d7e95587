"""Qwen2-MoE (``qwen2_moe``, Qwen1.5-MoE): Qwen2 attention (q/k/v biases) and a routed block
in ``mlp`` with, beside the routed experts, a *shared expert* (a dense MLP every token uses)
scaled by a sigmoid gate. Expert pruning removes routed experts only; the shared expert stays.
Top-k weights are the plain softmax unless ``norm_topk_prob`` is set."""

from __future__ import annotations

from seap.model.adapters.moe import MoeAdapter


class Qwen2MoeAdapter(MoeAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
