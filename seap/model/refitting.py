"""Reconstructing a mask on its base model: the glue between the base's weights, the
statistics' second moments and the closed-form refit of :mod:`seap.maths.reconstruction`.

:func:`reconstruct_mask` returns the same mask carrying, for every layer, refitted weights
for the kept input columns of the attention output projection and the MLP down projection
(and a bias, with ``RefitOptions(bias=True)``), fitted one-shot on the dense model's second
moments; :func:`reconstruct_mask_sequential` fits layer by layer on the inputs the already
refitted layers produce (``RefitOptions(sequential=True)``). Applying it (:func:`seap.model.masking.apply_mask`)
puts them in place of the plain slice; everything that loads masks loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seap.data.corpus import DEFAULT_MAX_TOKENS, CalibrationCorpus
from seap.errors import SeapError
from seap.maths.masks import LayerMask, PruningMask, validate_mask
from seap.maths.moments import SecondMomentAccumulator, SecondMoments
from seap.maths.reconstruction import (
    Refit,
    RefitOptions,
    refit_from_cross,
    refit_layer,
    target_input_moments,
)
from seap.model.batching import tokenize_corpus
from seap.model.hooks import HookManager, StopForward
from seap.model.surgery import soft_pruned_layer
from seap.tensor_files import subset

log = logging.getLogger(__name__)

MIN_TOKENS_FRACTION = 0.1  # refused below this many tokens per kept input column (and below 16 tokens)
MIN_TOKENS = 16


def check_token_count(layer: int, module: str, tokens: int, kept: int) -> None:
    """Warn when a layer has fewer calibration tokens than kept input columns (the fit then
    leans on its regulariser); refuse below the floor, where it means nothing."""
    floor = max(MIN_TOKENS, int(MIN_TOKENS_FRACTION * kept))
    if tokens < floor:
        raise SeapError(f"layer {layer} {module}: {tokens} calibration tokens for {kept} kept input columns "
                        f"(reconstruction needs at least {floor})",
                        "collect statistics on more calibration text (--samples, --max-tokens), or build the mask "
                        "without --reconstruct")
    if tokens < kept:
        log.warning("layer %d %s: %d calibration tokens for %d kept input columns; the refit leans on its "
                    "regulariser (more calibration text helps)", layer, module, tokens, kept)


def _keep_refit(refit: dict[str, torch.Tensor], entry: dict[str, float | int], name: str, fitted: Refit,
                tokens: int) -> None:
    """Store one projection's refitted weights (and bias) in ``refit`` and its errors in ``entry``."""
    refit[f"{name}_weight"] = fitted.weight.cpu()
    if fitted.bias is not None:
        refit[f"{name}_bias"] = fitted.bias.cpu()
    entry[f"{name}_error_sliced"] = fitted.error_sliced
    entry[f"{name}_error_refit"] = fitted.error_refit
    entry[f"{name}_tokens"] = tokens


def refit_token_ids(source: Any, parts: Sequence[CalibrationCorpus], max_tokens: int | None) -> list[list[list[int]]]:
    """Each part's texts as token ids (truncated to ``max_tokens``); a part with no text is refused."""
    token_ids = []
    for corpus in parts:
        ids = tokenize_corpus(source.tokenizer, list(corpus.texts), max_tokens)
        if not ids:
            raise SeapError(f"task {corpus.task!r}: no calibration text to refit on", "check the corpus texts")
        token_ids.append(ids)
    if not token_ids:
        raise SeapError("no calibration text to refit on", "pass the corpus to refit on (--refit-corpus)")
    return token_ids


