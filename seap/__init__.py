"""SEAP: Sparse Expert Activation Pruning for causal language models.

Public API (see README.md)::

    import seap
    base = seap.load_model("smollm2-135m")                     # hub id, folder, .gguf or alias
    corpora = seap.build_corpora("calib.jsonl")                # per-task knowledge sentences
    stats = {t: seap.collect_statistics(base, c) for t, c in corpora.items()}
    scores = [seap.compute_scores(s, "seap-sf") for s in stats.values()]
    mask = seap.build_mask(scores[0], 0.5, "logistic")         # an expert mask
    pruned = seap.apply_mask(base, mask, "hard")
    seap.save_pruned(pruned, "out/pruned", mask)
    again = seap.load_pruned("out/pruned")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .collect import ActivationStatistics, collect_statistics, merge_statistics  # noqa: E402
from .corpus import CalibrationCorpus, build_corpus, knowledge_sentence, read_corpus, write_corpus  # noqa: E402
from .errors import ArtifactError, ModelMismatchError, SeapError, UnsupportedArchitectureError  # noqa: E402
from .masks import PruningMask, build_mask  # noqa: E402
from .models import LoadedModel, load_model, model_fingerprint, wrap_model  # noqa: E402
from .pipeline import build_corpora, prune  # noqa: E402
from .prune import apply_mask  # noqa: E402
from .pruned import load_pruned, save_pruned  # noqa: E402
from .schedules import allocate  # noqa: E402
from .scores import ImportanceScores, combine_scores, compute_scores  # noqa: E402

__all__ = [
    "ActivationStatistics", "ArtifactError", "CalibrationCorpus", "ImportanceScores", "LoadedModel",
    "ModelMismatchError", "PruningMask", "SeapError", "UnsupportedArchitectureError", "__version__", "allocate",
    "apply_mask", "build_corpora", "build_corpus", "build_mask", "collect_statistics", "combine_scores",
    "compute_scores", "knowledge_sentence", "load_model", "load_pruned", "merge_statistics", "model_fingerprint",
    "prune", "read_corpus", "save_pruned", "wrap_model", "write_corpus",
]
