"""Llama family (Llama 1/2/3, SmolLM, TinyLlama...): MHA or GQA, no projection biases by default."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from seap.model.adapters.base import ArchitectureAdapter


def rope_pairs(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q or k rows (weight or bias) from Hugging Face's rotate-half order (per head: the first
    halves of all pairs, then the second halves) to llama.cpp's adjacent pairs, as its converter does."""
    if num_heads == 0:
        return rows
    return rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama",)
    gguf_architectures = ("llama",)
    llama_cpp_architecture = "llama"
    llama_cpp_per_layer_architecture = "deci"  # llama.cpp's Llama with per-layer head counts and MLP widths

    def llama_cpp_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Embeddings, norms and projections under llama.cpp's names (``blk.N.attn_q.weight``...);
        q and k rows in llama.cpp's rotary order; a layer with no heads (or no MLP channels) has
        no attention (or feed-forward) tensors, which llama.cpp's ``deci`` builds as such a layer."""
        backbone = self.backbone(model)
        embed = backbone.embed_tokens.weight  # type: ignore[union-attr]
        yield "token_embd.weight", embed
        yield "output_norm.weight", backbone.norm.weight  # type: ignore[union-attr]
        lm_head = model.get_output_embeddings().weight  # type: ignore[union-attr,operator]
        if lm_head.data_ptr() != embed.data_ptr():
            yield "output.weight", lm_head
        head_dim = self.head_dim(model.config)  # type: ignore[attr-defined]
        for i, layer in enumerate(self.decoder_layers(model)):
            mods = self.layer_modules(layer)
            heads, kv = mods.q_proj.out_features // head_dim, mods.k_proj.out_features // head_dim
            if heads:
                yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight  # type: ignore[union-attr]
                for short, linear, n in (("q", mods.q_proj, heads), ("k", mods.k_proj, kv), ("v", mods.v_proj, None),
                                         ("output", mods.o_proj, None)):
                    yield f"blk.{i}.attn_{short}.weight", linear.weight if n is None else rope_pairs(linear.weight, n)
                    if linear.bias is not None:
                        yield f"blk.{i}.attn_{short}.bias", linear.bias if n is None else rope_pairs(linear.bias, n)
            if mods.gate_proj.out_features:
                yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight  # type: ignore[union-attr]
                for short, linear in (("gate", mods.gate_proj), ("up", mods.up_proj), ("down", mods.down_proj)):
                    yield f"blk.{i}.ffn_{short}.weight", linear.weight
                    if linear.bias is not None:
                        yield f"blk.{i}.ffn_{short}.bias", linear.bias
