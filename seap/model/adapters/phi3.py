"""Phi-3 and Phi-4-mini (``phi3``): one fused ``qkv_proj`` (rows: all query heads, then the
key heads, then the value heads) and one fused ``gate_up_proj`` (rows: the gate half, then
the up half; the MLP computes ``down(up * act(gate))``), partial rotary embeddings.

The engine sees the usual logical projections: ``q_proj``, ``k_proj``, ``v_proj`` and
``gate_proj``, ``up_proj`` are views of row ranges of the fused weights (no copy), and
writing them back concatenates the pruned pieces into new fused layers, so query rows, the
matching key/value rows under GQA and both MLP halves are always sliced consistently.

Phi-3's attention splits the fused output at ``config.num_attention_heads * head_dim``,
read from the configuration rather than from the weights; a pruned layer therefore gets its
own copy of the configuration with its head counts (a later change of the model's attention
implementation does not reach those copies; set it when loading)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seap.model.adapters.base import ArchitectureAdapter, LayerModules


def _row_view(fused: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A Linear whose weight (and bias) are rows ``start:stop`` of ``fused``'s, sharing memory."""
    view = nn.Linear.__new__(nn.Linear)  # no initialisation: the weights are the fused layer's
    nn.Module.__init__(view)
    view.in_features, view.out_features = fused.in_features, stop - start
    view.weight = nn.Parameter(fused.weight.detach()[start:stop], requires_grad=False)
    view.register_parameter("bias", None if fused.bias is None else
                            nn.Parameter(fused.bias.detach()[start:stop], requires_grad=False))
    view.train(fused.training)
    return view


def _fuse(parts: list[nn.Linear], like: nn.Linear) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = any(p.bias is not None for p in parts)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            out.bias.copy_(torch.cat([p.bias.detach() if p.bias is not None else
                                      torch.zeros(p.out_features, dtype=weight.dtype, device=weight.device)
                                      for p in parts]))
    out.train(like.training)
    return out


class Phi3Adapter(ArchitectureAdapter):
    name = "phi3"
    model_types = ("phi3",)
    gguf_architectures = ("phi3",)

    def layer_modules(self, layer: nn.Module) -> LayerModules:
        attn, mlp = layer.self_attn, layer.mlp  # type: ignore[attr-defined]
        head_dim = attn.head_dim
        q = attn.config.num_attention_heads * head_dim  # (the layer's own copy once pruned)
        kv = attn.num_key_value_heads * head_dim
        inter = mlp.gate_up_proj.out_features // 2
        return LayerModules(
            attention=attn,
            q_proj=_row_view(attn.qkv_proj, 0, q),
            k_proj=_row_view(attn.qkv_proj, q, q + kv),
            v_proj=_row_view(attn.qkv_proj, q + kv, q + 2 * kv),
            o_proj=attn.o_proj,
            mlp=mlp,
            gate_proj=_row_view(mlp.gate_up_proj, 0, inter),
            up_proj=_row_view(mlp.gate_up_proj, inter, 2 * inter),
            down_proj=mlp.down_proj,
        )

    def projection_path(self, name: str) -> str:
        fused = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                 "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                 "down_proj": "mlp.down_proj"}
        return fused[name]

    def set_projections(self, layer: nn.Module, modules: Mapping[str, nn.Linear]) -> None:
        unknown = set(modules) - {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if unknown:
            raise KeyError(f"unknown projection {sorted(unknown)[0]!r}")
        mods = self.layer_modules(layer)
        attn, mlp = mods.attention, mods.mlp
        if {"q_proj", "k_proj", "v_proj"} & set(modules):
            attn.qkv_proj = _fuse([modules.get(n, getattr(mods, n)) for n in ("q_proj", "k_proj", "v_proj")],
                                  attn.qkv_proj)
        if {"gate_proj", "up_proj"} & set(modules):
            mlp.gate_up_proj = _fuse([modules.get(n, getattr(mods, n)) for n in ("gate_proj", "up_proj")],
                                     mlp.gate_up_proj)
        if "o_proj" in modules:
            attn.o_proj = modules["o_proj"]
        if "down_proj" in modules:
            mlp.down_proj = modules["down_proj"]

    def set_attention_width(self, mods: LayerModules, num_heads: int, num_kv_heads: int) -> None:
        super().set_attention_width(mods, num_heads, num_kv_heads)
        attn = mods.attention
        if attn.config.num_attention_heads != num_heads or attn.config.num_key_value_heads != num_kv_heads:
            attn.config = copy.copy(attn.config)  # this layer's own head counts (the split reads the config)
            attn.config.num_attention_heads = num_heads
            attn.config.num_key_value_heads = num_kv_heads

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if config.hidden_size % config.num_attention_heads:
            self.refuse(config, f"hidden_size={config.hidden_size} not a multiple of num_attention_heads="
                        f"{config.num_attention_heads}", "Phi-3 derives head_dim from their ratio")
