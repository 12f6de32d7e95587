"""Reconstructing a mask on its base model: the glue between the base's weights, the
statistics' second moments and the closed-form refit of :mod:`seap.maths.reconstruction`.

:func:`reconstruct_mask` returns the same mask carrying, for every layer, refitted weights
for the kept input columns of the attention output projection and the MLP down projection
(and a bias, with ``RefitOptions(bias=True)``). Applying it (:func:`seap.model.surgery.apply_mask`)
puts them in place of the plain slice; everything that loads masks loads them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import torch

from seap.errors import ModelMismatchError, SeapError
from seap.maths.masks import LayerMask, PruningMask, validate_mask
from seap.maths.reconstruction import RefitOptions, refit_layer
from seap.maths.statistics import ActivationStatistics
from seap.model.loaded import LoadedModel

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
            fitted = refit_layer(weight, second, keep, options)
            refit[f"{name}_weight"] = fitted.weight.cpu()
            if fitted.bias is not None:
                refit[f"{name}_bias"] = fitted.bias.cpu()
            entry[f"{name}_error_sliced"] = fitted.error_sliced
            entry[f"{name}_error_refit"] = fitted.error_refit
            entry[f"{name}_tokens"] = second.count
        layers.append(LayerMask(layer_mask.heads, layer_mask.kv_heads, layer_mask.channels, None, None, refit))
        report.append(entry)
    meta = {**mask.meta, "reconstruction": {**asdict(options), "statistics_task": statistics.task,
                                            "corpus_digest": statistics.meta.get("corpus_digest"),
                                            "tokens": statistics.num_tokens, "layers": report}}
    out = replace(mask, layers=layers, meta=meta)
    validate_mask(out)
    return out


__all__ = ["MIN_TOKENS", "MIN_TOKENS_FRACTION", "check_token_count", "reconstruct_mask"]
