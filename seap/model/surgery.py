"""Applying a mask to a model: soft (zeroing) or hard (physical slicing), with optional
FLAP-style bias compensation.

* **soft**: the rows of q/k/v (and their biases) of removed heads, the rows of gate/up of
  removed channels, and the matching input columns of o_proj/down_proj are set to zero.
  Shapes are unchanged; the output equals the hard-pruned model's up to rounding.
* **hard**: q/k/v rows, o_proj columns, gate/up rows and down_proj columns are sliced
  away, so every layer can have its own width (heads, key/value heads, intermediate size).
* **bias compensation** (FLAP): the removed channels' mean contribution is folded into a
  bias of o_proj / down_proj: ``b += W[:, removed] @ mean[removed]``. Needs a mask built
  with calibration means (``--bias-compensation`` at mask time).
* **reconstruction**: a reconstructed mask carries refitted weights for the kept input
  columns of o_proj / down_proj (and a bias, if its refit has one), which replace the plain
  slice (:func:`reconstruct_mask`); soft mode places them in the dense-shaped weight.

This module applies a :class:`~seap.maths.masks.PruningMask`; :func:`seap.model.masking.apply_mask`
applies a mask of any kind (an expert mask of an MoE model too) by its format.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from seap.model.adapters import ArchitectureAdapter, LayerModules
from seap.errors import SeapError
from seap.maths.expert_selection import ExpertMask
from seap.maths.masks import LayerMask, PruningMask
from seap.model.adapters.moe import MoeAdapter
from seap.model.loaded import LoadedModel, model_fingerprint
from seap.model.pruning import check_mode, check_unpruned, share_copy


def _head_rows(keep_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return keep_heads.repeat_interleave(head_dim)


def _replace_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.train(like.training)
    return out


def _compensation(linear: nn.Linear, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed], computed in float64."""
    w = linear.weight.detach().to(torch.float64)
    m = mean.to(device=w.device, dtype=torch.float64)
    return w[:, removed] @ m[removed]