def reconstruct_mask(base: Any, mask: PruningMask, parts: Sequence[CalibrationCorpus],
                     options: RefitOptions = RefitOptions(), batch_size: int = 8,
                     max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True,
                     work: Path | None = None) -> PruningMask:
    """``mask`` with refitted ``o_proj`` / ``down_proj`` weights of its kept columns, fitted
    one-shot on the dense model's second moments of the calibration text ``parts`` (a task's
    corpus; several are merged exactly, in order, as statistics are). One mask of
    :func:`reconstruct_masks`."""
    return reconstruct_masks(base, {"mask": (mask, list(range(len(parts))))}, parts, options, batch_size,
                             max_tokens, progress, work)["mask"]


def reconstruct_masks(base: Any, masks: Mapping[str, tuple[PruningMask, Sequence[int]]],
                      parts: Sequence[CalibrationCorpus], options: RefitOptions = RefitOptions(),
                      batch_size: int = 8, max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True,
                      work: Path | None = None) -> dict[str, PruningMask]:
    """Every mask of ``masks`` (name -> the mask and the indices of the ``parts`` it is refitted
    on, merged in that order) with refitted ``o_proj`` / ``down_proj`` weights of its kept
    columns, fitted one-shot on the dense model's second moments of its calibration text, in
    one walk over the model.

    The model (``base``: a loaded model, a layer source or a model folder) is walked one layer
    at a time, every part's batches through each layer. The layer's second moments are
    accumulated per part, merged for each mask in its order (a merge shared by masks with the
    same parts), used at once by the refits and freed: one layer's matrices are alive at a
    time, never all layers'. With ``work`` (a folder of this walk's own) a walk killed part-way
    resumes after its last finished layer.

    A reconstructed mask no longer carries calibration means: its refit replaces FLAP's bias
    compensation (``RefitOptions(bias=True)`` fits a bias as well). The metadata records the
    options, the calibration tokens and the output error of every refitted layer relative to
    its dense output, before and after the refit.
    """
    from seap.model.layer_stream import LayerResult, calibration_batches, open_layers, walk_layers

    source = open_layers(base)
    if not masks:
        return {}
    for mask, used in masks.values():
        mask.check_model(source.fingerprint)
        if not used or any(not 0 <= k < len(parts) for k in used):
            raise SeapError(f"mask {mask.task!r}: no calibration text to refit on", "name the parts it is refitted on")
    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    token_ids = refit_token_ids(source, parts, max_tokens)
    head_dim = source.adapter.head_dim(source.config)
    batches = calibration_batches(source, token_ids, batch_size, work)
    tokens = [sum(b.count for b in batches if b.part == k) for k in range(len(parts))]
    refitted: dict[str, list[LayerMask]] = {name: [] for name in masks}
    reports: dict[str, list[dict[str, float | int]]] = {name: [] for name in masks}
    state: dict[str, Any] = {}
    # parts are walked in the order given; each mask's second moments are its parts merged in ITS
    # order, folded in as its parts finish (a finished part it needs later waits, shared), and the
    # mask is refitted as soon as its last part is in: a layer holds a few matrices per input,
    # not one per part

    def watch(i: int, layer: torch.nn.Module) -> dict[torch.nn.Module, Any]:
        mods = source.adapter.layer_modules(layer)
        widths = (mods.o_proj.in_features, mods.down_proj.in_features)
        state.update(layer=i, mods=mods, part=None, active=None, waiting={}, running={}, tensors={}, entries={})

        def hook(which: int) -> Any:
            def add(batch: Any, x: torch.Tensor) -> None:
                if batch.part != state["part"]:
                    _part_done()
                    state["part"] = batch.part
                    with torch.inference_mode(False):  # (merged outside inference mode too)
                        state["active"] = [SecondMomentAccumulator(w, torch.float64, source.device) for w in widths]
                state["active"][which].add(x, batch.token_weights, batch.count)
            return add

        return {mods.o_proj: hook(0), mods.down_proj: hook(1)}

    def _part_done() -> None:
        """Fold the part just finished into every mask that needs it next; refit the masks it
        completes."""
        if state["part"] is None:
            return
        finished = state.pop("active")
        state["active"] = None
        state["waiting"][state["part"]] = [acc.result() for acc in finished]
        progress_made = True
        while progress_made:
            progress_made = False
            for name, (_mask, used) in masks.items():
                have = state["running"].get(name, (0, None))
                count, seconds = have
                if count < len(used) and used[count] in state["waiting"]:
                    part = state["waiting"][used[count]]
                    if seconds is None:  # (its own copy only when another mask still needs the part)
                        seconds = [_copy(m) for m in part] if _shared(used[count], name) else list(part)
                    else:  # (merged in place: the sums a.merge(b) would return)
                        for running, more in zip(seconds, part, strict=True):
                            running.update_(more)
                    state["running"][name] = (count + 1, seconds)
                    progress_made = True
                    if count + 1 == len(used):
                        _refit(name, seconds)
                        state["running"][name] = (count + 1, None)  # (refitted: its matrices are freed)
            # a waiting part no mask needs any more is freed
            for k in list(state["waiting"]):
                if all(state["running"].get(n, (0, None))[0] > used.index(k) if k in used else True
                       for n, (_m, used) in masks.items()):
                    del state["waiting"][k]

    def _shared(k: int, taker: str) -> bool:
        """Whether part ``k`` is still to be merged by a mask other than ``taker``."""
        return any(n != taker and k in used and state["running"].get(n, (0, None))[0] <= used.index(k)
                   for n, (_m, used) in masks.items())

    def _copy(m: SecondMoments) -> SecondMoments:
        with torch.inference_mode(False):  # (a normal tensor: merged into later, in or outside inference mode)
            return SecondMoments(m.count, m.gram.clone(), m.total.clone())

    def _refit(name: str, seconds: list[Any]) -> None:
        i, mods = state["layer"], state["mods"]
        mask = masks[name][0]
        attn_second, mlp_second = seconds
        layer_mask = mask.layers[i]
        refit: dict[str, torch.Tensor] = {}
        entry: dict[str, float | int] = {"layer": i}
        for module, linear, keep_flags, second in (
            ("o", mods.o_proj, layer_mask.heads.repeat_interleave(head_dim), attn_second),
            ("down", mods.down_proj, layer_mask.channels, mlp_second),
        ):
            keep = torch.nonzero(keep_flags.cpu()).flatten()
            check_token_count(i, f"{module}_proj", second.count, int(keep.numel()))
            _keep_refit(refit, entry, module, refit_layer(linear.weight.detach(), second, keep, options), second.count)
        state["tensors"].update({f"{name}::{k}": v for k, v in refit.items()})
        state["entries"][name] = entry

    def finish(_i: int, _layer: torch.nn.Module) -> LayerResult:
        _part_done()
        missing = [name for name in masks if name not in state["entries"]]
        if missing:
            raise RuntimeError(f"masks {missing} were not refitted: a part they need had no batch")
        result = (state.pop("tensors"), state.pop("entries"))
        state.clear()
        return result

    def keep(i: int, result: LayerResult) -> None:
        tensors, entries = result
        for name, (mask, _used) in masks.items():
            refit = subset(tensors, f"{name}::")  # (from a walk's work folder: read when used)
            layer_mask = mask.layers[i]
            refitted[name].append(LayerMask(layer_mask.heads, layer_mask.kv_heads, layer_mask.channels, None, None,
                                            refit))
            reports[name].append(entries[name])

    identity = {"walk": "refit", "model": source.fingerprint, "parts": [c.digest() for c in parts],
                "masks": {name: [mask.digest(), list(used)] for name, (mask, used) in masks.items()},
                "options": asdict(options), "batch_size": batch_size, "max_tokens": max_tokens}
    label = next(iter(masks.values()))[0].task if len(masks) == 1 else f"{len(masks)} masks"
    walk_layers(source, batches, watch, finish, keep, f"refit [{label}]", progress, work, identity)
    out = {}
    for name, (mask, used) in masks.items():
        chosen = [parts[k] for k in used]
        meta = {**mask.meta, "reconstruction": {**asdict(options), "statistics_task": "+".join(c.task for c in chosen),
                                                "corpus_digest": _parts_digest(chosen),
                                                "tokens": sum(tokens[k] for k in used), "layers": reports[name]}}
        out[name] = replace(mask, layers=refitted[name], meta=meta)
        validate_mask(out[name])
    return out


