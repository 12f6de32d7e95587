"""Qwen3 (``qwen3``): Llama layout with a per-head RMSNorm on queries and keys (``q_norm``,
``k_norm`` over ``head_dim``, applied after the heads are split), no q/k/v biases, and
optional sliding-window layers. A per-head norm is untouched by removing heads."""

from __future__ import annotations

from seap.model.adapters.base import ArchitectureAdapter


class Qwen3Adapter(ArchitectureAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    gguf_architectures = ("qwen3",)
