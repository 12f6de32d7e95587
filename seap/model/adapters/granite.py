"""Granite (``granite``): Llama layout with four scalars (``embedding_multiplier`` on the
embeddings, ``residual_multiplier`` on each sublayer's output before the residual sum,
``attention_multiplier`` as the attention scale, ``logits_scaling`` dividing the logits)
and optional MLP biases. The scalars do not depend on the widths, so pruning keeps them."""

from __future__ import annotations

from seap.model.adapters.base import ArchitectureAdapter


class GraniteAdapter(ArchitectureAdapter):
    name = "granite"
    model_types = ("granite",)
