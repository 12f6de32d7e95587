"""Collecting activation statistics from a model: the glue between hooks, batches and :mod:`seap.maths.moments`.

For every decoder layer the engine records the input of ``o_proj`` (the concatenated head
outputs) and of ``down_proj`` (SiLU(gate) * up), over all real tokens of the corpus (padding
excluded). The result, :class:`ActivationStatistics`, also carries the column norms of
``o_proj`` and ``down_proj`` and the model geometry, so scores and masks can be computed
from it alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seap.data.corpus import DEFAULT_MAX_TOKENS, CalibrationCorpus
from seap.errors import ModelMismatchError, SeapError
from seap.maths.geometry import ModelGeometry
from seap.model.hooks import HookManager, StopForward
from seap.model.loaded import LoadedModel
from seap.maths.moments import ACCUMULATION_DTYPES, ChannelMoments, SecondMomentAccumulator, SecondMoments
from seap.maths.statistics import (
    DEFAULT_SECOND_MOMENT_BUDGET,
    ActivationStatistics,
    LayerStatistics,
    StoredSeconds,
    WeightColumnNorms,
    second_moment_bytes,
)



def second_moment_groups(widths: Sequence[tuple[int, int]], budget: int, itemsize: int = 12) -> list[list[int]]:
    """Consecutive layers whose second-moment accumulators (``width^2`` each, for the ``o_proj``
    and ``down_proj`` inputs of a layer) fit in ``budget`` bytes together; one pass each (a
    layer larger than the budget gets a pass of its own)."""
    groups: list[list[int]] = []
    used = 0
    for i, (attn, mlp) in enumerate(widths):
        size = (attn * attn + mlp * mlp) * itemsize
        if groups and used + size <= budget:
            groups[-1].append(i)
            used += size
        else:
            groups.append([i])
            used = size
    return groups


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The indices of sequences of the given ``lengths``, grouped in batches of at most
    ``batch_size`` of similar length (longest first, ties in index order) to minimise padding.
    Every pass over tokenized texts (statistics, router statistics, refits, router features)
    batches them so."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard_texts(texts: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Texts ``i, i+n, i+2n, ...`` of ``shard=(i, n)`` (all of them without a shard); an invalid
    shard is refused."""
    if shard is None:
        return list(texts)
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise SeapError(f"invalid shard {index}/{count}", "shards are numbered 0..n-1, e.g. --shard 0/4")
    return list(texts)[index::count]


