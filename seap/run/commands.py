"""The commands that make one artifact at a time (``seap corpus``, ``stats``, ``merge-stats``,
``scores``, ``masks``) and the one-shot ``seap prune``, as the CLI runs them.

Each step command reads its inputs from paths, calls the engine and writes one artifact; masks
are built by the same function as the plan's (:func:`seap.run.mask_building.build_method_mask`).
``seap prune`` is a plan of one job chain (:func:`seap.run.plan.make_prune_plan`), run by the
same executor, stage functions and cache as ``seap eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seap.data.corpus import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLES_PER_TASK,
    DEFAULT_SEED,
    CalibrationCorpus,
    build_corpora,
    read_corpus,
    write_corpus,
)
from seap.errors import SeapError
from seap.io import atomic_directory, check_output
from seap.maths.geometry import check_gqa_mode
from seap.maths.mask_formats import Mask
from seap.maths.schedules import check_schedule, check_sparsity
from seap.maths.scores import DEFAULT_SCORE, ImportanceScores, compute_scores
from seap.maths.statistics import ActivationStatistics, merge_statistics
from seap.model.calibration import collect_task_statistics
from seap.run.job_params import MaskParams
from seap.run.mask_building import RefitSource, build_method_mask, refit_options
from seap.run.methods import METHODS, check_compensation

ONESHOT_METHODS = ("seap", *(name for name, m in METHODS.items() if m.builds_masks))


def make_corpus(source: str, out: str | Path, tasks: Sequence[str] | None = None,
                 samples: int | None = DEFAULT_SAMPLES_PER_TASK, seed: int = DEFAULT_SEED,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS, overwrite: bool = False) -> dict[str, CalibrationCorpus]:
    """The calibration corpora of ``source``'s records, written to the corpus file ``out``
    (never over ``source``; an existing corpus only with ``overwrite``)."""
    check_output(out, [source], overwrite, file=True)
    corpora = build_corpora(source, tasks, samples, seed)
    write_corpus(out, corpora, max_tokens=max_tokens)
    return corpora


def make_statistics(model: Any, corpus_file: str | Path, out_dir: str | Path, tasks: Sequence[str] | None = None,
                    batch_size: int = 8, max_tokens: int | None = None, shard: tuple[int, int] | None = None,
                    accumulate_dtype: str = "float64", overwrite: bool = False, progress: bool = True,
                    unit: str = "auto") -> dict[str, Path]:
    """Statistics for every task of a corpus file, one folder per task under ``out_dir``: of a
    model (a loaded model or a layer source, walked layer by layer): of a dense model, the
    activation statistics (one walk for all tasks); of a mixture-of-experts model, its routers'
    statistics (one walk per task; what ``seap masks --stats`` reads; with channel sums unless
    ``unit`` is ``experts``, the default there)."""
    from seap.model.adapters.moe import MoeAdapter

    moe = isinstance(model.adapter, MoeAdapter)
    if not moe and unit in ("experts", "both"):
        raise SeapError(f"--unit {unit} needs a mixture-of-experts model; {model.adapter.name} is dense",
                        "drop --unit (heads and MLP channels are what a dense model prunes)")
    corpora, header = read_corpus(corpus_file)
    cap = max_tokens if max_tokens is not None else header.get("max_tokens", DEFAULT_MAX_TOKENS)
    wanted = list(tasks) if tasks else list(corpora)
    missing = [t for t in wanted if t not in corpora]
    if missing:
        raise SeapError(f"task(s) {missing} are not in {corpus_file}", f"it holds: {', '.join(corpora)}")
    with atomic_directory(out_dir, overwrite, [corpus_file, model.location]) as tmp:  # all tasks, or none
        if moe:
            from seap.model.expert_pruning import collect_router_statistics

            for task in wanted:  # (layer by layer, like the dense statistics)
                collect_router_statistics(model, corpora[task], batch_size, cap, shard, progress=progress,
                                          channels=unit not in ("auto", "experts")).save(tmp / task)
        else:
            collected = collect_task_statistics(model, {t: corpora[t] for t in wanted}, batch_size, cap,
                                                accumulate_dtype, shard, progress)
            for task, stats in collected.items():
                stats.save(tmp / task)
    return {task: Path(out_dir) / task for task in wanted}


def read_refit_corpus(files: Sequence[str | Path], tasks: Sequence[str] | None = None
                      ) -> tuple[list[CalibrationCorpus], int | None]:
    """The calibration text a refit runs on: the corpora of ``tasks`` (all, if None) from the
    first corpus file, then every corpus of the others (generic text), in order; and the first
    file's token cap."""
    if not files:
        raise SeapError("no corpus to refit on", "pass --refit-corpus FILE (from `seap corpus`)")
    parts: list[CalibrationCorpus] = []
    cap: int | None = DEFAULT_MAX_TOKENS
    for i, path in enumerate(files):
        corpora, header = read_corpus(path)
        wanted = list(tasks) if (tasks and i == 0) else list(corpora)
        missing = [t for t in wanted if t not in corpora]
        if missing:
            raise SeapError(f"task(s) {missing} are not in {path}", f"it holds: {', '.join(corpora)}")
        parts.extend(corpora[t] for t in wanted)
        if i == 0:
            cap = header.get("max_tokens", DEFAULT_MAX_TOKENS)
    return parts, cap


