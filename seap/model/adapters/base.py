"""The architecture adapter interface: everything the engine needs to know about a model family."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seap.errors import UnsupportedArchitectureError
from seap.maths.geometry import LayerGeometry, ModelGeometry


@dataclass
class LayerModules:
    """The linear layers the engine reads and rewrites in one decoder layer."""

    attention: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    mlp: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = (*ATTENTION_PROJECTIONS, *MLP_PROJECTIONS)  # the logical names the engine uses


class ArchitectureAdapter:
    """Knows one model family's module names, head layout and GQA grouping, and owns every read
    and write of its module tree: the engine names projections by their logical names
    (:data:`PROJECTIONS`) and never touches a module attribute itself.

    Subclasses set ``model_types`` (the Hugging Face ``config.model_type`` values they
    serve) and override what differs from the Llama layout.
    """

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    layer_types: ClassVar[tuple[str, ...]] = ("full_attention", "sliding_attention")  # per-layer attention kinds it prunes

    # -- configuration -------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The configuration of the decoder this adapter prunes (a multimodal model's text part)."""
        return config

    def check_config(self, config: Any) -> None:
        """Refuse, before any weight is read, a configuration with a feature this adapter cannot
        prune correctly; the message names the feature. Subclasses add their own checks."""
        self.check_attention(config)
        c = self.text_config(config)
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if getattr(c, key, None):
                self.refuse(config, f"{key}={getattr(c, key)} (a mixture-of-experts layer)",
                            "dense adapters prune MLP channels, not experts")
        unknown = sorted(set(getattr(c, "layer_types", None) or ()) - set(self.layer_types))
        if unknown:
            self.refuse(config, f"layer_types holds {', '.join(map(repr, unknown))}",
                        f"the {self.name} adapter prunes layers of type {', '.join(self.layer_types)}")

    def check_attention(self, config: Any) -> None:
        """Refuse attention heads that do not divide into whole key/value groups."""
        c = self.text_config(config)
        heads, kv = getattr(c, "num_attention_heads", None), getattr(c, "num_key_value_heads", None) or \
            getattr(c, "num_attention_heads", None)
        if not heads or not kv or heads % kv:
            self.refuse(config, f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}",
                        "grouped-query attention needs whole groups")

    def refuse(self, config: Any, feature: str, why: str) -> None:
        raise UnsupportedArchitectureError(
            f"{getattr(config, 'model_type', self.name)} model with {feature}: {why}, so SEAP cannot prune it correctly",
            "use a checkpoint without that feature, or open an issue with the model's config.json")

    # -- module access -------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (``model.model`` for HF causal LMs)."""
        return model.model  # type: ignore[return-value]

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.backbone(model).layers)  # type: ignore[arg-type]

    def layer_modules(self, layer: nn.Module) -> LayerModules:
        attn = layer.self_attn  # type: ignore[attr-defined]
        mlp = layer.mlp  # type: ignore[attr-defined]
        return LayerModules(
            attention=attn,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            mlp=mlp,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
        )

    def all_layer_modules(self, model: nn.Module) -> list[LayerModules]:
        return [self.layer_modules(layer) for layer in self.decoder_layers(model)]

    def embedding_weight(self, model: nn.Module) -> torch.Tensor:
        """The token embedding matrix [vocab, hidden]."""
        return self.backbone(model).embed_tokens.weight  # type: ignore[union-attr,return-value]

    def final_norm_weight(self, model: nn.Module) -> torch.Tensor:
        """The weight of the norm after the last decoder layer."""
        return self.backbone(model).norm.weight  # type: ignore[union-attr,return-value]

    def output_weight(self, model: nn.Module) -> torch.Tensor:
        """The LM head's weight [vocab, hidden] (the embedding matrix itself when they are tied)."""
        return model.get_output_embeddings().weight  # type: ignore[operator,union-attr,return-value]

    # -- geometry ------------------------------------------------------------------
    def head_dim(self, config: Any) -> int:
        config = self.text_config(config)
        head_dim = getattr(config, "head_dim", None)
        return int(head_dim) if head_dim else int(config.hidden_size // config.num_attention_heads)

    def geometry(self, model: nn.Module) -> ModelGeometry:
        """Read the widths from the live modules (pruned layers differ from the config)."""
        config = self.text_config(model.config)  # type: ignore[attr-defined]
        head_dim = self.head_dim(config)
        layers = []
        for mods in self.all_layer_modules(model):
            num_heads = mods.q_proj.out_features // head_dim
            num_kv = mods.k_proj.out_features // head_dim
            layers.append(LayerGeometry(num_heads, num_kv, head_dim, mods.gate_proj.out_features))
        return ModelGeometry(int(config.hidden_size), tuple(layers))

    # -- writes --------------------------------------------------------------------
    def projection_path(self, name: str) -> str:
        """The module path of projection ``name`` inside a decoder layer (``self_attn.q_proj``)."""
        return ("self_attn." if name in ATTENTION_PROJECTIONS else "mlp.") + name

    def set_projections(self, layer: nn.Module, modules: Mapping[str, nn.Linear]) -> None:
        """Put new projection modules (by logical name) into a decoder layer."""
        mods = self.layer_modules(layer)
        for name, module in modules.items():
            if name not in PROJECTIONS:
                raise KeyError(f"unknown projection {name!r}")
            setattr(mods.attention if name in ATTENTION_PROJECTIONS else mods.mlp, name, module)

    def set_widths(self, layer: nn.Module, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """Update a decoder layer's bookkeeping after its projections were resized."""
        mods = self.layer_modules(layer)
        self.set_attention_width(mods, num_heads, num_kv_heads)
        self.set_mlp_width(mods, intermediate_size)

    def set_attention_width(self, mods: LayerModules, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's bookkeeping after its projections were resized."""
        attn = mods.attention
        attn.num_key_value_groups = num_heads // num_kv_heads  # type: ignore[assignment]
        for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)

    def set_mlp_width(self, mods: LayerModules, intermediate_size: int) -> None:
        if hasattr(mods.mlp, "intermediate_size"):
            mods.mlp.intermediate_size = intermediate_size  # type: ignore[assignment]

    def prune_norms(self, layer: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, hard: bool) -> None:
        """Prune what normalises the projections' outputs together with the kept rows
        (``q_rows``/``kv_rows``: boolean over the q and k/v output rows). Per-head norms
        (Qwen3, Gemma 3) and no norms (Llama) need nothing."""

    def layer_record(self, layer: nn.Module) -> dict[str, Any]:
        """Per-layer values beyond the widths that a saved pruned checkpoint must carry."""
        return {}

    def resize_layer(self, layer: nn.Module, sizes: Mapping[str, Any], head_dim: int, hidden: int,
                     has_bias: Callable[[str], bool]) -> None:
        """Give an unpruned layer the shapes of a saved pruned one (``sizes``: its widths and
        :meth:`layer_record`), before the saved weights are loaded into it."""
        heads, kv, inter = sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["intermediate_size"]
        shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
                  "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
                  "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        mods = self.layer_modules(layer)
        like = mods.o_proj.weight
        self.set_projections(layer, {name: nn.Linear(*shape, bias=has_bias(name), dtype=like.dtype, device=like.device)
                                     for name, shape in shapes.items()})
        self.set_widths(layer, heads, kv, inter)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"
