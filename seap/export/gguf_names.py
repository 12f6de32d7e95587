"""llama.cpp's names for what a GGUF export writes, per model family: the architecture the file
declares (one for a model whose layers all have the same widths, one that builds per-layer
widths) and every weight under llama.cpp's GGUF tensor name, in its layout.

The family adapters only read the module tree (embeddings, norms, projections); what llama.cpp
calls those tensors is the export's business and lives here, in :data:`LLAMA_CPP_FAMILIES`. A
family is found by its adapter class or the nearest base class that has an entry, so Mistral
(an adapter derived from Llama's) is written as llama.cpp's Llama, as llama.cpp's converter
does; a ``sliding_window`` in its config is not carried over, as in that conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seap.errors import UnsupportedArchitectureError
from seap.model.adapters import ArchitectureAdapter
from seap.model.adapters.llama import LlamaAdapter

OuterTensors = Callable[[Any, nn.Module], Iterator[tuple[str, torch.Tensor]]]
LayerTensors = Callable[[Any, nn.Module, int, nn.Module], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class LlamaCppFamily:
    """How llama.cpp names one model family."""

    architecture: str  # when every layer has the same widths (scalar head counts and MLP width)
    per_layer_architecture: str | None  # the one llama.cpp builds per-layer widths with (None: it cannot)
    outer_tensors: OuterTensors  # (adapter, model) -> (GGUF tensor name, tensor) outside the decoder layers
    layer_tensors: LayerTensors  # (adapter, model, index, layer) -> (GGUF tensor name, tensor) of one layer

    def tensors(self, adapter: Any, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight of the model under llama.cpp's name and in its layout: the outer ones,
        then each decoder layer's."""
        yield from self.outer_tensors(adapter, model)
        for i, layer in enumerate(adapter.decoder_layers(model)):
            yield from self.layer_tensors(adapter, model, i, layer)


def rope_pairs(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q or k rows (weight or bias) from Hugging Face's rotate-half order (per head: the first
    halves of all pairs, then the second halves) to llama.cpp's adjacent pairs, as its converter does."""
    if num_heads == 0:
        return rows
    return rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama_outer_tensors(adapter: LlamaAdapter, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Embeddings, final norm and (when not tied to the embeddings) the output head."""
    embed = adapter.embedding_weight(model)
    yield "token_embd.weight", embed
    yield "output_norm.weight", adapter.final_norm_weight(model)
    lm_head = adapter.output_weight(model)
    if lm_head is not embed and not getattr(adapter.text_config(model.config), "tie_word_embeddings", False):
        yield "output.weight", lm_head


def llama_layer_tensors(adapter: LlamaAdapter, model: nn.Module, i: int, layer: nn.Module
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's norms and projections under llama.cpp's names (``blk.N.attn_q.weight``...);
    q and k rows in llama.cpp's rotary order; a layer with no heads (or no MLP channels) has
    no attention (or feed-forward) tensors, which llama.cpp's ``deci`` builds as such a layer."""
    head_dim = adapter.head_dim(model.config)  # type: ignore[attr-defined]
    mods = adapter.layer_modules(layer)
    attn_norm, ffn_norm = adapter.pre_norm_weights(layer)
    heads, kv = mods.q_proj.out_features // head_dim, mods.k_proj.out_features // head_dim
    if heads:
        yield f"blk.{i}.attn_norm.weight", attn_norm
        for short, linear, n in (("q", mods.q_proj, heads), ("k", mods.k_proj, kv), ("v", mods.v_proj, None),
                                 ("output", mods.o_proj, None)):
            yield f"blk.{i}.attn_{short}.weight", linear.weight if n is None else rope_pairs(linear.weight, n)
            if linear.bias is not None:
                yield f"blk.{i}.attn_{short}.bias", linear.bias if n is None else rope_pairs(linear.bias, n)
    if mods.gate_proj.out_features:
        yield f"blk.{i}.ffn_norm.weight", ffn_norm
        for short, linear in (("gate", mods.gate_proj), ("up", mods.up_proj), ("down", mods.down_proj)):
            yield f"blk.{i}.ffn_{short}.weight", linear.weight
            if linear.bias is not None:
                yield f"blk.{i}.ffn_{short}.bias", linear.bias


# llama.cpp's Llama; ``deci`` (Llama-3.x-Nemotron's) is its Llama with per-layer head counts and MLP widths
LLAMA_CPP_FAMILIES: dict[type[ArchitectureAdapter], LlamaCppFamily] = {
    LlamaAdapter: LlamaCppFamily("llama", "deci", llama_outer_tensors, llama_layer_tensors),  # type: ignore[arg-type]
}


def llama_cpp_family(adapter: ArchitectureAdapter) -> LlamaCppFamily:
    """llama.cpp's names for the adapter's family; refused for a family llama.cpp export does not cover."""
    for cls in type(adapter).__mro__:
        if cls in LLAMA_CPP_FAMILIES:
            return LLAMA_CPP_FAMILIES[cls]
    raise UnsupportedArchitectureError(
        f"GGUF export is not available for the {adapter.name} family (llama.cpp export covers llama and mistral)",
        "serve the pruned folder with seap.load_pruned (any widths), or export it with `seap export --format hf`, "
        "which needs one width for all layers (a mask built with `--same-width`) and no refitted bias that the "
        "family's stock code lacks (`--no-refit-bias` for qwen2)")


def exports_to_gguf(adapter: ArchitectureAdapter) -> bool:
    """Whether llama.cpp export covers the adapter's family."""
    return any(cls in LLAMA_CPP_FAMILIES for cls in type(adapter).__mro__)


def llama_cpp_tensors(adapter: ArchitectureAdapter, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under llama.cpp's GGUF tensor names and in its layout."""
    return llama_cpp_family(adapter).tensors(adapter, model)


__all__ = ["LLAMA_CPP_FAMILIES", "LlamaCppFamily", "exports_to_gguf", "llama_cpp_family", "llama_cpp_tensors", "llama_layer_tensors",
           "llama_outer_tensors", "rope_pairs"]
