"""Activation statistics as data: per-layer moments of one task's corpus on one model.

:class:`ActivationStatistics` holds, for every decoder layer, the moments of the input of
the attention output projection (the concatenated head outputs) and of the MLP down
projection, the column norms of both projections and the model geometry, so scores and
masks can be computed from it alone. It is a versioned artifact (``stats.safetensors`` +
``stats.json``). :func:`merge_statistics` merges shards exactly. Collecting them from a
model is :func:`seap.model.calibration.collect_statistics`.

Second moments (what reconstruction needs: a ``width x width`` float64 matrix per layer
input, 1.1 GB per layer for a 7B model) are kept per layer in sidecar files
(``parts/layer-NNNN.safetensors``), read one layer at a time (:meth:`LayerStatistics.seconds`).
Where all layers would not fit in ``budget`` bytes, collecting and merging write each
finished layer to a spill folder at once (:class:`StoredSeconds`) instead of holding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seap.artifacts import ArtifactKind, SidecarRef, read_artifact, read_sidecar, require, sidecar_refs, write_artifact
from seap.errors import ModelMismatchError, SeapError
from seap.maths.geometry import ModelGeometry
from seap.maths.moments import ChannelMoments, SecondMoments

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


DEFAULT_SECOND_MOMENT_BUDGET = 4 * 2**30  # bytes of second moments held in memory (or on the device) at once


def second_moment_bytes(geometry: ModelGeometry, itemsize: int = 8) -> int:
    """Bytes of every layer's second-moment matrices (both inputs) at ``itemsize``."""
    return sum(((layer.num_heads * layer.head_dim) ** 2 + layer.intermediate_size ** 2) * itemsize
               for layer in geometry.layers)


def seconds_tensors(attn: SecondMoments, mlp: SecondMoments) -> dict[str, torch.Tensor]:
    """One layer's second moments as the tensors of its sidecar file."""
    out = {}
    for module, second in zip(MODULES, (attn, mlp), strict=True):
        out[f"{module}.count"] = torch.tensor([second.count], dtype=torch.int64)
        out[f"{module}.gram"] = second.gram
        out[f"{module}.total"] = second.total
    return out


@dataclass(frozen=True)
class StoredSeconds:
    """One layer's second moments kept in a safetensors file, read (and verified) on access."""

    ref: SidecarRef

    def load(self) -> tuple[SecondMoments, SecondMoments]:
        t = read_sidecar(self.ref)
        return tuple(SecondMoments(int(require(t, f"{m}.count", STATS_ARTIFACT)[0]),  # type: ignore[return-value]
                                   require(t, f"{m}.gram", STATS_ARTIFACT), require(t, f"{m}.total", STATS_ARTIFACT))
                     for m in MODULES)

    @classmethod
    def write(cls, attn: SecondMoments, mlp: SecondMoments, file: Path) -> StoredSeconds:
        """Spill a layer's second moments to ``file`` (a private temporary file)."""
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in seconds_tensors(attn, mlp).items()}, str(file))
        return cls(SidecarRef(file, None, STATS_ARTIFACT))


