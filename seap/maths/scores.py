"""Importance scores of attention heads and MLP channels (pure functions on statistics).

Each score multiplies an activation statistic of an input channel j of ``o_proj`` /
``down_proj`` by a norm of the matching weight column W[:, j] (see the method notes §4):

============== ========================= ============================= =====================
name           activation factor          weight factor                 head aggregation
============== ========================= ============================= =====================
seap-sf        variance                   squared L2 norm               sum   (paper s_F = code WIFV; default)
seap-sw-paper  mean of squares q          L1 norm                       sum   (paper eq. 12)
seap-sw-code   sqrt(q)                    squared L2 norm               mean  (SEAP code WIFN)
wanda-sp       sqrt(q) (prop. to ||X_j||) mean |W| over rows (L1 / A)   sum   (FLAP repo's Wanda-sp)
flap           variance                   squared L2 norm               squared per channel, then sum (FLAP WIFV)
============== ========================= ============================= =====================

Scores are returned per channel for attention (``attn_channels``, the o_proj input
channels after any FLAP squaring), per head (``heads``), and per MLP channel (``channels``).
Rankings within a layer are all the engine uses, except the FLAP adaptive schedule, which
standardises per layer, and the general mask, which sums raw scores across tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seap.artifacts import ArtifactKind, read_artifact, require, write_artifact
from seap.maths.statistics import ActivationStatistics, WeightColumnNorms
from seap.errors import ModelMismatchError, SeapError
from seap.maths.geometry import ModelGeometry
from seap.maths.moments import ChannelMoments

SCORES_ARTIFACT = ArtifactKind("seap-importance-scores", 1, "scores.safetensors", "scores.json", "re-run `seap scores`")


@dataclass(frozen=True)
class ScoreDefinition:
    name: str
    description: str
    channel_score: Callable[[ChannelMoments, WeightColumnNorms], torch.Tensor]
    head_aggregation: str  # "sum", "mean" or "square-sum"


def _var_sq_l2(m: ChannelMoments, w: WeightColumnNorms) -> torch.Tensor:
    return m.variance.to(torch.float64) * w.sq_l2.to(torch.float64)


def _q_l1(m: ChannelMoments, w: WeightColumnNorms) -> torch.Tensor:
    return m.mean_sq.to(torch.float64) * w.l1.to(torch.float64)


def _rms_sq_l2(m: ChannelMoments, w: WeightColumnNorms) -> torch.Tensor:
    return m.mean_sq.to(torch.float64).sqrt() * w.sq_l2.to(torch.float64)


def _rms_mean_abs(m: ChannelMoments, w: WeightColumnNorms) -> torch.Tensor:
    return m.mean_sq.to(torch.float64).sqrt() * (w.l1.to(torch.float64) / w.out_features)


SCORES: dict[str, ScoreDefinition] = {
    d.name: d
    for d in (
        ScoreDefinition("seap-sf", "variance x squared column L2 norm (paper s_F, code WIFV)", _var_sq_l2, "sum"),
        ScoreDefinition("seap-sw-paper", "mean of squares x column L1 norm (paper s_W, eq. 12)", _q_l1, "sum"),
        ScoreDefinition("seap-sw-code", "RMS x squared column L2 norm (SEAP code WIFN)", _rms_sq_l2, "mean"),
        ScoreDefinition("wanda-sp", "RMS x mean |W| of the column (Wanda-sp, FLAP repo)", _rms_mean_abs, "sum"),
        ScoreDefinition("flap", "variance x squared L2 norm, attention squared (FLAP WIFV)", _var_sq_l2, "square-sum"),
    )
}
DEFAULT_SCORE = "seap-sf"


def get_score(name: str) -> ScoreDefinition:
    if name not in SCORES:
        raise SeapError(f"unknown score {name!r}", f"use one of: {', '.join(SCORES)}")
    return SCORES[name]


@dataclass
class LayerScores:
    attn_channels: torch.Tensor  # [num_heads * head_dim]
    heads: torch.Tensor  # [num_heads]
    channels: torch.Tensor  # [intermediate_size]


@dataclass
class ImportanceScores:
    """Scores of every head and MLP channel of a model for one task (or a weighted mix)."""

    layers: list[LayerScores]
    geometry: ModelGeometry
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.meta["model_fingerprint"])

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def score(self) -> str:
        return str(self.meta["score"])

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.attn_channels"] = layer.attn_channels
            tensors[f"layers.{i}.heads"] = layer.heads
            tensors[f"layers.{i}.channels"] = layer.channels
        return write_artifact(SCORES_ARTIFACT, path, tensors, {**self.meta, "geometry": self.geometry.to_dict()}, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ImportanceScores:
        t, meta = read_artifact(SCORES_ARTIFACT, path)
        geometry = ModelGeometry.from_dict(meta.pop("geometry"))
        layers = [
            LayerScores(*(require(t, f"layers.{i}.{name}", SCORES_ARTIFACT) for name in ("attn_channels", "heads", "channels")))
            for i in range(geometry.num_layers)
        ]
        return cls(layers, geometry, meta)


def aggregate_heads(channel_scores: torch.Tensor, head_dim: int, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel scores after any squaring, per-head scores) from o_proj input channel scores."""
    if how == "square-sum":
        channel_scores = channel_scores * channel_scores
    per_head = channel_scores.reshape(-1, head_dim)
    if how in ("sum", "square-sum"):
        return channel_scores, per_head.sum(dim=1)
    if how == "mean":
        return channel_scores, per_head.mean(dim=1)
    raise SeapError(f"unknown head aggregation {how!r}", "use sum, mean or square-sum")


