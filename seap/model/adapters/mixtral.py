"""Mixtral (``mixtral``): Mistral attention and a routed block in ``mlp`` (router ``mlp.gate``,
``num_local_experts`` experts); the top-k weights are always renormalised."""

from __future__ import annotations

from typing import Any

from seap.model.adapters.moe import MoeAdapter


class MixtralAdapter(MoeAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    experts_key = "num_local_experts"

    def normalises_top_k(self, config: Any) -> bool:
        return True