def _parts_digest(parts: Sequence[CalibrationCorpus]) -> str:
    digests = sorted({c.digest() for c in parts})
    return digests[0] if len(digests) == 1 else "merged:" + ",".join(digests)


def reconstruct_mask_sequential(base: Any, mask: PruningMask, corpus: CalibrationCorpus,
                                options: RefitOptions = RefitOptions(sequential=True), batch_size: int = 8,
                                max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True) -> PruningMask:
    """``mask`` with refitted ``o_proj`` / ``down_proj`` weights, fitted layer by layer: layer
    ``l`` sees the inputs that the already pruned and refitted layers ``0..l-1`` produce, and its
    target is the dense layer's output on the dense inputs, so each fit also absorbs the error
    accumulated upstream (the "sequential" choice of ``docs/reconstruction.md``).

    The calibration ``corpus`` runs through two hidden-state streams kept side by side (dense
    and pruned, ``2 x tokens x hidden`` floats); each layer takes one dense and about three
    pruned layer passes. Within a layer, ``o_proj`` is refitted first, so ``down_proj`` is
    fitted on the inputs the refitted attention produces. The moments of one layer input
    ``[y, x'[S]]`` (``(d_out + |S|)^2`` floats) are held at a time.
    """
    from seap.model.layer_stream import calibration_batches, open_layers

    source = open_layers(base)
    mask.check_model(source.fingerprint)
    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    token_ids = refit_token_ids(source, [corpus], max_tokens)
    adapter, device = source.adapter, source.device
    head_dim = adapter.head_dim(source.config)
    layers: list[LayerMask] = []
    report = []
    batches = [{"weights": b.token_weights, "count": b.count, "calls": b.calls, "dense": b.hidden.to(device),
                "pruned": b.hidden.to(device, copy=True)} for b in calibration_batches(source, token_ids, batch_size)]
    tokens = sum(b["count"] for b in batches)
    bar = tqdm(list(enumerate(mask.layers)), desc=f"sequential refit [{corpus.task}]", unit="layer",
               disable=not progress, leave=False)
    for i, layer_mask in bar:
        layer = source.layer(i)
        try:
            with torch.inference_mode():
                _refit_layer_sequential(adapter, layer, i, layer_mask, head_dim, batches, tokens, options, device,
                                        layers, report)
        finally:
            source.release(i)
    meta = {**mask.meta, "reconstruction": {**asdict(options), "statistics_task": corpus.task,
                                            "corpus_digest": corpus.digest(), "tokens": tokens, "layers": report}}
    out = replace(mask, layers=layers, meta=meta)
    validate_mask(out)
    return out