def compute_scores(stats: ActivationStatistics, score: str = DEFAULT_SCORE, head_aggregation: str | None = None) -> ImportanceScores:
    """Scores of every head and channel from one task's statistics.

    ``head_aggregation`` overrides the score's own ("sum", "mean" or "square-sum").
    """
    definition = get_score(score)
    how = head_aggregation or definition.head_aggregation
    layers = []
    for i, layer in enumerate(stats.layers):
        geo = stats.geometry.layers[i]
        attn = definition.channel_score(layer.attn, layer.o_proj)
        attn_channels, heads = aggregate_heads(attn, geo.head_dim, how)
        channels = definition.channel_score(layer.mlp, layer.down_proj)
        layers.append(LayerScores(attn_channels, heads, channels))
    meta = {
        "task": stats.task,
        "score": score,
        "head_aggregation": how,
        "model_fingerprint": stats.fingerprint,
        "corpus_digest": stats.meta.get("corpus_digest"),
        "num_tokens": stats.num_tokens,
        "tasks": {stats.task: 1.0},
    }
    return ImportanceScores(layers, stats.geometry, meta)


GENERAL_TASK = "general"
DEFAULT_GENERAL_WEIGHT = 2.0
DEFAULT_GENERAL_WEIGHTS: dict[str, float] = {"wikitext": 3.0, "wikitext2": 3.0, "wikitext-2": 3.0}


def general_weights(tasks: Sequence[str], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """SEAP-gen weights: 3 for WikiText-2, 2 for every other task, then user overrides."""
    weights = {t: DEFAULT_GENERAL_WEIGHTS.get(t.lower(), DEFAULT_GENERAL_WEIGHT) for t in tasks}
    for task, weight in (overrides or {}).items():
        if task not in weights:
            raise SeapError(f"general-mask weight for unknown task {task!r}", f"tasks are: {', '.join(tasks)}")
        if weight < 0:
            raise SeapError(f"general-mask weight of {task!r} is negative ({weight})", "use weights >= 0")
        weights[task] = float(weight)
    if not any(weights.values()):
        raise SeapError("all general-mask weights are zero", "give at least one task a positive weight")
    return weights


def combine_scores(per_task: Sequence[ImportanceScores], weights: Mapping[str, float] | None = None,
                   name: str = GENERAL_TASK) -> ImportanceScores:
    """The general mask's scores: sum over tasks of weight x raw task score (SEAP-gen)."""
    if not per_task:
        raise SeapError("no task scores to combine", "compute scores for at least one task")
    tasks = [s.task for s in per_task]
    if len(set(tasks)) != len(tasks):
        raise SeapError(f"duplicate tasks among the scores: {tasks}", "pass one scores folder per task")
    if len({s.fingerprint for s in per_task}) > 1:
        raise ModelMismatchError("task scores come from different base models", "compute all scores on one model")
    if len({s.score for s in per_task}) > 1:
        raise SeapError(f"task scores use different score functions: {sorted({s.score for s in per_task})}",
                        "compute all task scores with the same --score")
    w = general_weights(tasks, weights)
    first = per_task[0]
    layers = []
    for i in range(first.geometry.num_layers):
        layers.append(LayerScores(
            sum(w[s.task] * s.layers[i].attn_channels for s in per_task),  # type: ignore[misc]
            sum(w[s.task] * s.layers[i].heads for s in per_task),  # type: ignore[misc]
            sum(w[s.task] * s.layers[i].channels for s in per_task),  # type: ignore[misc]
        ))
    meta = {**first.meta, "task": name, "tasks": w,
            "corpus_digest": sorted(str(s.meta.get("corpus_digest")) for s in per_task)}
    return ImportanceScores(layers, first.geometry, meta)
