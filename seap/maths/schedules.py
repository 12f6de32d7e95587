"""Per-layer sparsity allocation: how many attention units and MLP channels each layer loses.

Three schedules (see the method notes §5 and §11):

* ``uniform``: the same ratio in every layer (Wanda-sp's original setting). The common ratio
  is solved so that the realised parameter sparsity hits the target (counts are floored per
  layer, so the ratio ends up slightly above the target).
* ``logistic`` (SEAP, default): rho_l = Lambda / (1 + exp(-k (x_l - x0))) over the
  non-protected layers, x_l spread evenly on [0, 1]; the first ``protect_first`` and last
  ``protect_last`` layers stay dense. Lambda is solved so that the realised parameter
  sparsity of all prunable weights (protected layers included in the denominator) is
  within ``tolerance`` of the target. This is the corrected normalisation of SEAP's later
  code; the March code's normalisation realises less than the target (≈17% for "20%").
* ``flap-adaptive``: FLAP's AL-AM global allocation. Each layer's per-channel scores are
  z-scored, a unit's score is the mean over its channels, all units of all layers are
  ranked together and kept in descending order until the kept weights reach
  ``(1 - target)`` of the total, each unit weighted by its real parameter cost.

Attention and MLP of a layer share the layer's ratio; counts are floored, and every layer
keeps at least one attention unit and one MLP channel.

Two options shape the widths for the hardware, after any schedule (:func:`allocate`):

* ``channel_multiple`` (default :data:`DEFAULT_CHANNEL_MULTIPLE`): every pruned layer keeps a
  multiple of this many MLP channels (:func:`round_channels`: each layer's count is rounded down
  to a multiple, then the layers with the largest remainders get one multiple back until the
  total is the schedule's, so the realised sparsity moves by less than one multiple of one
  layer). Odd widths leave the matrix kernels of llama.cpp (and, less so, PyTorch) on slow
  paths: measured on SmolLM2-135M at 50% in llama.cpp, prefill 1.03x dense with free widths
  and 2.11x / 2.07x / 1.96x with multiples of 32 / 64 / 128, at no measurable accuracy cost up
  to 64 (``docs/results.md`` §5.2). Layers
  left whole, and layers narrower than :data:`ROUNDING_MIN_MULTIPLES` multiples, keep their
  width. 1 turns it off.
* ``same_width``: every layer keeps the same number of heads and channels (the uniform
  allocation with no protected layers, whatever the schedule), so that stock ``transformers``
  can build the pruned model (``seap export --format hf``). All layers then move together,
  so the multiple is the largest power-of-two fraction of ``channel_multiple`` that still
  realises the target within the tolerance. The ``uniform`` schedule is rounded the same way,
  so it too keeps one width for all layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from seap.errors import SeapError
from seap.maths.geometry import DEFAULT_GQA_MODE, ModelGeometry, attention_units, check_gqa_mode, mlp_unit_cost

SCHEDULES = ("logistic", "uniform", "flap-adaptive")
DEFAULT_SCHEDULE = "logistic"
DEFAULT_LOGISTIC = {"k": 1.0, "x0": 0.3, "protect_first": 2, "protect_last": 2}
DEFAULT_TOLERANCE = 0.005  # 0.5 percentage points
DEFAULT_CHANNEL_MULTIPLE = 64  # kept MLP channels per pruned layer: a multiple of this (1: any width)
ROUNDING_MIN_MULTIPLES = 4  # layers narrower than this many multiples keep any width


@dataclass
class LayerAllocation:
    ratio: float  # the schedule's ratio for this layer
    attn_pruned: int  # attention units removed
    mlp_pruned: int  # MLP channels removed
    realised: float = 0.0  # pruned fraction of this layer's prunable weights


@dataclass
class Allocation:
    """The outcome of a schedule: per-layer counts plus target and realised sparsity."""

    schedule: str
    target: float
    realised: float
    gqa_mode: str
    layers: list[LayerAllocation]
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": [asdict(layer) for layer in self.layers]}


def check_sparsity(sparsity: float) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError) as exc:
        raise SeapError(f"sparsity must be a number, got {sparsity!r}", "pass e.g. --sparsity 0.5") from exc
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise SeapError(f"sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.2 or 0.5 (not a percentage)")
    return value


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise SeapError(f"unknown schedule {name!r}", f"use one of: {', '.join(SCHEDULES)}")
    return name


def layer_counts(geometry: ModelGeometry, i: int, ratio: float, gqa_mode: str) -> tuple[int, int]:
    """Floored unit counts for a ratio, keeping at least one unit of each kind."""
    units = attention_units(geometry, i, gqa_mode)
    width = geometry.layers[i].intermediate_size
    ratio = min(max(ratio, 0.0), 1.0)
    attn = min(math.floor(ratio * units.count + 1e-9), units.count - 1)
    mlp = min(math.floor(ratio * width + 1e-9), width - 1)
    return attn, mlp


def pruned_params(geometry: ModelGeometry, i: int, attn_pruned: int, mlp_pruned: int, gqa_mode: str) -> int:
    return attn_pruned * attention_units(geometry, i, gqa_mode).cost + mlp_pruned * mlp_unit_cost(geometry)


def _finish(geometry: ModelGeometry, schedule: str, target: float, gqa_mode: str,
            ratios: Sequence[float], counts: Sequence[tuple[int, int]], params: dict[str, Any]) -> Allocation:
    layers = []
    removed = 0
    for i, (ratio, (attn, mlp)) in enumerate(zip(ratios, counts, strict=True)):
        p = pruned_params(geometry, i, attn, mlp, gqa_mode)
        removed += p
        layers.append(LayerAllocation(float(ratio), int(attn), int(mlp), p / geometry.layer_params(i)))
    realised = removed / geometry.total_params()
    return Allocation(schedule, target, realised, gqa_mode, layers, params)


def realised_for_ratios(geometry: ModelGeometry, ratios: Sequence[float], gqa_mode: str) -> float:
    removed = sum(pruned_params(geometry, i, *layer_counts(geometry, i, r, gqa_mode), gqa_mode) for i, r in enumerate(ratios))
    return removed / geometry.total_params()


def logistic_shape(num_layers: int, k: float, x0: float, protect_first: int, protect_last: int) -> list[float]:
    """rho_l / Lambda for every layer (0 for protected layers)."""
    if protect_first < 0 or protect_last < 0:
        raise SeapError("protected layer counts must be >= 0", "pass --protect-first/--protect-last 0 or more")
    active = list(range(protect_first, num_layers - protect_last))
    if not active:
        raise SeapError(
            f"all {num_layers} layers are protected (first {protect_first}, last {protect_last})",
            "protect fewer layers for this model",
        )
    shape = [0.0] * num_layers
    span = max(len(active) - 1, 1)
    for j, layer in enumerate(active):
        x = j / span
        shape[layer] = 1.0 / (1.0 + math.exp(-k * (x - x0)))
    return shape


def solve_scaled_schedule(geometry: ModelGeometry, shape: Sequence[float], target: float, gqa_mode: str,
                          tolerance: float = DEFAULT_TOLERANCE, iterations: int = 200) -> tuple[float, list[float]]:
    """Find the scale Lambda so that ratios ``min(Lambda * shape, 1)`` realise ``target``.

    The realised sparsity is a non-decreasing step function of Lambda (counts are floored);
    bisection brackets the step that crosses the target and the closer side is returned.
    """
    positive = [s for s in shape if s > 0]
    if target == 0.0 or not positive:
        return 0.0, [0.0] * len(shape)
    lam_max = 1.0 / min(positive)

    def ratios(lam: float) -> list[float]:
        return [min(lam * s, 1.0) for s in shape]

    best_possible = realised_for_ratios(geometry, ratios(lam_max), gqa_mode)
    if best_possible < target - tolerance:
        raise SeapError(
            f"target sparsity {target:.3f} is unreachable: this schedule removes at most {best_possible:.3f} "
            "of the prunable weights (protected layers and one kept unit per layer)",
            "lower the sparsity, protect fewer layers, or use the uniform schedule",
        )
    lo, hi = 0.0, lam_max  # realised(lo) <= target <= realised(hi) (or best possible)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if realised_for_ratios(geometry, ratios(mid), gqa_mode) < target:
            lo = mid
        else:
            hi = mid
    r_lo = realised_for_ratios(geometry, ratios(lo), gqa_mode)
    r_hi = realised_for_ratios(geometry, ratios(hi), gqa_mode)
    lam = lo if abs(r_lo - target) < abs(r_hi - target) else hi
    achieved = min(r_lo, r_hi, key=lambda r: abs(r - target))
    if abs(achieved - target) > tolerance:
        warnings.warn(
            f"realised sparsity {achieved:.4f} misses the target {target:.4f} by more than {tolerance:.4f}: "
            "the model's pruning units are too coarse for this target",
            stacklevel=2,
        )
    return lam, ratios(lam)


def uniform_allocation(geometry: ModelGeometry, target: float, gqa_mode: str = DEFAULT_GQA_MODE,
                       tolerance: float = DEFAULT_TOLERANCE) -> Allocation:
    target = check_sparsity(target)
    lam, ratios = solve_scaled_schedule(geometry, [1.0] * geometry.num_layers, target, gqa_mode, tolerance)
    counts = [layer_counts(geometry, i, r, gqa_mode) for i, r in enumerate(ratios)]
    return _finish(geometry, "uniform", target, gqa_mode, ratios, counts, {"ratio": lam})


def logistic_allocation(geometry: ModelGeometry, target: float, gqa_mode: str = DEFAULT_GQA_MODE,
                        k: float = 1.0, x0: float = 0.3, protect_first: int = 2, protect_last: int = 2,
                        tolerance: float = DEFAULT_TOLERANCE) -> Allocation:
    target = check_sparsity(target)
    shape = logistic_shape(geometry.num_layers, k, x0, protect_first, protect_last)
    lam, ratios = solve_scaled_schedule(geometry, shape, target, gqa_mode, tolerance)
    counts = [layer_counts(geometry, i, r, gqa_mode) for i, r in enumerate(ratios)]
    params = {"k": k, "x0": x0, "protect_first": protect_first, "protect_last": protect_last, "lambda": lam}
    return _finish(geometry, "logistic", target, gqa_mode, ratios, counts, params)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def flap_adaptive_allocation(scores: Any, target: float, gqa_mode: str = DEFAULT_GQA_MODE) -> Allocation:
    """FLAP's AL-AM allocation from importance scores (:class:`seap.maths.scores.ImportanceScores`)."""
    target = check_sparsity(target)
    check_gqa_mode(gqa_mode)
    geometry: ModelGeometry = scores.geometry
    unit_scores: list[torch.Tensor] = []
    unit_costs: list[torch.Tensor] = []
    unit_layer: list[torch.Tensor] = []
    unit_is_attn: list[torch.Tensor] = []
    for i, layer in enumerate(scores.layers):
        geo = geometry.layers[i]
        z_attn = _standardise(layer.attn_channels).reshape(geo.num_heads, geo.head_dim).mean(dim=1)  # per head
        units = attention_units(geometry, i, gqa_mode)
        if units.kind == "kv-groups":
            attn = z_attn.reshape(geo.num_kv_heads, geo.group_size).mean(dim=1)
            cost = units.cost
        else:  # per query head ("heads" for MHA, "query-heads": one head is 1/kv of a slice)
            attn = z_attn
            cost = units.cost if units.kind == "heads" else units.cost // geo.num_kv_heads
        mlp = _standardise(layer.channels)
        for values, c, is_attn in ((attn, cost, True), (mlp, mlp_unit_cost(geometry), False)):
            unit_scores.append(values)
            unit_costs.append(torch.full_like(values, float(c)))
            unit_layer.append(torch.full((values.numel(),), i, dtype=torch.long))
            unit_is_attn.append(torch.full((values.numel(),), is_attn, dtype=torch.bool))
    s = torch.cat(unit_scores)
    c = torch.cat(unit_costs)
    layer_of = torch.cat(unit_layer)
    is_attn = torch.cat(unit_is_attn)
    order = torch.argsort(s, descending=True, stable=True)
    kept_cost = torch.cumsum(c[order], dim=0)
    goal = (1.0 - target) * float(c.sum())
    n_keep = int(torch.argmin((kept_cost - goal).abs())) + 1 if target > 0 else len(order)
    pruned = torch.zeros_like(s, dtype=torch.bool)
    pruned[order[n_keep:]] = True
    counts = []
    ratios = []
    for i in range(geometry.num_layers):
        geo = geometry.layers[i]
        units = attention_units(geometry, i, gqa_mode)
        attn_removed = int((pruned & is_attn & (layer_of == i)).sum())
        if units.kind == "query-heads":
            attn_removed = round(attn_removed / geo.num_kv_heads)
        attn_removed = min(attn_removed, units.count - 1)
        mlp_removed = min(int((pruned & ~is_attn & (layer_of == i)).sum()), geo.intermediate_size - 1)
        counts.append((attn_removed, mlp_removed))
        ratios.append(pruned_params(geometry, i, attn_removed, mlp_removed, gqa_mode) / geometry.layer_params(i))
    return _finish(geometry, "flap-adaptive", target, gqa_mode, ratios, counts, {"standardise": "z-score"})


