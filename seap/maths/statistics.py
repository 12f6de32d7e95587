"""Activation statistics as data: per-layer moments of one task's corpus on one model.

:class:`ActivationStatistics` holds, for every decoder layer, the moments of the input of
the attention output projection (the concatenated head outputs) and of the MLP down
projection, the column norms of both projections and the model geometry, so scores and
masks can be computed from it alone. It is a versioned artifact (``stats.safetensors`` +
``stats.json``). :func:`merge_statistics` merges shards exactly. Collecting them from a
model is :func:`seap.model.calibration.collect_statistics`.

Second moments (what reconstruction needs: a ``width x width`` matrix per layer input) are
not part of it: a refit builds them for one layer at a time while it streams the model
(:mod:`seap.model.refitting`), uses them at once and frees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seap.artifacts import ArtifactKind, read_artifact, require, write_artifact
from seap.errors import ModelMismatchError, SeapError
from seap.maths.geometry import ModelGeometry
from seap.maths.moments import ChannelMoments

STATS_ARTIFACT = ArtifactKind("seap-activation-statistics", 1, "stats.safetensors", "stats.json", "re-run `seap stats`")
MODULES = ("attn", "mlp")  # attn: input of o_proj; mlp: input of down_proj


@dataclass
class WeightColumnNorms:
    """Column statistics of a weight W [out, in]: squared L2 and L1 norms per input column."""

    sq_l2: torch.Tensor
    l1: torch.Tensor
    out_features: int

    @classmethod
    def of(cls, weight: torch.Tensor) -> WeightColumnNorms:
        w = weight.detach().to(torch.float64)
        return cls((w * w).sum(dim=0).cpu(), w.abs().sum(dim=0).cpu(), int(w.shape[0]))


@dataclass
class LayerStatistics:
    """One decoder layer: moments of the ``o_proj`` input (``attn``) and the ``down_proj``
    input (``mlp``), and both projections' column norms."""

    attn: ChannelMoments
    mlp: ChannelMoments
    o_proj: WeightColumnNorms
    down_proj: WeightColumnNorms


@dataclass
class ActivationStatistics:
    """Per-layer activation moments of one task's corpus on one model."""

    layers: list[LayerStatistics]
    geometry: ModelGeometry
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.meta["model_fingerprint"])

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def num_tokens(self) -> int:
        return self.layers[0].attn.count if self.layers else 0

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``stats.safetensors`` + ``stats.json`` into the folder ``path`` atomically."""
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for module in MODULES:
                m: ChannelMoments = getattr(layer, module)
                prefix = f"layers.{i}.{module}"
                tensors[f"{prefix}.count"] = torch.tensor([m.count], dtype=torch.int64)
                tensors[f"{prefix}.mean"] = m.mean
                tensors[f"{prefix}.m2"] = m.m2
                tensors[f"{prefix}.mean_sq"] = m.mean_sq
            for proj in ("o_proj", "down_proj"):
                norms: WeightColumnNorms = getattr(layer, proj)
                tensors[f"layers.{i}.{proj}.sq_l2"] = norms.sq_l2
                tensors[f"layers.{i}.{proj}.l1"] = norms.l1
                tensors[f"layers.{i}.{proj}.out_features"] = torch.tensor([norms.out_features], dtype=torch.int64)
        meta = {**self.meta, "geometry": self.geometry.to_dict(), "num_tokens": self.num_tokens}
        meta.pop("sidecars", None)
        return write_artifact(STATS_ARTIFACT, path, tensors, meta, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStatistics:
        """Read and verify a statistics folder (checksum, format version, completeness)."""
        t, meta = read_artifact(STATS_ARTIFACT, path)
        geometry = ModelGeometry.from_dict(meta.pop("geometry"))
        meta.pop("num_tokens", None)
        meta.pop("sidecars", None)  # (second moments of statistics written before refits streamed: not read)

        def get(key: str) -> torch.Tensor:
            return require(t, key, STATS_ARTIFACT)

        layers = []
        for i in range(geometry.num_layers):
            moments = {
                module: ChannelMoments(int(get(f"layers.{i}.{module}.count")[0]), get(f"layers.{i}.{module}.mean"),
                                       get(f"layers.{i}.{module}.m2"), get(f"layers.{i}.{module}.mean_sq"))
                for module in MODULES
            }
            norms = {
                proj: WeightColumnNorms(get(f"layers.{i}.{proj}.sq_l2"), get(f"layers.{i}.{proj}.l1"),
                                        int(get(f"layers.{i}.{proj}.out_features")[0]))
                for proj in ("o_proj", "down_proj")
            }
            layers.append(LayerStatistics(moments["attn"], moments["mlp"], norms["o_proj"], norms["down_proj"]))
        return cls(layers, geometry, meta)


def merge_statistics(parts: Sequence[ActivationStatistics], task: str | None = None) -> ActivationStatistics:
    """Merge statistics of disjoint shards of a corpus; equal to one pass over all of it.

    All parts must come from the same model (fingerprint). Parts of different tasks are
    refused unless ``task`` names the merged result.
    """
    if not parts:
        raise SeapError("no statistics to merge", "pass at least one statistics folder")
    fingerprints = {p.fingerprint for p in parts}
    if len(fingerprints) > 1:
        raise ModelMismatchError(
            f"statistics come from different models: {sorted(fingerprints)}",
            "merge only shards computed on the same base model",
        )
    tasks = {p.task for p in parts}
    if len(tasks) > 1 and task is None:
        raise SeapError(f"statistics of different tasks {sorted(tasks)}", "pass --task to name the merged result")
    layers = []
    for i in range(parts[0].geometry.num_layers):
        attn = parts[0].layers[i].attn
        mlp = parts[0].layers[i].mlp
        for p in parts[1:]:
            attn = attn.merge(p.layers[i].attn)
            mlp = mlp.merge(p.layers[i].mlp)
        first = parts[0].layers[i]
        layers.append(LayerStatistics(attn, mlp, first.o_proj, first.down_proj))
    meta = dict(parts[0].meta)
    meta["task"] = task or parts[0].task
    meta["num_texts"] = sum(int(p.meta.get("num_texts", 0)) for p in parts)
    meta["merged_from"] = [{k: p.meta.get(k) for k in ("shard", "corpus_digest", "num_texts")} for p in parts]
    meta.pop("shard", None)
    meta["corpus_digest"] = _merged_digest([str(p.meta.get("corpus_digest")) for p in parts])
    return ActivationStatistics(layers, parts[0].geometry, meta)


def _merged_digest(digests: Sequence[str]) -> str:
    unique = sorted(set(digests))
    return unique[0] if len(unique) == 1 else "merged:" + ",".join(unique)
