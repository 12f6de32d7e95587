"""SEAP: Sparse Expert Activation Pruning for causal language models.

Public API (see README.md)::

    import seap
    base = seap.load_model("smollm2-135m")                     # hub id, folder, .gguf or alias
    corpora = seap.build_corpora("calib.jsonl")                # per-task knowledge sentences
    stats = {t: seap.collect_statistics(base, c) for t, c in corpora.items()}
    scores = [seap.compute_scores(s, "seap-sf") for s in stats.values()]
    mask = seap.build_mask(scores[0], 0.5, "logistic")         # an expert mask
    pruned = seap.apply_mask(base, mask)                       # hard pruning, as the mask says
    seap.save_pruned(pruned, "out/pruned", mask)
    again = seap.load_pruned("out/pruned")

The names are imported on first use, so ``import seap`` (and ``seap --help``) stays fast:
torch is loaded only when a name that needs it is touched.

Packages, in the direction data flows: :mod:`seap.data` (calibration corpora, task catalogue),
:mod:`seap.maths` (pure tensor maths: moments, statistics, scores, schedules, masks),
:mod:`seap.model` (adapters, loading, hooks, calibration, applying masks, checkpoints),
:mod:`seap.evaluation` (lm-eval, metrics, speed, router, routed inference, report),
:mod:`seap.registry` (records, bundles, promotion), :mod:`seap.run` (configuration, method
table, plan, stage functions, executors).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ActivationStatistics": "seap.maths.statistics",
    "merge_statistics": "seap.maths.statistics",
    "collect_statistics": "seap.model.calibration",
    "CalibrationCorpus": "seap.data.corpus",
    "build_corpus": "seap.data.corpus",
    "knowledge_sentence": "seap.data.corpus",
    "read_corpus": "seap.data.corpus",
    "write_corpus": "seap.data.corpus",
    "ArtifactError": "seap.errors",
    "ModelMismatchError": "seap.errors",
    "SeapError": "seap.errors",
    "UnsupportedArchitectureError": "seap.errors",
    "PruningMask": "seap.maths.masks",
    "build_mask": "seap.maths.masks",
    "LoadedModel": "seap.model.loaded",
    "model_fingerprint": "seap.model.loaded",
    "wrap_model": "seap.model.loaded",
    "load_model": "seap.model.loading",
    "build_corpora": "seap.data.corpus",
    "prune": "seap.run.oneshot",
    "apply_mask": "seap.model.masking",
    "load_pruned": "seap.model.checkpoint",
    "save_pruned": "seap.model.checkpoint",
    "allocate": "seap.maths.schedules",
    "ImportanceScores": "seap.maths.scores",
    "combine_scores": "seap.maths.scores",
    "compute_scores": "seap.maths.scores",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seap' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
