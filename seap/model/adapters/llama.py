"""Llama family (Llama 1/2/3, SmolLM, TinyLlama...): MHA or GQA, no projection biases by default.
(llama.cpp's names for it, for GGUF export: :mod:`seap.export.gguf_names`.)"""

from __future__ import annotations

import torch
from torch import nn

from seap.model.adapters.base import ArchitectureAdapter


class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama",)
    gguf_architectures = ("llama",)

    def pre_norm_weights(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of the norms in front of the attention and in front of the MLP."""
        return layer.input_layernorm.weight, layer.post_attention_layernorm.weight  # type: ignore[union-attr,return-value]
