"""Llama family (Llama 1/2/3, SmolLM, TinyLlama...): MHA or GQA, no projection biases by default."""

from __future__ import annotations

from seap.model.adapters.base import ArchitectureAdapter


class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama",)
    gguf_architectures = ("llama",)