def merge_statistics_folders(inputs: Sequence[str | Path], out: str | Path, task: str | None = None, overwrite: bool = False) -> Path:
    """Merge statistics folders (shards, or tasks into a pooled one) exactly; each input once."""
    check_output(out, list(inputs), overwrite)
    seen: dict[Path, str] = {}
    for folder in inputs:
        key = Path(folder).resolve()
        if key in seen:
            raise SeapError(f"{folder} is given twice: merging it twice would double its counts",
                            "pass each statistics folder once")
        seen[key] = str(folder)
    from seap.io import sha256_file
    from seap.maths.statistics import STATS_ARTIFACT

    parts = [ActivationStatistics.load(p) for p in inputs]  # (verified: the checksum below is the stored one)
    digests = [sha256_file(Path(p) / STATS_ARTIFACT.tensors_file) for p in inputs]
    for i, digest in enumerate(digests):
        if digest in digests[:i]:
            raise SeapError(f"{inputs[i]} holds the same statistics as {inputs[digests.index(digest)]}: merging them "
                            "would count the same tokens twice", "pass each statistics folder once")
    return merge_statistics(parts, task).save(out, overwrite=overwrite)


def make_scores(stats_dir: str | Path, out: str | Path, score: str = DEFAULT_SCORE, overwrite: bool = False) -> Path:
    check_output(out, [stats_dir], overwrite)
    return compute_scores(ActivationStatistics.load(stats_dir), score).save(out, overwrite=overwrite)


def parse_weights(items: Sequence[str] | None) -> dict[str, float]:
    """``["wikitext=3", "boolq=2"]`` -> ``{"wikitext": 3.0, "boolq": 2.0}``."""
    weights: dict[str, float] = {}
    for item in items or []:
        task, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[task.strip()] = float(value)
        except ValueError:
            raise SeapError(f"bad weight {item!r}", "write weights as TASK=NUMBER, e.g. wikitext=3") from None
    return weights


def make_mask(
    scores_dirs: Sequence[str | Path],
    out: str | Path,
    params: MaskParams,
    bias_stats_dir: str | Path | None = None,
    overwrite: bool = False,
    refit_model: Any = None,
    refit_parts: Sequence[CalibrationCorpus] = (),
    refit_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    refit_batch_size: int = 8,
    router_stats_dirs: Sequence[str | Path] = (),
) -> Mask:
    """``seap masks``: the mask ``params`` describe (:func:`seap.run.mask_building.build_method_mask`,
    the function every front door builds masks with), from scores folders (an expert: one;
    the general mask: several, combined), or from router statistics folders of a
    mixture-of-experts model (``params.moe``; several are merged), written to ``out``.

    ``bias_stats_dir`` stores those statistics' means in the mask (FLAP's bias compensation).
    With ``params.refit``, the mask is refitted on ``refit_model`` (the base: a model folder,
    read layer by layer, or a loaded model) and the calibration text ``refit_parts`` (merged in
    order; texts truncated to ``refit_max_tokens``)."""
    check_sparsity(params.sparsity)
    check_schedule(params.schedule)
    if params.gqa_mode:
        check_gqa_mode(params.gqa_mode)
    refit_options(params.refit)  # (bad values: a clear error before anything is read)
    if params.refit is not None and (refit_model is None or not refit_parts):
        raise SeapError("reconstruction runs the calibration text through the base model, and one of them is missing",
                        "pass --model (the base) and --refit-corpus FILE (from `seap corpus`)")
    check_compensation(params.refit is not None, bias_stats_dir, "--bias-compensation-stats")
    check_output(out, [*scores_dirs, *router_stats_dirs, bias_stats_dir,
                       getattr(refit_model, "location", refit_model)], overwrite)
    if params.moe:
        from seap.maths.expert_selection import RouterStatistics

        if not router_stats_dirs:
            raise SeapError("no router statistics given", "pass --stats DIR (from `seap stats` on the MoE model)")
        parts = [RouterStatistics.load(p) for p in router_stats_dirs]
        if len(parts) > 1 and params.kind == "expert":
            raise SeapError("several statistics folders given for an expert mask",
                            "pass one, or --general for the general mask")
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        mask = build_method_mask(params, router_statistics=merged)
        mask.save(out, overwrite=overwrite)
        return mask
    if not scores_dirs:
        raise SeapError("no scores given", "pass at least one scores folder")
    if len(scores_dirs) > 1 and params.kind == "expert":
        raise SeapError("several scores folders given for an expert mask", "pass one, or --general for the general mask")
    scores = [ImportanceScores.load(p) for p in scores_dirs]
    bias = ActivationStatistics.load(bias_stats_dir) if bias_stats_dir else None
    refit = RefitSource(refit_model, refit_parts, refit_max_tokens, refit_batch_size) \
        if params.refit is not None else None
    mask = build_method_mask(params, scores=scores, bias_statistics=bias, refit=refit)
    mask.save(out, overwrite=overwrite)
    return mask


__all__ = ["ONESHOT_METHODS", "make_corpus",
           "make_mask", "make_scores", "make_statistics", "merge_statistics_folders", "parse_weights",
           "read_refit_corpus"]
