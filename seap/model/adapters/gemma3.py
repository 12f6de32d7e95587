"""Gemma 3 (``gemma3_text``, and ``gemma3``: the multimodal checkpoint, of which the text
decoder is pruned and the vision tower left as it is). As Gemma 2 (GeGLU, ``1 + weight``
norms around each sublayer, sliding-window layers with their own rotary table, scaled and
tied embeddings, ``head_dim`` of its own), plus a per-head RMSNorm on queries and keys
(``q_norm``/``k_norm`` over ``head_dim``, untouched by removing heads) and no attention
soft-capping. A GGUF file of architecture ``gemma3`` loads as ``gemma3_text``."""

from __future__ import annotations

from typing import Any

from torch import nn

from seap.model.adapters.base import ArchitectureAdapter


class Gemma3Adapter(ArchitectureAdapter):
    name = "gemma3"
    model_types = ("gemma3_text", "gemma3")
    gguf_architectures = ("gemma3",)

    def text_config(self, config: Any) -> Any:
        return getattr(config, "text_config", None) or config

    def backbone(self, model: nn.Module) -> nn.Module:
        inner = model.model  # type: ignore[attr-defined]
        return getattr(inner, "language_model", inner)  # the multimodal model's text decoder
