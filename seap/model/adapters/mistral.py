"""Mistral: Llama layout with GQA and an explicit ``head_dim`` (sliding-window attention is untouched)."""

from __future__ import annotations

from seap.model.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    name = "mistral"
    model_types = ("mistral",)
    gguf_architectures = ("mistral",)