def check_channel_multiple(multiple: Any) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise SeapError(f"channel_multiple must be a whole number of at least 1, got {multiple!r}",
                        "pass e.g. 64 (1: any width)")
    return multiple


def _roundable(width: int, kept: int, multiple: int) -> bool:
    return multiple > 1 and kept < width and width >= ROUNDING_MIN_MULTIPLES * multiple


def round_channels(geometry: ModelGeometry, allocation: Allocation, multiple: int) -> Allocation:
    """``allocation`` with every pruned layer's kept MLP channels a multiple of ``multiple``, the total
    kept as close as the multiple allows to the allocation's (largest remainders rounded up)."""
    check_channel_multiple(multiple)
    widths = [g.intermediate_size for g in geometry.layers]
    kept = [w - a.mlp_pruned for w, a in zip(widths, allocation.layers, strict=True)]
    new = list(kept)
    remainders = []
    for i, (w, k) in enumerate(zip(widths, kept, strict=True)):
        if _roundable(w, k, multiple):
            new[i] = max(multiple, k - k % multiple)
            remainders.append((k - new[i], i))
    short = sum(kept) - sum(new)
    for _, i in sorted(remainders, key=lambda r: (-r[0], r[1])):  # one multiple back where the most was cut
        if short < multiple / 2:
            break
        if new[i] + multiple <= widths[i]:
            new[i] += multiple
            short -= multiple
    counts = [(a.attn_pruned, w - k) for a, w, k in zip(allocation.layers, widths, new, strict=True)]
    out = _finish(geometry, allocation.schedule, allocation.target, allocation.gqa_mode,
                  [a.ratio for a in allocation.layers], counts, {**allocation.params, "channel_multiple": multiple})
    return out