def _refit_layer_sequential(adapter: Any, layer: torch.nn.Module, i: int, layer_mask: LayerMask, head_dim: int,
                            batches: list[dict[str, Any]], tokens: int, options: RefitOptions, device: torch.device,
                            layers: list[LayerMask], report: list[dict[str, float | int]]) -> None:
    """One layer of the sequential refit: its targets on the dense stream, the refit of o_proj
    then down_proj on the pruned stream, and both streams moved on to the next layer."""
    dense_mods = adapter.layer_modules(layer)
    plain = LayerMask(layer_mask.heads, layer_mask.kv_heads, layer_mask.channels, None, None, None)
    pruned = soft_pruned_layer(adapter, layer, plain, head_dim)
    pruned_mods = adapter.layer_modules(pruned)
    keeps = {"o": torch.nonzero(layer_mask.heads.repeat_interleave(head_dim).cpu()).flatten(),
             "down": torch.nonzero(layer_mask.channels.cpu()).flatten()}
    dense_linear = {"o": dense_mods.o_proj, "down": dense_mods.down_proj}
    for name, count in (("o", keeps["o"].numel()), ("down", keeps["down"].numel())):
        check_token_count(i, f"{name}_proj", tokens, int(count))
    # the dense layer: its outputs of o_proj / down_proj (the targets) and its next hidden states
    for b in batches:
        seen: dict[str, torch.Tensor] = {}
        with HookManager() as hooks:
            hooks.add_input_hook(dense_mods.o_proj, lambda _m, x: seen.__setitem__("o", x))
            hooks.add_input_hook(dense_mods.down_proj, lambda _m, x: seen.__setitem__("down", x))
            b["next_dense"] = b["calls"][i].run(layer, b["dense"])
        b["targets"] = {n: torch.nn.functional.linear(seen[n], dense_linear[n].weight) for n in seen}
    refit: dict[str, torch.Tensor] = {}
    entry: dict[str, float | int] = {"layer": i}
    for name, attr in (("o", "o_proj"), ("down", "down_proj")):  # o first: down sees the refitted attention
        linear = getattr(pruned_mods, attr)
        keep = keeps[name]
        acc = SecondMomentAccumulator(linear.out_features + int(keep.numel()), torch.float64, device)
        for b in batches:
            x = _capture_input(pruned, linear, b["calls"][i], b["pruned"])
            acc.add(target_input_moments(b["targets"][name], x[..., keep.to(x.device)]), b["weights"], b["count"])
        _keep_refit(refit, entry, name, refit_from_cross(dense_linear[name].weight, keep, acc.result(), options),
                    tokens)
        pruned = soft_pruned_layer(adapter, layer, replace(plain, refit=dict(refit)), head_dim)
        pruned_mods = adapter.layer_modules(pruned)
    for b in batches:
        b["pruned"] = b["calls"][i].run(pruned, b["pruned"])
        b["dense"] = b.pop("next_dense")
        b.pop("targets")
    layers.append(replace(plain, refit=refit))
    report.append(entry)


