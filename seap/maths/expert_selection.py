"""Expert pruning of mixture-of-experts layers (the PreMoe idea, in SEAP's engine): router
statistics per task, expert scores, and the expert mask.

**Router statistics** (:class:`RouterStatistics`), per MoE layer over a task's real tokens
(padding excluded), accumulated in float64 and exactly mergeable across shards (sums):

* ``tokens``: tokens seen;
* ``selected[e]``: tokens whose top-k includes expert ``e`` (the dense model's routing);
* ``prob_sum[e]``: the router's softmax probability of ``e``, summed;
* ``top1_logit_sum[e]``: the raw router logit of ``e`` summed over the tokens whose top-1
  expert is ``e`` (PreMoe's marker);
* ``weight_sum[e]``: the routing weight ``e`` got (0 when not selected), summed;
* ``reap_sum[e]``: routing weight times the L2 norm of ``e``'s output, summed over the tokens
  routed to ``e``.

**Scores** (:data:`EXPERT_SCORES`, higher = keep):

* ``tcess``: PreMoe's task-conditioned expected selection score as its released code
  computes it (``collect_utils.py``: a hook on each gate recomputes the raw logits
  ``x W^T`` in float32, keeps each token's top-1 logit and zeroes the rest, sums over tokens
  and divides by the number of all tokens): ``top1_logit_sum / tokens``. The code hard-codes
  top-1 (``k = 1``, ``r = -1``); its unused threshold branch is not reproduced. Being raw
  logits, a score can be negative, so an expert never chosen (score 0) can outrank one chosen
  with negative logits; ``frequency`` and ``reap`` have no such quirk;
* ``frequency``: ``selected / tokens``, the share of tokens that route to ``e``;
* ``reap``: REAP (Cerebras, 2025): ``reap_sum / selected``, the mean over the tokens routed to
  ``e`` of its routing weight times its output norm (0 for an expert never selected).

**Masks** (:class:`ExpertMask`): per MoE layer, which experts to keep; a small artifact tied to
the base model's fingerprint like :class:`seap.maths.masks.PruningMask`. The sparsity is the
fraction of routed-expert parameters removed; each layer keeps ``E - round(s * E)`` experts
(``uniform``), and never fewer than the router's top-k unless ``allow_k_reduction`` (then top-k
is clamped to the experts kept). A mask may also hold channels inside the kept experts (unit
``both``: experts and channels; unit ``neurons``: every expert kept, channels only), scored
by SEAP's ``seap-sf`` over the tokens routed to each expert.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from seap import __version__
from seap.artifacts import ArtifactKind, read_artifact, require, write_artifact
from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.maths.masks import check_base_model

from seap.maths.expert_units import CHANNEL_SCORE, DEFAULT_EXPERT_SCORE, EXPERT_SCORES  # noqa: E402
ROUTER_FIELDS = ("selected", "prob_sum", "top1_logit_sum", "weight_sum", "reap_sum")
CHANNEL_FIELDS = ("channel_sum", "channel_sq_sum", "down_sq_l2")
EXPERT_MASK_ARTIFACT = ArtifactKind("seap-expert-mask", 1, "experts.safetensors", "experts.json",
                                    "rebuild the expert mask from the model's router statistics")
ROUTER_STATISTICS_ARTIFACT = ArtifactKind("seap-router-statistics", 1, "router.safetensors", "router.json",
                                          "collect the router statistics again")


# -- statistics ---------------------------------------------------------------------------


@dataclass
class LayerRouterStatistics:
    """Sums over one MoE layer's tokens (see the module docstring); float64 [E] each."""

    tokens: int
    selected: torch.Tensor
    prob_sum: torch.Tensor
    top1_logit_sum: torch.Tensor
    weight_sum: torch.Tensor
    reap_sum: torch.Tensor
    # unit both: per expert channel (the input of its down projection) over the tokens routed to
    # it, [E, I]: sum and sum of squares, and the squared L2 norm of the matching down_proj column
    channel_sum: torch.Tensor | None = None
    channel_sq_sum: torch.Tensor | None = None
    down_sq_l2: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_experts: int, intermediate: int | None = None) -> LayerRouterStatistics:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        channels = (z(num_experts, intermediate), z(num_experts, intermediate), z(num_experts, intermediate)) \
            if intermediate else (None, None, None)
        return cls(0, z(num_experts), z(num_experts), z(num_experts), z(num_experts), z(num_experts), *channels)

    @property
    def num_experts(self) -> int:
        return int(self.selected.numel())

    @property
    def has_channels(self) -> bool:
        return self.channel_sum is not None

    def merge(self, other: LayerRouterStatistics) -> LayerRouterStatistics:
        if other.num_experts != self.num_experts or other.has_channels != self.has_channels:
            raise SeapError("router statistics of layers with different expert counts (or with and without channel "
                            "sums) cannot be merged", "merge statistics of the same model, collected the same way")
        channels = (self.channel_sum + other.channel_sum, self.channel_sq_sum + other.channel_sq_sum,  # type: ignore[operator]
                    self.down_sq_l2) if self.has_channels else (None, None, None)
        return LayerRouterStatistics(self.tokens + other.tokens,
                                     *(getattr(self, f) + getattr(other, f) for f in ROUTER_FIELDS), *channels)

    def channel_scores(self) -> torch.Tensor:
        """[E, I]: SEAP's channel score inside each expert (``seap-sf``: the variance of the
        channel over the tokens routed to the expert x the squared L2 norm of its down_proj
        column; 0 for an expert never selected)."""
        if not self.has_channels:
            raise SeapError("these router statistics hold no channel sums", "collect them with unit both or neurons")
        n = self.selected.clamp(min=1)[:, None]
        mean = self.channel_sum / n  # type: ignore[operator]
        variance = (self.channel_sq_sum / n - mean * mean).clamp(min=0)  # type: ignore[operator]
        return torch.where(self.selected[:, None] > 0, variance * self.down_sq_l2, torch.zeros_like(variance))


