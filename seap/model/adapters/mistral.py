"""Mistral: Llama layout with GQA and an explicit ``head_dim`` (sliding-window attention is untouched).

llama.cpp runs Mistral as its Llama architecture (its converter does the same); a
``sliding_window`` in the config is not carried over, as in llama.cpp's own conversion.
"""

from __future__ import annotations

from seap.model.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    name = "mistral"
    model_types = ("mistral",)
    gguf_architectures = ("mistral",)
