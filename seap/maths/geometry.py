"""Shapes of the prunable parts of a decoder, and the pruning units derived from them.

A *unit* is the smallest piece the engine removes:

* MLP: one intermediate channel (a row of gate/up, a column of down): ``3 * hidden`` weights.
* Attention, multi-head (``kv_heads == heads``): one head (rows of q/k/v, columns of o):
  ``4 * hidden * head_dim`` weights.
* Attention with grouped-query attention (GQA), two choices (``GQA_MODES``):

  - ``"kv-groups"`` (default): one key/value group, i.e. one k/v head together with all
    query heads that read it: ``(2 * group + 2) * hidden * head_dim`` weights. Every
    layer stays a valid GQA layer with the original group size; the KV cache shrinks
    with the pruned groups.
  - ``"query-heads"``: one query head *in every group at once* (a "slice"), so each
    group keeps the same number of query heads and all k/v heads stay:
    ``kv_heads * 2 * hidden * head_dim`` weights. Finer for models with few KV heads
    and large groups; the KV cache does not shrink.

Parameter counts cover the weights of q, k, v, o, gate, up and down (biases and norms
are not counted); "sparsity" in this package always means the pruned fraction of these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from seap.errors import SeapError

GQA_MODES = ("kv-groups", "query-heads")
DEFAULT_GQA_MODE = "kv-groups"


@dataclass(frozen=True)
class LayerGeometry:
    """Widths of one decoder layer's attention and MLP."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads


@dataclass(frozen=True)
class ModelGeometry:
    """Hidden size plus per-layer widths; enough to count parameters without the model."""

    hidden_size: int
    layers: tuple[LayerGeometry, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGeometry:
        return cls(int(data["hidden_size"]), tuple(LayerGeometry(**layer) for layer in data["layers"]))

    def attention_params(self, i: int) -> int:
        g = self.layers[i]
        return self.hidden_size * g.head_dim * (2 * g.num_heads + 2 * g.num_kv_heads)

    def mlp_params(self, i: int) -> int:
        return 3 * self.hidden_size * self.layers[i].intermediate_size

    def layer_params(self, i: int) -> int:
        return self.attention_params(i) + self.mlp_params(i)

    def total_params(self) -> int:
        """Prunable weights of the whole decoder (q, k, v, o, gate, up, down)."""
        return sum(self.layer_params(i) for i in range(self.num_layers))


def check_gqa_mode(gqa_mode: str) -> str:
    if gqa_mode not in GQA_MODES:
        raise SeapError(f"unknown GQA mode {gqa_mode!r}", f"use one of: {', '.join(GQA_MODES)}")
    return gqa_mode


@dataclass(frozen=True)
class AttentionUnits:
    """How one layer's attention splits into pruning units."""

    kind: str  # "heads" (MHA), "kv-groups" or "query-heads"
    count: int  # number of units in the layer
    cost: int  # weights removed per unit


def attention_units(geometry: ModelGeometry, i: int, gqa_mode: str = DEFAULT_GQA_MODE) -> AttentionUnits:
    g = geometry.layers[i]
    per_head = geometry.hidden_size * g.head_dim
    if not g.is_gqa:
        return AttentionUnits("heads", g.num_heads, 4 * per_head)
    if check_gqa_mode(gqa_mode) == "kv-groups":
        return AttentionUnits("kv-groups", g.num_kv_heads, (2 * g.group_size + 2) * per_head)
    return AttentionUnits("query-heads", g.group_size, g.num_kv_heads * 2 * per_head)


def mlp_unit_cost(geometry: ModelGeometry) -> int:
    return 3 * geometry.hidden_size