def route(logits: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's decision from its logits [T, E]: softmax probabilities [T, E] (float64), the
    top-k expert indices [T, k] and their routing weights [T, k] (renormalised to sum to one
    when ``normalise``)."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    if normalise:
        top = top / top.sum(dim=-1, keepdim=True)
    return probs, index, top


def router_sums(logits: torch.Tensor, top_k: int, normalise: bool,
                output_norms: torch.Tensor | None = None) -> LayerRouterStatistics:
    """The statistics of one batch of real tokens: ``logits`` [T, E] of the router,
    ``output_norms`` [T, E] the L2 norm of each expert's output on each token (only the entries
    of routed experts are read; ``None``: no REAP sums)."""
    t, e = logits.shape
    probs, index, weights = route(logits, top_k, normalise)
    stats = LayerRouterStatistics.zeros(e)
    stats.tokens = int(t)
    routed = torch.zeros(t, e, dtype=torch.float64).scatter_(1, index, weights)
    chosen = torch.zeros(t, e, dtype=torch.float64).scatter_(1, index, 1.0)
    stats.selected += chosen.sum(0)
    stats.prob_sum += probs.sum(0)
    stats.weight_sum += routed.sum(0)
    top1 = logits.to(torch.float64).argmax(dim=-1)
    stats.top1_logit_sum.index_add_(0, top1, logits.to(torch.float64).gather(1, top1[:, None])[:, 0])
    if output_norms is not None:
        stats.reap_sum += (routed * output_norms.to(torch.float64) * chosen).sum(0)
    return stats


@dataclass
class RouterStatistics:
    """One task's router statistics over every MoE layer of a model."""

    layers: dict[int, LayerRouterStatistics]
    top_k: dict[int, int]
    meta: dict[str, Any] = field(default_factory=dict)  # fingerprint, task, model source, ...

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "?"))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {f"layers.{i}.{name}": getattr(layer, name).to(torch.float64).contiguous()
                   for i, layer in self.layers.items() for name in (*ROUTER_FIELDS, *CHANNEL_FIELDS)
                   if getattr(layer, name) is not None}
        meta = {**self.meta, "top_k": {str(i): k for i, k in self.top_k.items()},
                "tokens": {str(i): layer.tokens for i, layer in self.layers.items()}}
        return write_artifact(ROUTER_STATISTICS_ARTIFACT, path, tensors, meta, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> RouterStatistics:
        """Read a router-statistics folder, verifying its checksums."""
        t, meta = read_artifact(ROUTER_STATISTICS_ARTIFACT, path)
        top_k = {int(i): int(k) for i, k in meta.pop("top_k").items()}
        tokens = {int(i): int(n) for i, n in meta.pop("tokens").items()}
        layers = {i: LayerRouterStatistics(tokens[i], *(require(t, f"layers.{i}.{name}", ROUTER_STATISTICS_ARTIFACT)
                                                         for name in ROUTER_FIELDS),
                                           *(t.get(f"layers.{i}.{name}") for name in CHANNEL_FIELDS)) for i in top_k}
        if any(len({x.numel() for x in (getattr(layer, f) for f in ROUTER_FIELDS)}) != 1 for layer in layers.values()):
            raise ArtifactError(f"router statistics {path} have sums of different lengths in one layer",
                                ROUTER_STATISTICS_ARTIFACT.remake)
        return cls(layers, top_k, meta)

    def merge(self, other: RouterStatistics) -> RouterStatistics:
        """Exact merge of two shards (or tasks) of the same model."""
        if other.meta.get("fingerprint") != self.meta.get("fingerprint"):
            raise ModelMismatchError("router statistics come from different models", "merge statistics of one model")
        if set(other.layers) != set(self.layers):
            raise SeapError("router statistics cover different MoE layers", "merge statistics of one model")
        tasks = sorted({*str(self.meta.get("task", "")).split("+"), *str(other.meta.get("task", "")).split("+")} - {""})
        return RouterStatistics({i: self.layers[i].merge(other.layers[i]) for i in self.layers}, dict(self.top_k),
                                {**self.meta, "task": "+".join(tasks)})


# -- scores ------------------------------------------------------------------------------


def expert_scores(stats: LayerRouterStatistics, score: str = DEFAULT_EXPERT_SCORE) -> torch.Tensor:
    """One layer's expert scores [E] (float64; higher = keep), see :data:`EXPERT_SCORES`."""
    if score not in EXPERT_SCORES:
        raise SeapError(f"unknown expert score {score!r}", f"use one of: {', '.join(EXPERT_SCORES)}")
    if stats.tokens <= 0:
        raise SeapError("router statistics over no tokens", "collect statistics on a non-empty corpus")
    if score == "tcess":
        return stats.top1_logit_sum / stats.tokens
    if score == "frequency":
        return stats.selected / stats.tokens
    return torch.where(stats.selected > 0, stats.reap_sum / stats.selected.clamp(min=1), torch.zeros_like(stats.reap_sum))


# -- masks -------------------------------------------------------------------------------


def kept_count(num_experts: int, top_k: int, sparsity: float, allow_k_reduction: bool = False) -> int:
    """How many of a layer's ``num_experts`` experts a ``sparsity`` keeps: ``E - round(s E)``,
    refused below ``top_k`` unless ``allow_k_reduction`` (never below one)."""
    if not 0.0 <= sparsity < 1.0:
        raise SeapError(f"expert sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.5")
    keep = num_experts - int(round(sparsity * num_experts))
    if keep < top_k and not allow_k_reduction:
        raise SeapError(f"sparsity {sparsity:g} keeps {keep} of {num_experts} experts, fewer than the router's "
                        f"top-{top_k}", f"use a sparsity of at most {(num_experts - top_k) / num_experts:g}, or pass "
                        "--allow-k-reduction to route each token to fewer experts")
    return max(keep, 1)


EXPERT_SCHEDULES = ("uniform", "logistic")


def expert_allocation(num_experts: Mapping[int, int], top_k: Mapping[int, int], sparsity: float,
                      schedule: str = "uniform", expert_params: Mapping[int, int] | None = None,
                      allow_k_reduction: bool = False, k: float = 1.0, x0: float = 0.3, protect_first: int = 2,
                      protect_last: int = 2) -> dict[int, int]:
    """Experts kept per MoE layer for a target ``sparsity`` (the fraction of routed-expert
    parameters removed). ``uniform``: every layer :func:`kept_count`. ``logistic``: SEAP's
    schedule over the MoE layers in depth order (:func:`seap.maths.schedules.logistic_shape`:
    the first ``protect_first`` and last ``protect_last`` kept whole, later layers pruned more),
    scaled by bisection to the target; a layer never keeps fewer than its top-k (one, with
    ``allow_k_reduction``)."""
    from seap.maths.schedules import logistic_shape

    if schedule not in EXPERT_SCHEDULES:
        raise SeapError(f"unknown expert schedule {schedule!r}", f"use one of: {', '.join(EXPERT_SCHEDULES)}")
    layers = sorted(num_experts)
    if schedule == "uniform":
        return {i: kept_count(num_experts[i], top_k[i], sparsity, allow_k_reduction) for i in layers}
    if not 0.0 <= sparsity < 1.0:
        raise SeapError(f"expert sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.5")
    size = {i: (expert_params or {}).get(i, 1) for i in layers}
    floor = {i: 1 if allow_k_reduction else top_k[i] for i in layers}
    total = sum(size[i] * num_experts[i] for i in layers)
    shape = dict(zip(layers, logistic_shape(len(layers), k, x0, protect_first, protect_last)))

    def kept(lam: float) -> dict[int, int]:
        return {i: max(floor[i], num_experts[i] - int(math.floor(min(lam * shape[i], 1.0) * num_experts[i] + 1e-9)))
                for i in layers}

    def removed(lam: float) -> float:
        return sum(size[i] * (num_experts[i] - n) for i, n in kept(lam).items()) / total

    return kept(_logistic_scale(removed, shape, sparsity, "expert", "protected layers, top-k kept",
                                "lower the sparsity, protect fewer layers, use the uniform schedule, or --allow-k-reduction"))


def _logistic_scale(removed: Callable[[float], float], shape: Mapping[int, float], sparsity: float, unit: str,
                    limits: str, fix: str) -> float:
    """The scale lambda (layer i prunes ``min(lambda * shape[i], 1)`` of its ``unit``) whose realised
    sparsity ``removed(lambda)`` is nearest ``sparsity``, by bisection; an unreachable target is
    refused, naming what ``limits`` it and the ``fix``."""
    lam_max = 1.0 / min(v for v in shape.values() if v > 0)
    if removed(lam_max) < sparsity - 1e-9:
        raise SeapError(f"{unit} sparsity {sparsity:g} is unreachable with the logistic schedule: it removes at most "
                        f"{removed(lam_max):.3f} ({limits})", fix)
    lo, hi = 0.0, lam_max
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < sparsity else (lo, mid)
    return min((lo, hi), key=lambda lam: abs(removed(lam) - sparsity))


UNITS_OF_MOE = ("experts", "both", "neurons")  # what an expert mask prunes: experts, both, or channels only
CHANNEL_MULTIPLE = 8  # kept channels per expert: transformers' grouped expert matmul needs 16-byte strides


def channel_width(intermediate: int, sparsity: float, multiple: int = CHANNEL_MULTIPLE) -> int:
    """Channels each kept expert keeps at ``sparsity``: ``I - round(s I)``, rounded to the nearest
    multiple of ``multiple`` (at least one multiple; ``I`` itself when smaller)."""
    width = intermediate - int(round(sparsity * intermediate))
    if intermediate <= multiple:
        return max(width, 1)
    return min(intermediate, max(multiple, int(round(width / multiple)) * multiple))


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool [E]: the ``keep`` highest scores (ties broken by the lower index)."""
    order = torch.argsort(-scores.to(torch.float64), stable=True)
    flags = torch.zeros(scores.numel(), dtype=torch.bool)
    flags[order[:keep]] = True
    return flags


@dataclass
class ExpertMask:
    """Which routed experts of each MoE layer to keep, with provenance (like a PruningMask: a
    :class:`seap.maths.mask_formats.Mask`, applied by :func:`seap.model.expert_pruning.apply_expert_mask`)."""

    artifact: ClassVar[ArtifactKind] = EXPERT_MASK_ARTIFACT
    format: ClassVar[str] = EXPERT_MASK_ARTIFACT.format

    experts: dict[int, torch.Tensor]  # layer index -> bool [E], True = kept
    top_k: dict[int, int]  # the router's top-k after pruning, per layer
    meta: dict[str, Any] = field(default_factory=dict)
    channels: dict[int, torch.Tensor] | None = None  # unit both: layer -> bool [E, I], each kept expert's channels

    @property
    def base_fingerprint(self) -> str:
        return str(self.meta["base_fingerprint"])

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "?"))

    has_bias_compensation = False  # (what code handling both kinds of mask asks)
    is_reconstructed = False

    def kept_signature(self) -> tuple[tuple[int, int], ...]:
        """Per MoE layer (index, experts kept): masks with equal signatures run at the same speed."""
        return tuple((i, int(self.experts[i].sum())) for i in sorted(self.experts))

    def realised_sparsity(self) -> float:
        """The fraction of routed experts removed (every expert of a layer has the same size,
        and the meta's ``expert_params`` says how layers weigh)."""
        sizes = {int(k): v for k, v in (self.meta.get("expert_params") or {}).items()}
        total = sum(sizes.get(i, 1) * flags.numel() for i, flags in self.experts.items())
        kept = 0.0
        for i, flags in self.experts.items():
            share = 1.0  # of an expert's parameters kept (every channel holds the same number)
            if self.channels is not None:
                ch = self.channels[i][flags]
                share = float(ch.sum()) / max(ch.numel(), 1)
            kept += sizes.get(i, 1) * int(flags.sum()) * share
        return 1.0 - kept / total if total else 0.0

    def digest(self) -> str:
        h = hashlib.sha256(self.base_fingerprint.encode())
        for i in sorted(self.experts):
            h.update(f"{i}:{self.top_k[i]}:".encode())
            h.update(self.experts[i].to(torch.uint8).numpy().tobytes())
            if self.channels is not None:
                h.update(self.channels[i].to(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def check_model(self, fingerprint: str) -> None:
        """Refuse to apply this mask to a model with another fingerprint."""
        check_base_model("expert mask", self.task, self.base_fingerprint, fingerprint,
                         self.meta.get("base_source", "see experts.json"))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {f"layers.{i}.experts": flags.to(torch.uint8) for i, flags in self.experts.items()}
        for i, flags in (self.channels or {}).items():
            tensors[f"layers.{i}.channels"] = flags.to(torch.uint8)
        meta = {**self.meta, "top_k": {str(i): k for i, k in self.top_k.items()}, "mask_digest": self.digest(),
                "realised_sparsity": self.realised_sparsity()}
        return write_artifact(EXPERT_MASK_ARTIFACT, path, tensors, meta, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ExpertMask:
        """Read an expert-mask folder, verifying its checksums, digest and shapes."""
        t, meta = read_artifact(EXPERT_MASK_ARTIFACT, path)
        top_k = {int(i): int(k) for i, k in meta.pop("top_k").items()}
        experts = {i: require(t, f"layers.{i}.experts", EXPERT_MASK_ARTIFACT).bool() for i in top_k}
        channels = {i: t[f"layers.{i}.channels"].bool() for i in top_k if f"layers.{i}.channels" in t} or None
        mask = cls(experts, top_k, meta, channels)
        validate_expert_mask(mask)
        if meta.get("mask_digest") and meta["mask_digest"] != mask.digest():
            raise ArtifactError(f"expert mask {path} does not match its recorded digest", EXPERT_MASK_ARTIFACT.remake)
        return mask


def validate_expert_mask(mask: ExpertMask, num_experts: Mapping[int, int] | None = None) -> None:
    """Every layer keeps at least its top-k experts (and one); with ``num_experts`` (the
    model's), the flags have the model's shapes and cover exactly its MoE layers."""
    if num_experts is not None and set(num_experts) != set(mask.experts):
        raise ModelMismatchError(f"the expert mask covers MoE layers {sorted(mask.experts)}, the model has "
                                 f"{sorted(num_experts)}", "apply the expert mask to the model it was built from")
    for i, flags in mask.experts.items():
        if num_experts is not None and flags.numel() != num_experts[i]:
            raise ModelMismatchError(f"expert mask layer {i} has {flags.numel()} experts, the model "
                                     f"{num_experts[i]}", "apply the expert mask to the model it was built from")
        kept = int(flags.sum())
        if kept < 1 or mask.top_k.get(i, 0) < 1 or mask.top_k[i] > kept:
            raise ArtifactError(f"expert mask layer {i} keeps {kept} experts for a top-{mask.top_k.get(i)} router",
                                EXPERT_MASK_ARTIFACT.remake)
        if mask.channels is not None:
            ch = mask.channels.get(i)
            widths = set((ch[flags].sum(dim=1)).tolist()) if ch is not None and ch.shape[0] == flags.numel() else set()
            if ch is None or len(widths) != 1 or min(widths) < 1 or ch[~flags].any():
                raise ArtifactError(f"expert mask layer {i}: the kept experts must keep the same number (>= 1) of "
                                    "channels (fused expert tensors), the removed ones none", EXPERT_MASK_ARTIFACT.remake)


def channel_allocation(intermediate: Mapping[int, int], sparsity: float, schedule: str = "uniform",
                       weights: Mapping[int, int] | None = None, k: float = 1.0, x0: float = 0.3,
                       protect_first: int = 2, protect_last: int = 2) -> dict[int, int]:
    """Channels every expert of each MoE layer keeps for a target ``sparsity`` of their
    channels (the ``neurons`` unit of an MoE model). ``uniform``: every layer
    :func:`channel_width` at ``sparsity``. ``logistic``: SEAP's schedule over the MoE layers in
    depth order (the first ``protect_first`` and last ``protect_last`` layers whole, later
    layers pruned more), scaled by bisection so that the ``weights``-weighted share of channels
    removed (a layer's routed-expert parameters) comes closest to the target."""
    from seap.maths.schedules import logistic_shape

    if schedule not in EXPERT_SCHEDULES:
        raise SeapError(f"unknown expert schedule {schedule!r}", f"use one of: {', '.join(EXPERT_SCHEDULES)}")
    if not 0.0 <= sparsity < 1.0:
        raise SeapError(f"channel sparsity {sparsity} is outside [0, 1)", "pass a fraction such as 0.5")
    layers = sorted(intermediate)
    if schedule == "uniform":
        return {i: channel_width(intermediate[i], sparsity) for i in layers}
    weight = {i: (weights or {}).get(i, 1) for i in layers}
    total = sum(weight.values())
    shape = dict(zip(layers, logistic_shape(len(layers), k, x0, protect_first, protect_last)))

    def widths(lam: float) -> dict[int, int]:
        return {i: channel_width(intermediate[i], min(lam * shape[i], 1.0)) for i in layers}

    def removed(lam: float) -> float:
        return sum(weight[i] * (1 - w / intermediate[i]) for i, w in widths(lam).items()) / total

    return widths(_logistic_scale(removed, shape, sparsity, "channel",
                                  "protected layers, one block of channels kept per expert",
                                  "lower the sparsity, protect fewer layers, or use the uniform schedule"))


def build_expert_mask(stats: RouterStatistics, sparsity: float, score: str = DEFAULT_EXPERT_SCORE,
                      allow_k_reduction: bool = False, expert_params: Mapping[int, int] | None = None,
                      base_source: str | None = None, schedule: str = "uniform", unit: str = "experts",
                      **schedule_options: Any) -> ExpertMask:
    """Keep each MoE layer's highest-scoring experts (an expert mask of one task's statistics,
    or a general one of merged statistics), in the numbers :func:`expert_allocation` gives.

    ``unit="both"`` also prunes channels inside the kept experts: the sparsity is split evenly
    in what is kept (``1 - s = (1 - s_e)(1 - s_c)`` with ``s_e = s_c = 1 - sqrt(1 - s)``); the
    experts are chosen at ``s_e``, and every kept expert keeps its own :func:`channel_width`
    highest-scoring channels (:meth:`LayerRouterStatistics.channel_scores`; one count per layer,
    as the fused expert tensors need, a multiple of 8 for their grouped matmul).
    ``unit="neurons"`` keeps every expert and prunes only channels, ``sparsity`` of them, in
    the per-layer numbers :func:`channel_allocation` gives for the schedule."""
    if unit not in UNITS_OF_MOE:
        raise SeapError(f"unknown expert-mask unit {unit!r}", f"use one of: {', '.join(UNITS_OF_MOE)}")
    experts, top_k, layers = {}, {}, []
    channels: dict[int, torch.Tensor] | None = None if unit == "experts" else {}
    split = {"experts": sparsity, "both": 1.0 - math.sqrt(1.0 - sparsity), "neurons": 0.0}[unit]
    sizes = {int(i): int(v) for i, v in (expert_params or stats.meta.get("expert_params") or {}).items()}
    counts = expert_allocation({i: s.num_experts for i, s in stats.layers.items()}, stats.top_k, split, schedule,
                               sizes, allow_k_reduction, **schedule_options)
    intermediate = {i: int(s.channel_sum.shape[1]) for i, s in stats.layers.items() if s.has_channels}
    if channels is not None and len(intermediate) < len(stats.layers):
        raise SeapError(f"unit {unit} prunes channels inside experts, and these router statistics hold no channel "
                        "sums", "collect them with unit both or neurons")
    widths = {} if channels is None else \
        channel_allocation(intermediate, sparsity, schedule, {i: sizes.get(i, 1) * stats.layers[i].num_experts
                                                               for i in intermediate}, **schedule_options) \
        if unit == "neurons" else {i: channel_width(n, split) for i, n in intermediate.items()}
    for i, layer in sorted(stats.layers.items()):
        k = stats.top_k[i]
        keep = counts[i]
        experts[i] = keep_top(expert_scores(layer, score), keep)
        top_k[i] = min(k, keep)
        if channels is not None:
            channels[i] = torch.stack([keep_top(row, widths[i]) for row in layer.channel_scores()]) & experts[i][:, None]
        if top_k[i] < k:
            warnings.warn(f"layer {i}: {keep} experts kept, so each token is routed to {keep} instead of {k}",
                          stacklevel=2)
        layers.append({"layer": i, "experts": layer.num_experts, "kept": keep, "top_k": top_k[i], "original_top_k": k,
                       **({"channels": widths[i], "intermediate": intermediate[i]} if channels is not None else {})})
    meta = {
        "seap_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_fingerprint": stats.fingerprint,
        "base_source": base_source or stats.meta.get("model_source"),
        "task": stats.task,
        "kind": "general" if "+" in stats.task else "expert",
        "unit": unit,
        "score": score,
        **({"channel_score": CHANNEL_SCORE} if channels is not None else {}),
        "schedule": schedule,
        "schedule_params": dict(schedule_options),
        "target_sparsity": sparsity,
        "allow_k_reduction": allow_k_reduction,
        "expert_params": {str(i): v for i, v in sizes.items()},
        "layers": layers,
    }
    meta["pattern"] = pattern_vector(stats).tolist()  # what retrieval (TAER) compares a query's prefix with
    mask = ExpertMask(experts, top_k, meta, channels)
    validate_expert_mask(mask)
    return mask


def nearest_pattern(query: torch.Tensor, patterns: Mapping[str, torch.Tensor]) -> tuple[str, float, dict[str, float]]:
    """TAER's retrieval: the stored task whose pattern is nearest (L2, as PreMoe's flat index) to
    ``query``. Returns the task, a confidence in [0, 1] (``1 - d_best / d_second``: 0 when the
    two nearest tasks are equally near, 1 on an exact match; 1 with one stored task) and every
    distance."""
    if not patterns:
        raise SeapError("no stored expert patterns to retrieve from", "build at least one task's expert mask")
    names = list(patterns)
    dist = torch.stack([torch.linalg.vector_norm(query.to(torch.float64) - patterns[n].to(torch.float64))
                        for n in names])
    order = torch.argsort(dist)
    best = int(order[0])
    if len(names) == 1:
        confidence = 1.0
    else:  # the margin to the runner-up: 0 on a tie, 1 on an exact match (free of the distances' scale)
        second = float(dist[order[1]])
        confidence = 1.0 - float(dist[best]) / second if second > 0 else 0.0
    return names[best], confidence, {n: float(d) for n, d in zip(names, dist)}


def pattern_vector(stats: RouterStatistics, layers: Sequence[int] | None = None) -> torch.Tensor:
    """A task's (or query's) routing pattern: the router's mean probability of every expert of
    the given MoE layers, concatenated; by default the first MoE layer only, as PreMoe (whose
    index holds the first MoE layer's TCESS vector). The mean probability is the smoother signal
    on a short query: every token votes for every expert, not only for its top-1."""
    chosen = [min(stats.layers)] if layers is None else list(layers)
    return torch.cat([stats.layers[i].prob_sum / max(stats.layers[i].tokens, 1) for i in chosen])


__all__ = ["CHANNEL_SCORE", "DEFAULT_EXPERT_SCORE", "EXPERT_MASK_ARTIFACT", "EXPERT_SCHEDULES", "EXPERT_SCORES",
           "ROUTER_STATISTICS_ARTIFACT", "UNITS_OF_MOE", "ExpertMask", "LayerRouterStatistics", "RouterStatistics",
           "build_expert_mask", "channel_allocation", "channel_width", "expert_allocation", "expert_scores", "keep_top",
           "kept_count", "nearest_pattern", "pattern_vector", "route", "router_sums",
           "validate_expert_mask"]