def tokenize_corpus(tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_tokens``; texts that tokenize to nothing are dropped."""
    kwargs: dict[str, Any] = {"truncation": max_tokens is not None}
    if max_tokens is not None:
        kwargs["max_length"] = max_tokens
    ids = [tokenizer(t, **kwargs)["input_ids"] for t in texts]
    return [x for x in ids if len(x) > 0]


def collect_statistics(
    loaded: LoadedModel,
    corpus: CalibrationCorpus,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    accumulate_dtype: str = "float64",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    second_moments: bool = False,
    second_moment_budget: int = DEFAULT_SECOND_MOMENT_BUDGET,
    spill_dir: str | Path | None = None,
) -> ActivationStatistics:
    """Run the corpus through the model and return per-channel moments for every layer.

    ``shard=(i, n)`` processes only texts ``i, i+n, i+2n, ...``; merging all ``n`` shards
    with :func:`merge_statistics` equals one pass. Hooks are removed even on error.

    With ``second_moments`` (what reconstruction needs), every layer also gets the second
    moments of both inputs (:class:`SecondMoments`, in the accumulation dtype). The first pass
    collects them with the moments for as many layers as fit in ``second_moment_budget``
    bytes of accumulators; each further group of layers takes one more pass that stops after
    its last layer, and each group is moved to the CPU before the next starts. When every
    layer's matrices together would exceed the budget and ``spill_dir`` is given, each
    finished layer is written there at once (:class:`StoredSeconds`) instead of being held:
    peak memory is then one group of accumulators. Save the result before removing that folder.
    """
    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    if max_tokens is not None and max_tokens < 1:
        raise SeapError(f"max tokens must be at least 1, got {max_tokens}", "pass --max-tokens 1 or more")
    if accumulate_dtype not in ACCUMULATION_DTYPES:
        raise SeapError(f"unknown accumulation dtype {accumulate_dtype!r}", f"use one of: {', '.join(ACCUMULATION_DTYPES)}")
    texts = shard_texts(corpus.texts, shard)
    if not texts:
        raise SeapError(f"task {corpus.task!r} has no calibration texts{' in this shard' if shard else ''}",
                        "add calibration records, or use fewer shards")
    model, adapter = loaded.model, loaded.adapter
    device = next(model.parameters()).device
    dtype = ACCUMULATION_DTYPES[accumulate_dtype]
    token_ids = tokenize_corpus(loaded.tokenizer, texts, max_tokens)
    if not token_ids:
        raise SeapError(f"task {corpus.task!r}: every text tokenized to zero tokens", "check the corpus texts")

    mods = adapter.all_layer_modules(model)
    accumulators = [
        (ChannelMoments.empty(m.o_proj.in_features, dtype, device), ChannelMoments.empty(m.down_proj.in_features, dtype, device))
        for m in mods
    ]
    itemsize = torch.finfo(dtype).bits // 8 + 4  # the totals and a float32 block buffer
    groups = (second_moment_groups([(m.o_proj.in_features, m.down_proj.in_features) for m in mods],
                                   second_moment_budget, itemsize) if second_moments else [[]])
    seconds: list[list[SecondMoments | None]] = [[None, None] for _ in mods]
    stored: list[StoredSeconds | None] = [None for _ in mods]
    spill = (second_moments and spill_dir is not None
             and second_moment_bytes(adapter.geometry(model)) > second_moment_budget)
    pending: dict[tuple[int, int], SecondMomentAccumulator] = {}
    state: dict[str, Any] = {"token_weights": None, "count": 0}
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    backbone = adapter.backbone(model)
    batches = length_batches([len(x) for x in token_ids], batch_size)
    start = time.perf_counter()
    n_tokens = 0
    for pass_index, group in enumerate(groups):
        first_pass = pass_index == 0
        wanted = set(group)
        for i in group:
            pending[(i, 0)] = SecondMomentAccumulator(mods[i].o_proj.in_features, dtype, device)
            pending[(i, 1)] = SecondMomentAccumulator(mods[i].down_proj.in_features, dtype, device)

        def make_hook(layer: int, which: int, moments: bool, second: bool, stop: bool) -> Any:
            def hook(_module: torch.nn.Module, x: torch.Tensor) -> None:
                if moments:
                    batch = ChannelMoments.from_masked(x, state["token_weights"], state["count"], dtype)
                    accumulators[layer][which].update_(batch)
                if second:
                    pending[(layer, which)].add(x, state["token_weights"], state["count"])
                if stop:
                    raise StopForward

            return hook

        last = max(group) if (group and not first_pass) else None
        with HookManager() as hooks, torch.inference_mode():
            for i, m in enumerate(mods):
                if first_pass or i in wanted:
                    hooks.add_input_hook(m.o_proj, make_hook(i, 0, first_pass, i in wanted, False))
                    hooks.add_input_hook(m.down_proj, make_hook(i, 1, first_pass, i in wanted, i == last))
            label = f"statistics [{corpus.task}]" + (f" pass {pass_index + 1}/{len(groups)}" if len(groups) > 1 else "")
            bar = tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False)
            for batch in bar:
                input_ids, attention_mask = pad_batch([token_ids[j] for j in batch], pad_id, device)
                count = int(attention_mask.sum())
                # no padding in this batch (common: batches are sorted by length): plain sums
                state["token_weights"] = None if count == attention_mask.numel() else attention_mask
                state["count"] = count
                try:
                    backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except StopForward:
                    pass
                if first_pass:
                    n_tokens += count
        for i in group:  # off the device (or into the spill folder) before the next group's accumulators
            attn_second, mlp_second = (pending.pop((i, which)).result().to("cpu") for which in (0, 1))
            if spill:
                stored[i] = StoredSeconds.write(attn_second, mlp_second, Path(spill_dir) / f"layer-{i:04d}.safetensors")  # type: ignore[arg-type]
            else:
                seconds[i] = [attn_second, mlp_second]
    elapsed = time.perf_counter() - start

    layers = [
        LayerStatistics(a.to("cpu"), b.to("cpu"), WeightColumnNorms.of(m.o_proj.weight), WeightColumnNorms.of(m.down_proj.weight),
                        second[0], second[1], spilled)
        for (a, b), m, second, spilled in zip(accumulators, mods, seconds, stored, strict=True)
    ]
    meta = {
        "task": corpus.task,
        "model_fingerprint": loaded.fingerprint,
        "model_source": loaded.source,
        "corpus_digest": corpus.digest(),
        "num_texts": len(token_ids),
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "accumulate_dtype": accumulate_dtype,
        "shard": list(shard) if shard else None,
        "seconds": round(elapsed, 3),
    }
    if second_moments:  # (absent otherwise: statistics without them stay byte for byte as before)
        meta["second_moments"] = {"passes": len(groups), "budget_bytes": second_moment_budget, "spilled": spill}
    counts = {layer.attn.count for layer in layers} | {layer.mlp.count for layer in layers}
    if counts != {n_tokens}:
        raise RuntimeError(f"hooks saw {sorted(counts)} tokens, the batches held {n_tokens}: was a layer skipped?")
    return ActivationStatistics(layers, adapter.geometry(model), meta)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)
