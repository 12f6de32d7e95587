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
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from seap.data.corpus import DEFAULT_MAX_TOKENS, CalibrationCorpus
from seap.errors import ModelMismatchError, SeapError
from seap.maths.masks import LayerMask, PruningMask, validate_mask
from seap.maths.moments import SecondMomentAccumulator
from seap.maths.reconstruction import Refit, RefitOptions, refit_from_cross, refit_layer, target_input_moments
from seap.maths.statistics import ActivationStatistics
from seap.model.calibration import length_batches, pad_batch, tokenize_corpus
from seap.model.hooks import HookManager, StopForward
from seap.model.loaded import LoadedModel
from seap.model.surgery import soft_pruned_layer

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


def reconstruct_mask(base: LoadedModel, mask: PruningMask, statistics: ActivationStatistics,
                     options: RefitOptions = RefitOptions()) -> PruningMask:
    """``mask`` with refitted ``o_proj`` / ``down_proj`` weights of its kept columns, fitted on
    the second moments in ``statistics`` (collected with ``second_moments=True`` on ``base``).

    A reconstructed mask no longer carries calibration means: its refit replaces FLAP's bias
    compensation (``RefitOptions(bias=True)`` fits a bias as well). The metadata records the
    options, the calibration tokens and the output error of every refitted layer relative to
    its dense output, before and after the refit.
    """
    mask.check_model(base.fingerprint)
    if statistics.fingerprint != mask.base_fingerprint:
        raise ModelMismatchError("the statistics come from another model than the mask",
                                 "refit with statistics collected on the mask's base model")
    if not statistics.has_second_moments:
        raise SeapError(f"the statistics of task {statistics.task!r} have no second moments",
                        "collect them with reconstruction enabled (--reconstruct)")
    adapter = base.adapter
    head_dim = adapter.head_dim(base.model.config)
    layers: list[LayerMask] = []
    report = []
    for i, (layer, layer_mask, stats) in enumerate(zip(adapter.decoder_layers(base.model), mask.layers,
                                                        statistics.layers, strict=True)):
        mods = adapter.layer_modules(layer)
        refit: dict[str, torch.Tensor] = {}
        entry: dict[str, float | int] = {"layer": i}
        attn_second, mlp_second = stats.seconds()  # type: ignore[misc]  # one layer in memory at a time
        for name, linear, keep_flags, second in (
            ("o", mods.o_proj, layer_mask.heads.repeat_interleave(head_dim), attn_second),
            ("down", mods.down_proj, layer_mask.channels, mlp_second),
        ):
            keep = torch.nonzero(keep_flags.cpu()).flatten()
            check_token_count(i, f"{name}_proj", second.count, int(keep.numel()))
            weight = linear.weight.detach()
            _keep_refit(refit, entry, name, refit_layer(weight, second, keep, options), second.count)
        layers.append(LayerMask(layer_mask.heads, layer_mask.kv_heads, layer_mask.channels, None, None, refit))
        report.append(entry)
    meta = {**mask.meta, "reconstruction": {**asdict(options), "statistics_task": statistics.task,
                                            "corpus_digest": statistics.meta.get("corpus_digest"),
                                            "tokens": statistics.num_tokens, "layers": report}}
    out = replace(mask, layers=layers, meta=meta)
    validate_mask(out)
    return out


@dataclass
class _LayerCall:
    """How the model called one decoder layer for one batch (everything but the hidden states)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _layer_calls(base: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, list[_LayerCall]]:
    """The first layer's hidden input for a batch and every layer's other arguments, as the
    model passes them (position embeddings, the attention mask of that layer's kind), seen
    in one dense forward."""
    calls: list[_LayerCall] = []
    first: dict[str, torch.Tensor] = {}
    layers = base.adapter.decoder_layers(base.model)

    def record(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not calls:
            first["hidden"] = hidden
        calls.append(_LayerCall(tuple(args[1:]), kwargs))
        if len(calls) == len(layers):
            raise StopForward

    with HookManager() as hooks:
        for layer in layers:
            hooks.add_call_hook(layer, record)
        try:
            base.adapter.backbone(base.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return first["hidden"], calls


def _capture_input(layer: torch.nn.Module, module: torch.nn.Module, call: _LayerCall, hidden: torch.Tensor
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


def reconstruct_mask_sequential(base: LoadedModel, mask: PruningMask, corpus: CalibrationCorpus,
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
    mask.check_model(base.fingerprint)
    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    token_ids = tokenize_corpus(base.tokenizer, list(corpus.texts), max_tokens)
    if not token_ids:
        raise SeapError(f"task {corpus.task!r}: no calibration text to refit on", "check the corpus texts")
    model, adapter = base.model, base.adapter
    device = next(model.parameters()).device
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    head_dim = adapter.head_dim(model.config)
    layers: list[LayerMask] = []
    report = []
    with torch.inference_mode():
        batches = []
        for batch in length_batches([len(x) for x in token_ids], batch_size):
            input_ids, attention = pad_batch([token_ids[j] for j in batch], pad_id, device)
            count = int(attention.sum())
            hidden, calls = _layer_calls(base, input_ids, attention)
            batches.append({"weights": None if count == attention.numel() else attention, "count": count,
                            "calls": calls, "dense": hidden, "pruned": hidden.clone()})
        tokens = sum(b["count"] for b in batches)
        bar = tqdm(list(zip(adapter.decoder_layers(model), mask.layers, strict=True)),
                   desc=f"sequential refit [{corpus.task}]", unit="layer", disable=not progress, leave=False)
        for i, (layer, layer_mask) in enumerate(bar):
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
    meta = {**mask.meta, "reconstruction": {**asdict(options), "statistics_task": corpus.task,
                                            "corpus_digest": corpus.digest(), "tokens": tokens, "layers": report}}
    out = replace(mask, layers=layers, meta=meta)
    validate_mask(out)
    return out


def refit_mask(base: LoadedModel, mask: PruningMask, options: RefitOptions,
               statistics: ActivationStatistics | None = None, corpus: CalibrationCorpus | None = None,
               batch_size: int = 8, max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True) -> PruningMask:
    """Reconstruct ``mask`` as ``options`` say: one-shot on ``statistics`` (second moments), or
    sequentially on ``corpus`` (``options.sequential``)."""
    if options.sequential:
        if corpus is None:
            raise SeapError("the sequential refit runs the calibration text through the model, and none was given",
                            "pass the corpus to refit on (--refit-corpus), or refit one-shot (--no-refit-sequential)")
        return reconstruct_mask_sequential(base, mask, corpus, options, batch_size, max_tokens, progress)
    if statistics is None:
        raise SeapError("the one-shot refit reads second moments, and no statistics were given",
                        "pass statistics with second moments (--refit-stats)")
    return reconstruct_mask(base, mask, statistics, options)


__all__ = ["MIN_TOKENS", "MIN_TOKENS_FRACTION", "check_token_count", "reconstruct_mask",
           "reconstruct_mask_sequential", "refit_mask"]