def same_width_allocation(geometry: ModelGeometry, target: float, gqa_mode: str = DEFAULT_GQA_MODE,
                          tolerance: float = DEFAULT_TOLERANCE, channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE,
                          ) -> Allocation:
    """One width for all layers (the uniform allocation), kept MLP channels a multiple of the largest
    power-of-two fraction of ``channel_multiple`` that realises ``target`` within ``tolerance``."""
    base = uniform_allocation(geometry, target, gqa_mode, tolerance)
    multiple = check_channel_multiple(channel_multiple)
    while True:
        attn, mlp = base.layers[0].attn_pruned, base.layers[0].mlp_pruned
        counts = []
        for g in geometry.layers:
            kept = g.intermediate_size - mlp
            if _roundable(g.intermediate_size, kept, multiple):
                kept = min(max(multiple, multiple * math.floor(kept / multiple + 0.5)), g.intermediate_size)
            counts.append((attn, g.intermediate_size - kept))
        out = _finish(geometry, "uniform", target, gqa_mode, [a.ratio for a in base.layers], counts,
                      {**base.params, "same_width": True, "channel_multiple": multiple})
        if multiple == 1 or abs(out.realised - target) <= tolerance:
            return out
        multiple = max(1, multiple // 2)


BEYOND_REACH = "beyond_reach"  # (a mask's metadata) the sparsity asked for that its schedule could not reach


def reachable_sparsity(schedule: str, geometry: ModelGeometry, gqa_mode: str = DEFAULT_GQA_MODE,
                       **logistic: Any) -> float:
    """The largest sparsity ``schedule`` can realise on ``geometry`` (the logistic schedule keeps
    its protected layers whole and one unit per layer; the others reach nearly everything: 1.0)."""
    if schedule != "logistic":
        return 1.0
    opts = {**DEFAULT_LOGISTIC, **{k: v for k, v in logistic.items() if v is not None and k in DEFAULT_LOGISTIC}}
    shape = logistic_shape(geometry.num_layers, opts["k"], opts["x0"], opts["protect_first"], opts["protect_last"])
    positive = [v for v in shape if v > 0]
    if not positive:
        return 0.0
    lam_max = 1.0 / min(positive)
    return realised_for_ratios(geometry, [min(lam_max * v, 1.0) for v in shape], gqa_mode)


def allocate(schedule: str, geometry: ModelGeometry, target: float, gqa_mode: str = DEFAULT_GQA_MODE,
             scores: Any = None, tolerance: float = DEFAULT_TOLERANCE, channel_multiple: int | None = None,
             same_width: bool = False, **logistic: Any) -> Allocation:
    """Dispatch to a schedule by name (``logistic`` takes ``k``, ``x0``, ``protect_first``, ``protect_last``),
    then shape the widths: ``channel_multiple`` (None: :data:`DEFAULT_CHANNEL_MULTIPLE`) rounds every
    pruned layer's kept MLP channels (:func:`round_channels`); ``same_width`` gives every layer the
    same widths whatever ``schedule`` says (:func:`same_width_allocation`; the allocation records it)."""
    check_schedule(schedule)
    check_gqa_mode(gqa_mode)
    multiple = check_channel_multiple(DEFAULT_CHANNEL_MULTIPLE if channel_multiple is None else channel_multiple)
    if same_width:
        allocation = same_width_allocation(geometry, target, gqa_mode, tolerance, multiple)
        allocation.params["schedule_replaced"] = schedule
        return allocation
    if schedule == "uniform":  # one width for all layers, rounded as same_width rounds (so it stays one width)
        allocation = same_width_allocation(geometry, target, gqa_mode, tolerance, multiple)
        allocation.params.pop("same_width")
        return allocation
    if schedule == "logistic":
        opts = {**DEFAULT_LOGISTIC, **{k: v for k, v in logistic.items() if v is not None}}
        allocation = logistic_allocation(geometry, target, gqa_mode, tolerance=tolerance, **opts)
    elif scores is None:
        raise SeapError("the flap-adaptive schedule needs importance scores", "pass the scores of the mask's task")
    else:
        allocation = flap_adaptive_allocation(scores, target, gqa_mode)
    return round_channels(geometry, allocation, multiple) if multiple > 1 else allocation
