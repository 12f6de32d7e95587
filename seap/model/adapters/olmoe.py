"""OLMoE (``olmoe``): OLMo attention with q/k RMSNorms over whole projections (sliced with the
heads, so attention is left alone by expert pruning) and a routed block in ``mlp``; top-k
weights are the plain softmax unless ``norm_topk_prob`` is set."""

from __future__ import annotations

from seap.model.adapters.moe import MoeAdapter


class OlmoeAdapter(MoeAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