@dataclass
class LayerStatistics:
    """One decoder layer: moments of the ``o_proj`` input (``attn``) and the ``down_proj``
    input (``mlp``), both projections' column norms, and (collected only when reconstruction
    asks for them) the second moments of both inputs, in memory or in a file (``stored``)."""

    attn: ChannelMoments
    mlp: ChannelMoments
    o_proj: WeightColumnNorms
    down_proj: WeightColumnNorms
    attn_second: SecondMoments | None = None
    mlp_second: SecondMoments | None = None
    stored: StoredSeconds | None = None

    @property
    def has_seconds(self) -> bool:
        return self.stored is not None or (self.attn_second is not None and self.mlp_second is not None)

    def seconds(self) -> tuple[SecondMoments, SecondMoments] | None:
        """The second moments of both inputs (``attn``, ``mlp``), read from file if stored there."""
        if self.stored is not None:
            return self.stored.load()
        if self.attn_second is None or self.mlp_second is None:
            return None
        return self.attn_second, self.mlp_second

    def second(self, module: str) -> SecondMoments | None:
        """The second moments of ``module`` (``"attn"`` or ``"mlp"``), if collected."""
        both = self.seconds()
        return None if both is None else both[MODULES.index(module)]


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

    @property
    def has_second_moments(self) -> bool:
        """Whether every layer carries the second moments reconstruction needs."""
        return bool(self.layers) and all(layer.has_seconds for layer in self.layers)

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
        sidecars: dict[str, Any] = {}
        for i, layer in enumerate(self.layers):
            if layer.stored is not None:
                sidecars[_layer_part(i)] = layer.stored.ref.file  # linked or copied, never read
            elif layer.attn_second is not None and layer.mlp_second is not None:
                a, b = layer.attn_second, layer.mlp_second
                sidecars[_layer_part(i)] = lambda a=a, b=b: seconds_tensors(a, b)
        return write_artifact(STATS_ARTIFACT, path, tensors, meta, overwrite, sidecars)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStatistics:
        """Read and verify a statistics folder (checksum, format version, completeness)."""
        t, meta = read_artifact(STATS_ARTIFACT, path)
        geometry = ModelGeometry.from_dict(meta.pop("geometry"))
        meta.pop("num_tokens", None)
        refs = sidecar_refs(STATS_ARTIFACT, path, meta.pop("sidecars", None))

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
            # (statistics written before the sidecars held their second moments in stats.safetensors)
            second = {module: SecondMoments(moments[module].count, t[f"layers.{i}.{module}.gram"],
                                            t[f"layers.{i}.{module}.total"])
                      if f"layers.{i}.{module}.gram" in t else None for module in MODULES}
            ref = refs.get(_layer_part(i))
            layers.append(LayerStatistics(moments["attn"], moments["mlp"], norms["o_proj"], norms["down_proj"],
                                          second["attn"], second["mlp"], StoredSeconds(ref) if ref else None))
        return cls(layers, geometry, meta)


def _layer_part(index: int) -> str:
    return f"layer-{index:04d}"


def merge_statistics(parts: Sequence[ActivationStatistics], task: str | None = None,
                     spill_dir: str | Path | None = None,
                     budget: int = DEFAULT_SECOND_MOMENT_BUDGET) -> ActivationStatistics:
    """Merge statistics of disjoint shards of a corpus; equal to one pass over all of it.

    All parts must come from the same model (fingerprint). Parts of different tasks are
    refused unless ``task`` names the merged result. Second moments are merged one layer at a
    time, and written to ``spill_dir`` as they are merged when all layers' would exceed
    ``budget`` bytes (save the result before removing that folder).
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
    spill = spill_dir is not None and second_moment_bytes(parts[0].geometry) > budget
    for i in range(parts[0].geometry.num_layers):
        attn = parts[0].layers[i].attn
        mlp = parts[0].layers[i].mlp
        for p in parts[1:]:
            attn = attn.merge(p.layers[i].attn)
            mlp = mlp.merge(p.layers[i].mlp)
        first = parts[0].layers[i]
        layer = LayerStatistics(attn, mlp, first.o_proj, first.down_proj)
        if all(p.layers[i].has_seconds for p in parts):  # kept only when every shard has them
            a, b = parts[0].layers[i].seconds()  # type: ignore[misc]
            for p in parts[1:]:
                pa, pb = p.layers[i].seconds()  # type: ignore[misc]
                a, b = a.merge(pa), b.merge(pb)
            if spill:
                layer.stored = StoredSeconds.write(a, b, Path(spill_dir) / f"{_layer_part(i)}.safetensors")  # type: ignore[arg-type]
            else:
                layer.attn_second, layer.mlp_second = a, b
        layers.append(layer)
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
