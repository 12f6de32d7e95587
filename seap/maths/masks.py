"""Pruning masks: small, versioned artifacts tied to the fingerprint of their base model.

A mask says, for each decoder layer, which query heads, key/value heads and MLP channels
are kept. On disk it is a folder (like a PEFT adapter) with

* ``mask.safetensors``: ``layers.{i}.heads`` [H], ``layers.{i}.kv_heads`` [KV] and
  ``layers.{i}.channels`` [I] as uint8 keep-flags, and, when the mask carries FLAP bias
  compensation, ``layers.{i}.attn_mean`` / ``layers.{i}.mlp_mean`` (calibration means);
  a *reconstructed* mask also carries the refitted weights of the kept input columns of
  ``o_proj`` and ``down_proj`` (``layers.{i}.o_weight`` [hidden, kept heads x head_dim],
  ``layers.{i}.down_weight`` [hidden, kept channels], and ``o_bias`` / ``down_bias`` when the
  refit has a bias term), see :mod:`seap.maths.reconstruction`;
* ``mask.json``: the base model fingerprint, task, score, schedule and its parameters,
  target and realised sparsity overall and per layer, and the checksum of the tensors.

The pruned model is always derived from base model + mask (:mod:`seap.model.surgery`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from seap import __version__
from seap.artifacts import ArtifactKind, read_artifact, require, write_artifact
from seap.maths.statistics import ActivationStatistics
from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.maths.geometry import DEFAULT_GQA_MODE, ModelGeometry, attention_units
from seap.io import short_hash
from seap.maths.schedules import Allocation, allocate
from seap.maths.scores import ImportanceScores
from seap.tensor_files import Storable, stored, subset

MASK_ARTIFACT = ArtifactKind("seap-mask", 1, "mask.safetensors", "mask.json", "rebuild the mask with `seap masks`")


@dataclass
class LayerMask:
    heads: torch.Tensor  # bool [num_heads], True = kept
    kv_heads: torch.Tensor  # bool [num_kv_heads]
    channels: torch.Tensor  # bool [intermediate_size]
    attn_mean: torch.Tensor | None = None  # [num_heads * head_dim], for bias compensation
    mlp_mean: torch.Tensor | None = None  # [intermediate_size]
    # o_weight, down_weight (+ o_bias, down_bias): reconstruction; a mapping read lazily when loaded from a file
    refit: Mapping[str, torch.Tensor] | None = None


REFIT_TENSORS = ("o_weight", "down_weight", "o_bias", "down_bias")


@dataclass
class PruningMask:
    """Which heads and channels of a base model to keep, with provenance (a
    :class:`seap.maths.mask_formats.Mask`, applied by :mod:`seap.model.surgery`)."""

    artifact: ClassVar[ArtifactKind] = MASK_ARTIFACT
    format: ClassVar[str] = MASK_ARTIFACT.format

    layers: list[LayerMask]
    geometry: ModelGeometry  # of the base model
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_fingerprint(self) -> str:
        return str(self.meta["base_fingerprint"])

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "?"))

    @property
    def has_bias_compensation(self) -> bool:
        return all(layer.attn_mean is not None and layer.mlp_mean is not None for layer in self.layers)

    @property
    def is_reconstructed(self) -> bool:
        """Whether the mask carries refitted ``o_proj`` / ``down_proj`` weights (every layer)."""
        return bool(self.layers) and all(layer.refit is not None for layer in self.layers)

    def kept_geometry(self) -> ModelGeometry:
        from seap.maths.geometry import LayerGeometry

        return ModelGeometry(self.geometry.hidden_size, tuple(
            LayerGeometry(int(m.heads.sum()), int(m.kv_heads.sum()), g.head_dim, int(m.channels.sum()))
            for m, g in zip(self.layers, self.geometry.layers, strict=True)
        ))

    def realised_sparsity(self) -> float:
        kept = self.kept_geometry().total_params()
        return 1.0 - kept / self.geometry.total_params()

    def keep_all(self) -> PruningMask:
        """The mask of the same base and task that keeps every head and channel (sparsity 0: the
        dense model), without calibration means or refits: what an expert becomes when no
        sparsity keeps within its accuracy budget."""
        layers = [LayerMask(torch.ones_like(m.heads), torch.ones_like(m.kv_heads), torch.ones_like(m.channels))
                  for m in self.layers]
        meta = {k: v for k, v in self.meta.items() if k not in ("reconstruction", "target_sparsity")}
        return PruningMask(layers, self.geometry, {**meta, "target_sparsity": 0.0})

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(self.base_fingerprint.encode())
        for layer in self.layers:
            for t in (layer.heads, layer.kv_heads, layer.channels):
                h.update(t.to(torch.uint8).numpy().tobytes())
            for name in REFIT_TENSORS if layer.refit is not None else ():  # a refitted expert is another model
                if name in layer.refit:
                    h.update(name.encode())
                    h.update(layer.refit[name].detach().to(torch.float32).contiguous().numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def check_model(self, fingerprint: str) -> None:
        """Refuse to apply this mask to a model with another fingerprint."""
        check_base_model("mask", self.task, self.base_fingerprint, fingerprint,
                         self.meta.get("base_source", "see mask.json"))

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors: dict[str, Storable] = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.heads"] = layer.heads.to(torch.uint8)
            tensors[f"layers.{i}.kv_heads"] = layer.kv_heads.to(torch.uint8)
            tensors[f"layers.{i}.channels"] = layer.channels.to(torch.uint8)
            if layer.attn_mean is not None and layer.mlp_mean is not None:
                tensors[f"layers.{i}.attn_mean"] = layer.attn_mean.to(torch.float32)
                tensors[f"layers.{i}.mlp_mean"] = layer.mlp_mean.to(torch.float32)
            for name in layer.refit or {}:  # (refitted weights still in a file are copied unread)
                tensors[f"layers.{i}.{name}"] = stored(layer.refit, name)  # type: ignore[arg-type]
        meta = {**self.meta, "geometry": self.geometry.to_dict(), "mask_digest": self.digest(),
                "bias_compensation": self.has_bias_compensation}
        return write_artifact(MASK_ARTIFACT, path, tensors, meta, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> PruningMask:
        """Read a mask folder, verifying its checksum, digest and GQA layout. Refitted weights stay
        in the file (a :class:`~seap.tensor_files.LazyTensors` per layer), read when used: a
        reconstructed mask is as large as a third of its model."""
        t, meta = read_artifact(MASK_ARTIFACT, path, lazy=True)
        geometry = ModelGeometry.from_dict(meta.pop("geometry"))
        layers = [
            LayerMask(*(require(t, f"layers.{i}.{name}", MASK_ARTIFACT).bool() for name in ("heads", "kv_heads", "channels")),
                      t.get(f"layers.{i}.attn_mean"), t.get(f"layers.{i}.mlp_mean"),
                      subset(t, f"layers.{i}.", list(REFIT_TENSORS)) or None)
            for i in range(geometry.num_layers)
        ]
        mask = cls(layers, geometry, meta)
        validate_mask(mask)
        if meta.get("mask_digest") and meta["mask_digest"] != mask.digest():
            raise ArtifactError(f"mask {path} does not match its recorded digest", MASK_ARTIFACT.remake)
        return mask


def check_base_model(what: str, task: str, base_fingerprint: str, fingerprint: str, base_source: str) -> None:
    """Refuse a ``what`` (a mask, an expert mask) built on ``base_fingerprint`` for a model with
    another ``fingerprint``, naming where it was built (``base_source``)."""
    if fingerprint != base_fingerprint:
        raise ModelMismatchError(
            f"{what} for task {task!r} was built for base model {short_hash(base_fingerprint)}, "
            f"but the given model is {short_hash(fingerprint)}",
            f"apply it to the model it was built from ({base_source}), or rebuild the {what} on this model",
        )


def validate_mask(mask: PruningMask) -> None:
    """Check shapes and that every layer stays a valid (GQA) attention layer."""
    if len(mask.layers) != mask.geometry.num_layers:
        raise ArtifactError(f"mask has {len(mask.layers)} layers, its geometry {mask.geometry.num_layers}", "rebuild the mask")
    for i, (m, g) in enumerate(zip(mask.layers, mask.geometry.layers, strict=True)):
        if m.heads.numel() != g.num_heads or m.kv_heads.numel() != g.num_kv_heads or m.channels.numel() != g.intermediate_size:
            raise ArtifactError(f"mask layer {i} has shapes that do not match its geometry", "rebuild the mask")
        if not m.heads.any() or not m.kv_heads.any() or not m.channels.any():
            raise ArtifactError(f"mask layer {i} removes a whole attention or MLP block", "rebuild the mask")
        if m.refit is not None:
            _check_refit(i, m, g, mask.geometry.hidden_size)
        per_group = m.heads.reshape(g.num_kv_heads, g.group_size).sum(dim=1)
        kept_groups = per_group[m.kv_heads]
        if (per_group[~m.kv_heads] != 0).any() or (kept_groups != kept_groups[0]).any():
            raise ArtifactError(
                f"mask layer {i} is not a valid GQA layout (kept query heads per key/value group: {per_group.tolist()})",
                "rebuild the mask",
            )


def _check_refit(i: int, m: LayerMask, g: Any, hidden: int) -> None:
    """Refitted weights must match the kept widths of their layer (else the file is corrupt)."""
    kept_attn = int(m.heads.sum()) * g.head_dim
    kept_mlp = int(m.channels.sum())
    expected = {"o_weight": (hidden, kept_attn), "down_weight": (hidden, kept_mlp), "o_bias": (hidden,),
                "down_bias": (hidden,)}
    refit = m.refit or {}
    missing = {"o_weight", "down_weight"} - set(refit)
    if missing:
        raise ArtifactError(f"mask layer {i}: refitted weights {sorted(missing)} are missing", "rebuild the mask")
    for name, t in refit.items():
        if name not in expected or tuple(t.shape) != expected[name]:
            raise ArtifactError(
                f"mask layer {i}: refitted {name} has shape {tuple(t.shape)}, the mask keeps {expected.get(name)}",
                "rebuild the reconstructed mask from the same mask and statistics")
        if not torch.isfinite(t).all():
            raise ArtifactError(f"mask layer {i}: refitted {name} holds NaN or infinite values", "rebuild the mask")


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool keep-mask that removes the ``n`` lowest scores (ties broken by index)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n > 0:
        order = torch.argsort(scores.to(torch.float64), stable=True)
        keep[order[:n]] = False
    return keep


def select_units(scores: ImportanceScores, allocation: Allocation) -> list[LayerMask]:
    """Per layer, drop the lowest-scoring units in the numbers the allocation gives."""
    layers = []
    for i, (layer_scores, alloc) in enumerate(zip(scores.layers, allocation.layers, strict=True)):
        geo = scores.geometry.layers[i]
        units = attention_units(scores.geometry, i, allocation.gqa_mode)
        heads = layer_scores.heads
        if units.kind == "heads":
            head_keep = _lowest(heads, alloc.attn_pruned)
            kv_keep = head_keep.clone()
        elif units.kind == "kv-groups":
            kv_keep = _lowest(heads.reshape(geo.num_kv_heads, geo.group_size).sum(dim=1), alloc.attn_pruned)
            head_keep = kv_keep.repeat_interleave(geo.group_size)
        else:  # query-heads: the same number of lowest heads inside every group
            grouped = heads.reshape(geo.num_kv_heads, geo.group_size)
            head_keep = torch.stack([_lowest(row, alloc.attn_pruned) for row in grouped]).reshape(-1)
            kv_keep = torch.ones(geo.num_kv_heads, dtype=torch.bool)
        layers.append(LayerMask(head_keep, kv_keep, _lowest(layer_scores.channels, alloc.mlp_pruned)))
    return layers


def build_mask(
    scores: ImportanceScores,
    sparsity: float,
    schedule: str = "logistic",
    gqa_mode: str = DEFAULT_GQA_MODE,
    bias_compensation_stats: ActivationStatistics | None = None,
    base_source: str | None = None,
    **schedule_options: Any,
) -> PruningMask:
    """Allocate sparsity per layer and keep the highest-scoring units: an expert (one task's
    scores) or general (combined scores, :func:`seap.maths.scores.combine_scores`) mask.

    ``bias_compensation_stats`` stores the calibration means of that task in the mask so
    that applying it can add FLAP's bias compensation.
    """
    allocation = allocate(schedule, scores.geometry, sparsity, gqa_mode, scores=scores, **schedule_options)
    layers = select_units(scores, allocation)
    if bias_compensation_stats is not None:
        if bias_compensation_stats.fingerprint != scores.fingerprint:
            raise ModelMismatchError("bias-compensation statistics come from another model", "use the mask's own statistics")
        for layer, st in zip(layers, bias_compensation_stats.layers, strict=True):
            layer.attn_mean = st.attn.mean.to(torch.float32)
            layer.mlp_mean = st.mlp.mean.to(torch.float32)
    meta = {
        "seap_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_fingerprint": scores.fingerprint,
        "base_source": base_source or scores.meta.get("model_source"),
        "task": scores.task,
        "tasks": scores.meta.get("tasks"),
        "kind": "general" if len(scores.meta.get("tasks") or {}) > 1 else "expert",
        "score": scores.score,
        "head_aggregation": scores.meta.get("head_aggregation"),
        "schedule": allocation.schedule,
        "schedule_params": allocation.params,
        "gqa_mode": gqa_mode,
        "target_sparsity": allocation.target,
        "realised_sparsity": allocation.realised,
        "corpus_digest": scores.meta.get("corpus_digest"),
        "layers": [
            {"ratio": a.ratio, "attn_units_pruned": a.attn_pruned, "mlp_channels_pruned": a.mlp_pruned, "realised": a.realised}
            for a in allocation.layers
        ],
    }
    mask = PruningMask(layers, scores.geometry, meta)
    validate_mask(mask)
    if abs(mask.realised_sparsity() - allocation.realised) > 1e-9:
        raise SeapError("internal error: mask and allocation disagree on the realised sparsity", "report this as a bug")
    return mask


def full_mask(geometry: ModelGeometry, fingerprint: str) -> PruningMask:
    """A mask that keeps everything (the dense model)."""
    layers = [LayerMask(torch.ones(g.num_heads, dtype=torch.bool), torch.ones(g.num_kv_heads, dtype=torch.bool),
                        torch.ones(g.intermediate_size, dtype=torch.bool)) for g in geometry.layers]
    return PruningMask(layers, geometry, {"base_fingerprint": fingerprint, "task": "dense", "target_sparsity": 0.0,
                                          "realised_sparsity": 0.0})


__all__ = ["REFIT_TENSORS", "LayerMask", "PruningMask", "build_mask", "check_base_model", "full_mask", "select_units", "validate_mask"]
