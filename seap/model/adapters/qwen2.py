"""Qwen2 / Qwen2.5: GQA with biases on q, k and v (sliced together with their rows)."""

from __future__ import annotations

from seap.model.adapters.base import ArchitectureAdapter


class Qwen2Adapter(ArchitectureAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    gguf_architectures = ("qwen2",)
