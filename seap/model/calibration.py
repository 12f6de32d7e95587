"""Collecting activation statistics from a model: the glue between the layer stream, batches
and :mod:`seap.maths.moments`.

For every decoder layer the engine records the input of ``o_proj`` (the concatenated head
outputs) and of ``down_proj`` (SiLU(gate) * up), over all real tokens of the corpus (padding
excluded). The result, :class:`ActivationStatistics`, also carries the column norms of
``o_proj`` and ``down_proj`` and the model geometry, so scores and masks can be computed
from it alone. The model is walked one layer at a time (:mod:`seap.model.layer_stream`), every
task's batches through each layer, so peak memory is one layer and the hidden states.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from seap.data.corpus import DEFAULT_MAX_TOKENS, CalibrationCorpus
from seap.errors import SeapError
from seap.maths.moments import ACCUMULATION_DTYPES, ChannelMoments
from seap.maths.statistics import (
    ActivationStatistics,
    LayerStatistics,
    WeightColumnNorms,
)
from seap.model.batching import shard_texts, tokenize_corpus


def check_calibration_options(batch_size: int, max_tokens: int | None, accumulate_dtype: str = "float64") -> None:
    """Refuse a batch size or token cap below 1, or an unknown accumulation dtype."""
    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    if max_tokens is not None and max_tokens < 1:
        raise SeapError(f"max tokens must be at least 1, got {max_tokens}", "pass --max-tokens 1 or more")
    if accumulate_dtype not in ACCUMULATION_DTYPES:
        raise SeapError(f"unknown accumulation dtype {accumulate_dtype!r}", f"use one of: {', '.join(ACCUMULATION_DTYPES)}")


def collect_task_statistics(
    model: Any,
    corpora: Mapping[str, CalibrationCorpus],
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    accumulate_dtype: str = "float64",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    work: Path | None = None,
) -> dict[str, ActivationStatistics]:
    """Per-channel moments of every layer for each task's corpus, in one walk over the layers.

    ``model`` is a :class:`~seap.model.loaded.LoadedModel`, a
    :class:`~seap.model.layer_stream.LayerSource` or a model folder (read layer by layer).
    ``shard=(i, n)`` processes only texts ``i, i+n, i+2n, ...`` of each task; merging all ``n``
    shards with :func:`merge_statistics` equals one pass. Hooks are removed even on error.
    With ``work`` (a folder of this pass's own) the hidden states wait on disk between layers
    and a pass killed part-way resumes after its last finished layer
    (:func:`seap.model.layer_stream.walk_layers`).
    """
    from seap.model.layer_stream import (
        LayerResult,
        calibration_batches,
        open_layers,
        walk_layers,
    )

    check_calibration_options(batch_size, max_tokens, accumulate_dtype)
    source = open_layers(model)
    dtype = ACCUMULATION_DTYPES[accumulate_dtype]
    tasks = list(corpora)
    token_ids = []
    for task in tasks:
        texts = shard_texts(corpora[task].texts, shard)
        if not texts:
            raise SeapError(f"task {task!r} has no calibration texts{' in this shard' if shard else ''}",
                            "add calibration records, or use fewer shards")
        ids = tokenize_corpus(source.tokenizer, texts, max_tokens)
        if not ids:
            raise SeapError(f"task {task!r}: every text tokenized to zero tokens", "check the corpus texts")
        token_ids.append(ids)
    start = time.perf_counter()
    batches = calibration_batches(source, token_ids, batch_size, work)
    layers: list[list[LayerStatistics]] = [[] for _ in tasks]

    def watch(_index: int, layer: torch.nn.Module) -> dict[torch.nn.Module, Any]:
        mods = source.adapter.layer_modules(layer)
        current["moments"] = [(ChannelMoments.empty(mods.o_proj.in_features, dtype, source.device),
                               ChannelMoments.empty(mods.down_proj.in_features, dtype, source.device)) for _ in tasks]

        def hook(which: int) -> Any:
            def add(batch: Any, x: torch.Tensor) -> None:
                current["moments"][batch.part][which].update_(
                    ChannelMoments.from_masked(x, batch.token_weights, batch.count, dtype))
            return add

        return {mods.o_proj: hook(0), mods.down_proj: hook(1)}

    def finish(_index: int, layer: torch.nn.Module) -> LayerResult:
        mods = source.adapter.layer_modules(layer)
        tensors = {}
        for name, linear in (("o_proj", mods.o_proj), ("down_proj", mods.down_proj)):
            norms = WeightColumnNorms.of(linear.weight)
            tensors.update({f"{name}.sq_l2": norms.sq_l2, f"{name}.l1": norms.l1,
                            f"{name}.out_features": torch.tensor([norms.out_features])})
        for part, moments in enumerate(current.pop("moments")):
            for module, m in zip(("attn", "mlp"), moments, strict=True):
                m = m.to("cpu")
                tensors.update({f"{part}.{module}.count": torch.tensor([m.count]), f"{part}.{module}.mean": m.mean,
                                f"{part}.{module}.m2": m.m2, f"{part}.{module}.mean_sq": m.mean_sq})
        return tensors, {}

    def keep(_index: int, result: LayerResult) -> None:
        t = result[0]
        norms = [WeightColumnNorms(t[f"{n}.sq_l2"], t[f"{n}.l1"], int(t[f"{n}.out_features"][0]))
                 for n in ("o_proj", "down_proj")]
        for part in range(len(tasks)):
            attn, mlp = (ChannelMoments(int(t[f"{part}.{m}.count"][0]), t[f"{part}.{m}.mean"], t[f"{part}.{m}.m2"],
                                        t[f"{part}.{m}.mean_sq"]) for m in ("attn", "mlp"))
            layers[part].append(LayerStatistics(attn, mlp, *norms))

    current: dict[str, Any] = {}
    label = "statistics [" + (tasks[0] if len(tasks) == 1 else f"{len(tasks)} tasks") + "]"
    identity = {"walk": "statistics", "model": source.fingerprint, "corpora": [corpora[t].digest() for t in tasks],
                "batch_size": batch_size, "max_tokens": max_tokens, "dtype": accumulate_dtype, "shard": shard}
    walk_layers(source, batches, watch, finish, keep, label, progress, work, identity)
    elapsed = time.perf_counter() - start
    geometry = source.adapter.geometry(source.model)
    out = {}
    for part, task in enumerate(tasks):
        n_tokens = sum(b.count for b in batches if b.part == part)
        counts = {layer.attn.count for layer in layers[part]} | {layer.mlp.count for layer in layers[part]}
        if counts != {n_tokens}:
            raise RuntimeError(f"hooks saw {sorted(counts)} tokens, the batches held {n_tokens}: was a layer skipped?")
        out[task] = ActivationStatistics(layers[part], geometry, {
            "task": task,
            "model_fingerprint": source.fingerprint,
            "model_source": source.source,
            "corpus_digest": corpora[task].digest(),
            "num_texts": len(token_ids[part]),
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "accumulate_dtype": accumulate_dtype,
            "shard": list(shard) if shard else None,
            "seconds": round(elapsed, 3),
        })
    return out


def collect_statistics(
    model: Any,
    corpus: CalibrationCorpus,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    accumulate_dtype: str = "float64",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> ActivationStatistics:
    """The statistics of one task's ``corpus`` (:func:`collect_task_statistics`)."""
    return collect_task_statistics(model, {corpus.task: corpus}, batch_size, max_tokens, accumulate_dtype, shard,
                                   progress)[corpus.task]
