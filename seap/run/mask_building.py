"""The one function that builds a mask of a method-table entry.

Every front door that builds a mask comes here: the plan's ``masks`` stage (behind ``seap
eval``, ``seap prune``, ``dvc repro`` and the Prefect flow) and the step command ``seap
masks``. Given the statistics (scores of a dense model, or router statistics of a
mixture-of-experts model), the job's :class:`~seap.run.job_params.MaskParams` (method, unit,
schedule, sparsity, refit options) and what a refit runs on, it returns the mask. Reading
inputs from folders and writing the mask are the callers' business.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seap.data.corpus import DEFAULT_MAX_TOKENS
from seap.errors import SeapError
from seap.run.job_params import MaskParams
from seap.run.plan import GENERAL


@dataclass
class RefitSource:
    """What a reconstructed mask is refitted on: the base model (a model folder read layer by
    layer, a :class:`~seap.model.layer_stream.LayerSource` or a loaded model) and the
    calibration text, in ``parts`` (a task's corpus, then generic text; merged in order),
    truncated to ``max_tokens`` and run in batches of ``batch_size``."""

    model: Any
    parts: Sequence[Any] = ()  # CalibrationCorpus
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    batch_size: int = 8
    work: Any = None  # a folder of this refit's own: a refit killed part-way resumes there


def refit_options(values: Any) -> Any:
    """:class:`~seap.maths.reconstruction.RefitOptions` from a mapping of the options that differ
    from their defaults; a clear error for bad values."""
    from seap.maths.reconstruction import RefitOptions

    try:
        return RefitOptions(**dict(values or {}))
    except (TypeError, ValueError) as exc:
        raise SeapError(f"bad reconstruction options: {exc}",
                        "alpha >= 0, prior slice or zero, bias and sequential true or false") from None


def build_method_mask(params: MaskParams, *, scores: Sequence[Any] = (), router_statistics: Any = None,
                      bias_statistics: Any = None, refit: RefitSource | None = None,
                      base_source: str | None = None) -> Any:
    """The mask ``params`` describe.

    A dense model's mask comes from ``scores`` (one task's :class:`ImportanceScores`, or several
    combined with ``params.weights`` into the general mask), allocated by ``params.schedule``;
    ``bias_statistics`` stores FLAP's means in it; with ``params.refit`` it is refitted on
    ``refit``. A mixture-of-experts model's mask (``params.moe``) comes from
    ``router_statistics`` (one task's, or all tasks' pooled for a general mask) and prunes
    ``params.unit``. The mask records ``params.method``."""
    if params.moe:
        if router_statistics is None:
            raise SeapError("a mixture-of-experts mask is built from router statistics",
                            "collect them with `seap stats` on the MoE model (or run the plan)")
        from seap.maths.expert_selection import build_expert_mask

        mask = build_expert_mask(router_statistics, params.sparsity, params.score, params.allow_k_reduction,
                                 schedule=params.schedule, unit=params.unit or "experts", **params.schedule_options)
        mask.meta["method"] = params.method
        if params.kind != "expert":
            mask.meta.update({"task": GENERAL, "tasks": router_statistics.task.split("+")})
        return mask
    from seap.maths.masks import build_mask
    from seap.maths.scores import combine_scores

    if not scores:
        raise SeapError("no scores given", "pass at least one scores folder")
    combined = combine_scores(list(scores), params.weights or None) if len(scores) > 1 else scores[0]
    target = params.sparsity
    if params.up_to_reachable:  # a search's candidate past the schedule's limit: built at the limit, marked
        from seap.maths.schedules import BEYOND_REACH, reachable_sparsity

        limit = reachable_sparsity(params.schedule, combined.geometry, params.gqa_mode or "kv-groups",
                                   **params.schedule_options)
        target = min(target, math.floor(limit * 1000) / 1000)
    mask = build_mask(combined, target, params.schedule, params.gqa_mode or "kv-groups",
                      bias_compensation_stats=bias_statistics, base_source=base_source, **params.schedule_options)
    mask.meta["method"] = params.method
    if target < params.sparsity:
        mask.meta[BEYOND_REACH] = params.sparsity
    if params.refit is not None:
        if refit is None:
            raise SeapError("this mask is refitted, and nothing to refit on was given",
                            "pass the base model and the calibration text (--model, --refit-corpus)")
        from seap.model.refitting import refit_mask

        mask = refit_mask(refit.model, mask, refit_options(params.refit), refit.parts, refit.batch_size,
                          refit.max_tokens, progress=False, work=refit.work)
    return mask


__all__ = ["RefitSource", "build_method_mask", "refit_options"]