def _prune_layer(mods: LayerModules, mask: LayerMask, head_dim: int, hard: bool, bias_compensation: bool,
                 adapter: ArchitectureAdapter) -> dict[str, nn.Linear]:
    """Replacement projections by logical name (``q_proj`` ... ``down_proj``); the adapter puts them in place."""
    device = mods.q_proj.weight.device
    q_rows = _head_rows(mask.heads, head_dim).to(device)
    kv_rows = _head_rows(mask.kv_heads, head_dim).to(device)
    ch = mask.channels.to(device)
    replacements: dict[str, nn.Linear] = {}

    o_bias = mods.o_proj.bias.detach().clone() if mods.o_proj.bias is not None else None
    down_bias = mods.down_proj.bias.detach().clone() if mods.down_proj.bias is not None else None
    if bias_compensation:
        if mask.attn_mean is None or mask.mlp_mean is None:
            raise SeapError("this mask carries no calibration means", "rebuild it with --bias-compensation")
        comp_o = _compensation(mods.o_proj, ~q_rows, mask.attn_mean).to(mods.o_proj.weight.dtype)
        comp_d = _compensation(mods.down_proj, ~ch, mask.mlp_mean).to(mods.down_proj.weight.dtype)
        o_bias = comp_o if o_bias is None else o_bias + comp_o
        down_bias = comp_d if down_bias is None else down_bias + comp_d

    def rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else None
        if hard:
            return _replace_linear(w[keep], b[keep] if b is not None else None, linear)
        return _replace_linear(w * keep[:, None].to(w.dtype), b * keep.to(b.dtype) if b is not None else None, linear)

    def cols(linear: nn.Linear, keep: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Linear:
        w = linear.weight.detach()
        if mask.refit is None or f"{name}_weight" not in mask.refit:  # (a layer being refitted: o_proj first)
            return _replace_linear(w[:, keep] if hard else w * keep[None, :].to(w.dtype), bias, linear)
        kept = mask.refit[f"{name}_weight"].to(device=w.device, dtype=w.dtype)
        refit_bias = mask.refit.get(f"{name}_bias")
        if refit_bias is not None:
            refit_bias = refit_bias.to(device=w.device, dtype=w.dtype)
            bias = refit_bias if bias is None else bias + refit_bias
        if hard:
            return _replace_linear(kept, bias, linear)
        full = torch.zeros_like(w)
        full[:, keep] = kept
        return _replace_linear(full, bias, linear)

    replacements["q_proj"] = rows(mods.q_proj, q_rows)
    replacements["k_proj"] = rows(mods.k_proj, kv_rows)
    replacements["v_proj"] = rows(mods.v_proj, kv_rows)
    replacements["o_proj"] = cols(mods.o_proj, q_rows, o_bias, "o")
    replacements["gate_proj"] = rows(mods.gate_proj, ch)
    replacements["up_proj"] = rows(mods.up_proj, ch)
    replacements["down_proj"] = cols(mods.down_proj, ch, down_bias, "down")
    return replacements


def prune_layer(adapter: ArchitectureAdapter, layer: nn.Module, mask: LayerMask, head_dim: int, hard: bool,
                bias_compensation: bool) -> None:
    """Prune one decoder layer in place: its projections replaced (sliced when ``hard``, zeroed
    otherwise; refitted where the mask carries a refit), its head norms pruned and, when
    ``hard``, its recorded widths set."""
    with torch.no_grad():
        adapter.set_projections(layer, _prune_layer(adapter.layer_modules(layer), mask, head_dim, hard,
                                                    bias_compensation, adapter))
        adapter.prune_norms(layer, _head_rows(mask.heads, head_dim), _head_rows(mask.kv_heads, head_dim), hard)
        if hard:
            adapter.set_widths(layer, int(mask.heads.sum()), int(mask.kv_heads.sum()), int(mask.channels.sum()))


def pruning_record(mask: PruningMask, mode: str, bias_compensation: bool) -> dict[str, Any]:
    """What a pruned model records of the mask it was pruned with (``config.seap_pruning``)."""
    record: dict[str, Any] = {
        "mode": mode,
        "base_fingerprint": mask.base_fingerprint,
        "mask_digest": mask.digest(),
        "task": mask.task,
        "score": mask.meta.get("score"),
        "schedule": mask.meta.get("schedule"),
        "target_sparsity": mask.meta.get("target_sparsity"),
        "realised_sparsity": mask.realised_sparsity(),
        "bias_compensation": bias_compensation,
    }
    if mask.is_reconstructed:
        record["reconstruction"] = mask.meta.get("reconstruction")
    return record


def prune_layer_experts(adapter: MoeAdapter, layer: nn.Module, mask: ExpertMask, index: int, hard: bool,
                        normalise: bool) -> None:
    """Remove (``hard``) or switch off the experts ``mask`` drops from decoder layer ``index``
    (``layer``, modified in place: new tensors, the old ones untouched); warns when the router's
    top-k is clamped because fewer experts are kept than it selected."""
    mods = adapter.moe_modules(layer)
    if mods is not None and mask.top_k[index] < adapter.top_k(mods):
        warnings.warn(f"layer {index}: top-k clamped from {adapter.top_k(mods)} to {mask.top_k[index]} "
                      "(fewer experts kept than the router selected)", stacklevel=3)
    adapter.prune_experts(layer, mask.experts[index], hard, mask.top_k[index], normalise,
                          None if mask.channels is None else mask.channels[index])


def expert_pruning_record(mask: ExpertMask, mode: str, moe_layers: dict[int, Any]) -> dict[str, Any]:
    """The ``seap_pruning`` record of a model pruned by ``mask`` (``moe_layers``: each MoE layer's
    :meth:`~seap.model.adapters.moe.MoeAdapter.experts_record` after pruning)."""
    return {
        "mode": mode, "unit": mask.meta.get("unit", "experts"), "base_fingerprint": mask.base_fingerprint,
        "mask_digest": mask.digest(), "task": mask.task, "score": mask.meta.get("score"),
        "target_sparsity": mask.meta.get("target_sparsity"), "realised_sparsity": mask.realised_sparsity(),
        "moe_layers": {str(i): moe_layers[i] for i in sorted(mask.experts)},
    }


def resolve_bias_compensation(mask: PruningMask, bias_compensation: bool | None) -> bool:
    """Whether ``mask`` is applied with FLAP's bias compensation: by default when it carries means
    and is not reconstructed; a reconstructed mask refuses it."""
    if bias_compensation is None:
        bias_compensation = mask.has_bias_compensation and not mask.is_reconstructed
    if bias_compensation and mask.is_reconstructed:
        raise SeapError("this mask is reconstructed: its refit already replaces bias compensation",
                        "apply it without --bias-compensation")
    return bias_compensation


def soft_pruned_layer(adapter: ArchitectureAdapter, layer: nn.Module, mask: LayerMask, head_dim: int) -> nn.Module:
    """A copy of one decoder layer with ``mask`` applied softly (plain slice, or the mask's
    refit where it has one); it shares the layer's norms and owns new projections."""
    copy_ = share_copy(layer)
    with torch.no_grad():
        adapter.set_projections(copy_, _prune_layer(adapter.layer_modules(copy_), mask, head_dim, False, False, adapter))
        adapter.prune_norms(copy_, _head_rows(mask.heads, head_dim), _head_rows(mask.kv_heads, head_dim), False)
    return copy_


def apply_pruning_mask(
    loaded: LoadedModel,
    mask: PruningMask,
    mode: str = "hard",
    bias_compensation: bool | None = None,
    inplace: bool = False,
) -> LoadedModel:
    """Return the model pruned by ``mask``.

    Bias compensation (FLAP) is a property of the mask: a mask built with calibration means
    (its method compensates) is applied with it. ``bias_compensation=False`` turns it off,
    ``True`` requires it (a mask without means is an error).

    Unless ``inplace``, the base model is left untouched: the result is a structural copy
    that shares the base's unpruned tensors (embeddings, norms, LM head) and owns new
    pruned q/k/v/o/gate/up/down layers (:func:`share_copy`), so several experts of one base
    cost little memory.

    The mask must have been built on this model (same fingerprint). The result records
    the mask in ``model.config.seap_pruning`` and gets its own fingerprint. (A mask of any
    kind, an expert mask of an MoE model too, is applied by :func:`seap.model.masking.apply_mask`.)
    """
    check_mode(mode)
    mask.check_model(loaded.fingerprint)
    check_unpruned(loaded)
    bias_compensation = resolve_bias_compensation(mask, bias_compensation)
    model = loaded.model if inplace else share_copy(loaded.model)
    adapter = loaded.adapter
    head_dim = adapter.head_dim(model.config)
    hard = mode == "hard"
    for layer, layer_mask in zip(adapter.decoder_layers(model), mask.layers, strict=True):
        prune_layer(adapter, layer, layer_mask, head_dim, hard, bias_compensation)
    model.config.seap_pruning = pruning_record(mask, mode, bias_compensation)
    return LoadedModel(model, loaded.tokenizer, adapter, f"{loaded.source}+mask:{mask.task}", model_fingerprint(model))
