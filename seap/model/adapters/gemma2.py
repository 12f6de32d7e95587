"""Gemma 2 (``gemma2``): GeGLU MLP (gate/up/down with a tanh GELU), RMSNorms scaling by
``1 + weight``, extra norms around each sublayer (``pre_feedforward_layernorm``,
``post_feedforward_layernorm``, and ``post_attention_layernorm`` on the attention output),
attention-logit and final-logit soft-capping, alternating sliding-window layers,
``head_dim`` independent of ``hidden_size / heads``, queries scaled by
``query_pre_attn_scalar``, the embedding scaled by ``sqrt(hidden_size)`` and tied.

None of these read the pruned widths: the norms act on the hidden size, the soft-capping
on scores, and the forward takes the head count from the projections (``view(..., -1,
head_dim)``). So the Llama-layout surgery applies unchanged."""

from __future__ import annotations

from seap.model.adapters.base import ArchitectureAdapter


class Gemma2Adapter(ArchitectureAdapter):
    name = "gemma2"
    model_types = ("gemma2",)
    gguf_architectures = ("gemma2",)