def refit_mask(base: Any, mask: PruningMask, options: RefitOptions, parts: Sequence[CalibrationCorpus],
               batch_size: int = 8, max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True,
               work: Path | None = None) -> PruningMask:
    """Reconstruct ``mask`` as ``options`` say, on the calibration text ``parts``: one-shot
    (each part's second moments merged in order), or sequentially on all parts' text as one
    corpus (``options.sequential``)."""
    if not parts:
        raise SeapError("a refit runs calibration text through the model, and none was given",
                        "pass the corpus to refit on (--refit-corpus)")
    if options.sequential:
        from seap.data.corpus import merge_corpora

        corpus = parts[0] if len(parts) == 1 else merge_corpora(list(parts))
        return reconstruct_mask_sequential(base, mask, corpus, options, batch_size, max_tokens, progress)
    return reconstruct_mask(base, mask, parts, options, batch_size, max_tokens, progress, work)


def _capture_input(layer: torch.nn.Module, module: torch.nn.Module, call: Any, hidden: torch.Tensor
                   ) -> torch.Tensor:
    """The input ``module`` (inside ``layer``) sees when ``layer`` runs on ``hidden``; the rest
    of the layer is skipped."""
    seen: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, x: torch.Tensor) -> None:
        seen.append(x)
        raise StopForward

    with HookManager() as hooks:
        hooks.add_input_hook(module, grab)
        try:
            call.run(layer, hidden)
        except StopForward:
            pass
    return seen[0]


__all__ = ["MIN_TOKENS", "MIN_TOKENS_FRACTION", "check_token_count", "reconstruct_mask", "reconstruct_masks",
           "reconstruct_mask_sequential", "refit_mask"]
