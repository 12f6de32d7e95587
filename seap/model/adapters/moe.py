"""Mixture-of-experts families: where each keeps its router and its experts, and the one router
module that every pruned MoE layer uses.

transformers 5.23 stores a layer's experts as fused tensors (``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I]) behind a top-k router (``weight`` [E, H]);
Qwen2-MoE adds a shared expert with a sigmoid gate. The families differ in where the block
sits (``mlp`` or ``block_sparse_moe``), what the router is called (``gate`` or ``router``),
which layers are MoE layers, and whether the top-k weights are renormalised. The adapter owns
all of it; the engine sees :class:`MoeLayerModules` and :class:`KeptExpertRouter`.

**Routing after pruning.** A pruned layer keeps the router rows of its kept experts, and each
token picks its top-k *among the kept experts*. Families that renormalise the top-k weights
(Mixtral, Granite-MoE, Qwen3-MoE with ``norm_topk_prob``) get exactly the dense weights back
for any token whose top-k experts are all kept. Families whose weights are the softmax over
*every* expert (Qwen2-MoE, OLMoE, ``norm_topk_prob: false``) would change those weights if the
softmax ran over the kept experts only, so the pruned router also keeps the removed experts'
router rows (``dropped_weight``, E - E' rows of H values: a few kilobytes) for the softmax's
denominator. Either way a token that never selects a removed expert gets the dense model's
output. (PreMoe's code slices the router and renormalises the top-k weights, which is the same
thing on its DeepSeek gates, which renormalise.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from seap.errors import UnsupportedArchitectureError
from seap.model.adapters.base import ArchitectureAdapter


class KeptExpertRouter(nn.Module):
    """Top-k routing over a layer's kept experts.

    ``weight`` [E', H] holds the kept experts' router rows; ``dropped_weight`` [E - E', H] (or
    ``None``) the removed experts' rows, used only for the softmax's denominator; ``keep``
    (soft mode: bool [E]) excludes experts from selection without removing them. Returns
    ``(router_logits, top_k_weights, top_k_index)`` like the routers of transformers.
    """

    def __init__(self, weight: torch.Tensor, top_k: int, normalise: bool,
                 dropped_weight: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if dropped_weight is not None and dropped_weight.shape[0]:
            self.dropped_weight: nn.Parameter | None = nn.Parameter(dropped_weight.detach().clone(), requires_grad=False)
        else:
            self.dropped_weight = None
        self.register_buffer("keep", None if keep is None else keep.to(torch.bool).clone(), persistent=False)
        self.num_experts = int(weight.shape[0])
        self.top_k = int(top_k)
        self.normalise = bool(normalise)
        self.hidden_dim = int(weight.shape[1])

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        every = logits if self.dropped_weight is None else \
            torch.cat([logits, F.linear(hidden_states, self.dropped_weight)], dim=-1)
        probs = torch.softmax(every.float(), dim=-1)[:, : self.num_experts]
        if self.keep is not None:
            probs = probs.masked_fill(~self.keep, -1.0)  # never selected (probabilities are >= 0)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(hidden_states.dtype), index

    def extra_repr(self) -> str:
        dropped = 0 if self.dropped_weight is None else self.dropped_weight.shape[0]
        return f"experts={self.num_experts}, top_k={self.top_k}, normalise={self.normalise}, dropped_rows={dropped}"


@dataclass
class MoeLayerModules:
    """One MoE layer's parts: the block, its router and fused experts, and the shared expert
    (with its gate) where the family has one."""

    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def expert_intermediate(self) -> int:
        return int(self.experts.down_proj.shape[2])


class MoeAdapter(ArchitectureAdapter):
    """A mixture-of-experts family: attention like the dense families, a routed block of fused
    experts in place of the MLP (in every layer, or in the layers the config says)."""

    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    experts_key: ClassVar[str] = "num_experts"  # the config field with the number of experts

    # -- configuration -------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        self.check_attention(config)
        c = self.text_config(config)
        experts, top_k = getattr(c, self.experts_key, None), getattr(c, "num_experts_per_tok", None)
        if not experts or not top_k or top_k > experts:
            self.refuse(config, f"{self.experts_key}={experts} and num_experts_per_tok={top_k}",
                        "an MoE layer needs at least top-k experts")

    def normalises_top_k(self, config: Any) -> bool:
        """Whether the family renormalises the top-k routing weights to sum to one."""
        return bool(getattr(self.text_config(config), "norm_topk_prob", False))

    # -- module access -------------------------------------------------------------
    def layer_modules(self, layer: nn.Module) -> Any:
        """The dense engine's view of a layer (heads and MLP channels): MoE layers have no single
        MLP, so neuron pruning of an MoE model is refused with what to do instead."""
        if self.moe_modules(layer) is not None:
            raise UnsupportedArchitectureError(
                f"{self.name} model: pruning heads and MLP channels of a mixture-of-experts model is not supported",
                "prune whole experts instead (seap.model.expert_pruning: router statistics, expert masks)")
        return super().layer_modules(layer)

    def moe_modules(self, layer: nn.Module) -> MoeLayerModules | None:
        """The routed block of ``layer``, or ``None`` for a dense layer of an MoE model."""
        block = getattr(layer, self.block_attr)
        router = getattr(block, self.router_attr, None)
        experts = getattr(block, "experts", None)
        if router is None or experts is None:
            return None
        self._check_layout(router, experts)
        return MoeLayerModules(block, router, experts, getattr(block, "shared_expert", None),
                               getattr(block, "shared_expert_gate", None))

    def _check_layout(self, router: nn.Module, experts: nn.Module) -> None:
        """Refuse a router or expert layout this adapter does not know (e.g. experts as a module
        list, or a router without a [E, H] weight), naming what it found."""
        weight = getattr(router, "weight", None)
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        fused = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 \
            and down.dim() == 3 and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
        if not fused or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != gate_up.shape[0]:
            raise UnsupportedArchitectureError(
                f"{self.name} model: unrecognised expert layout (router {type(router).__name__} with weight "
                f"{None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)}, experts "
                f"{type(experts).__name__} with gate_up_proj "
                f"{None if not isinstance(gate_up, torch.Tensor) else tuple(gate_up.shape)})",
                "the adapter expects a router weight [E, H] and fused experts gate_up_proj [E, 2I, H] and "
                "down_proj [E, H, I], as transformers 5.23 builds them; open an issue with the model's config.json")

    def moe_layers(self, model: nn.Module) -> dict[int, MoeLayerModules]:
        """Layer index -> its MoE modules, for every routed layer."""
        out = {}
        for i, layer in enumerate(self.decoder_layers(model)):
            mods = self.moe_modules(layer)
            if mods is not None:
                out[i] = mods
        return out

    def router_weight(self, mods: MoeLayerModules) -> torch.Tensor:
        """The router rows of the *present* experts [E', H]."""
        return mods.router.weight.detach()

    def top_k(self, mods: MoeLayerModules) -> int:
        return int(mods.router.top_k)

    # -- writes --------------------------------------------------------------------
    def prune_experts(self, layer: nn.Module, keep: torch.Tensor, hard: bool, top_k: int, normalise: bool,
                      channels: torch.Tensor | None = None) -> None:
        """Remove (``hard``) or switch off (soft) the experts of ``layer`` where ``keep`` is False:
        the block gets a :class:`KeptExpertRouter` and, when hard, expert tensors of the kept
        experts only; ``channels`` (bool [E, I], unit both) also removes (or zeroes) each kept
        expert's other channels: rows of its gate and up halves, columns of its down projection.
        New tensors throughout: the layer's old ones (shared with a base model) are never
        written to."""
        mods = self.moe_modules(layer)
        if mods is None:
            raise ValueError("not an MoE layer")
        keep = keep.to(device=mods.router.weight.device, dtype=torch.bool)
        weight = self.router_weight(mods)
        gate_up, down = mods.experts.gate_up_proj.detach(), mods.experts.down_proj.detach()
        if hard:
            router = KeptExpertRouter(weight[keep], top_k, normalise, None if normalise else weight[~keep])
            if channels is None:
                new_gate_up, new_down = gate_up[keep].clone(), down[keep].clone()
            else:
                inter = down.shape[2]
                rows = [channels[e].nonzero()[:, 0].to(gate_up.device) for e in keep.nonzero()[:, 0].tolist()]
                new_gate_up = torch.stack([gate_up[e][torch.cat([r, r + inter])]
                                           for e, r in zip(keep.nonzero()[:, 0].tolist(), rows)])
                new_down = torch.stack([down[e][:, r] for e, r in zip(keep.nonzero()[:, 0].tolist(), rows)])
        else:
            router = KeptExpertRouter(weight, top_k, normalise, keep=keep)
            flags = keep.to(gate_up.dtype)[:, None, None]
            new_gate_up, new_down = gate_up * flags, down * flags
            if channels is not None:
                ch = channels.to(device=gate_up.device, dtype=gate_up.dtype)
                new_gate_up = new_gate_up * torch.cat([ch, ch], dim=1)[:, :, None]
                new_down = new_down * ch[:, None, :]
        setattr(mods.block, self.router_attr, router.to(weight.device))
        mods.experts.gate_up_proj = nn.Parameter(new_gate_up, requires_grad=False)
        mods.experts.down_proj = nn.Parameter(new_down, requires_grad=False)
        mods.experts.num_experts = int(new_gate_up.shape[0])
        mods.experts.intermediate_dim = int(new_down.shape[2])
        if hasattr(mods.block, "top_k"):
            mods.block.top_k = top_k

    def resize_experts(self, layer: nn.Module, record: Mapping[str, Any], normalise: bool) -> None:
        """Give an unpruned MoE layer the shapes of a saved pruned one (``record``: its
        ``experts``, ``top_k`` and ``dropped_experts``) before the saved weights are loaded."""
        mods = self.moe_modules(layer)
        if mods is None:
            raise ValueError("not an MoE layer")
        kept, dropped = int(record["experts"]), int(record.get("dropped_experts", 0))
        weight = self.router_weight(mods)
        like = torch.zeros(kept, weight.shape[1], dtype=weight.dtype, device=weight.device)
        spare = torch.zeros(dropped, weight.shape[1], dtype=weight.dtype, device=weight.device)
        setattr(mods.block, self.router_attr, KeptExpertRouter(like, int(record["top_k"]), normalise, spare))
        g, d = mods.experts.gate_up_proj, mods.experts.down_proj
        inter = int(record.get("intermediate", d.shape[2]))
        mods.experts.gate_up_proj = nn.Parameter(g.new_zeros(kept, 2 * inter, g.shape[2]), requires_grad=False)
        mods.experts.down_proj = nn.Parameter(d.new_zeros(kept, d.shape[1], inter), requires_grad=False)
        mods.experts.num_experts = kept
        mods.experts.intermediate_dim = inter
        if hasattr(mods.block, "top_k"):
            mods.block.top_k = int(record["top_k"])

    def experts_record(self, layer: nn.Module) -> dict[str, Any] | None:
        """What a saved pruned checkpoint must carry to rebuild ``layer``'s routed block."""
        mods = self.moe_modules(layer)
        if mods is None:
            return None
        dropped = getattr(mods.router, "dropped_weight", None)
        return {"experts": mods.num_experts, "top_k": self.top_k(mods), "intermediate": mods.expert_intermediate,
                "dropped_experts": 0 if dropped is None else int(dropped.shape[0])}


def moe_adapter(loaded: Any) -> MoeAdapter:
    """The adapter of a loaded model (or layer source), refused with a clear message when it is not an MoE family."""
    if not isinstance(loaded.adapter, MoeAdapter):
        raise UnsupportedArchitectureError(
            f"{loaded.adapter.name} is not a mixture-of-experts model: it has no experts to prune",
            "prune its heads and MLP channels (the default unit), or pass an MoE model")
    return loaded.adapter


__all__ = ["KeptExpertRouter", "MoeAdapter", "MoeLayerModules", "moe_adapter"]
