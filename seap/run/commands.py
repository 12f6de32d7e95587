"""The commands that make one artifact at a time (``seap corpus``, ``stats``, ``merge-stats``,
``scores``, ``masks``) and the one-shot ``seap prune``, as the CLI runs them.

Each reads its inputs from paths, calls the engine and writes one artifact. The pipeline
(:mod:`seap.run.plan`) builds the same artifacts through :mod:`seap.run.stages`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.maths.statistics import ActivationStatistics, merge_statistics
from seap.model.calibration import collect_statistics
from seap.data.corpus import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLES_PER_TASK,
    DEFAULT_SEED,
    CalibrationCorpus,
    corpora_from_records,
    read_corpus,
    read_records,
    write_corpus,
)
from seap.errors import SeapError
from seap.io import atomic_directory, check_output
from seap.maths.geometry import DEFAULT_GQA_MODE, check_gqa_mode
from seap.maths.masks import PruningMask, build_mask
from seap.model.loaded import LoadedModel
from seap.model.loading import load_model
from seap.model.surgery import apply_mask
from seap.model.checkpoint import save_pruned
from seap.maths.schedules import DEFAULT_SCHEDULE, check_schedule, check_sparsity
from seap.maths.scores import DEFAULT_SCORE, ImportanceScores, combine_scores, compute_scores, get_score
from seap.data.starter import starter_calibration_records
from seap.run.methods import METHODS, SEAP_SCHEDULE, SEAP_SCORE, Method, check_compensation, get_method

BUILTIN_CALIBRATION = "builtin"


def resolve_method(method: str, tasks: int, score: str | None = None, schedule: str | None = None,
                   bias_compensation: bool | None = None) -> tuple[Method, str, str, bool]:
    """The method-table entry of a one-shot prune and its score, schedule and bias compensation
    (explicit options override the entry). ``seap`` means the SEAP expert for one task and the
    SEAP general mask for several."""
    if method == "seap":
        method = "seap-expert" if tasks == 1 else "seap-general"
    entry = get_method(method)
    if not entry.builds_masks:
        raise SeapError(f"method {method!r} builds no mask of its own", "prune with seap, wanda-sp or flap")
    resolved_score = score or entry.resolved_score(SEAP_SCORE)
    resolved_schedule = schedule or entry.resolved_schedule(SEAP_SCHEDULE)
    get_score(resolved_score)
    check_schedule(resolved_schedule)
    return entry, resolved_score, resolved_schedule, entry.bias_compensation if bias_compensation is None else bias_compensation


ONESHOT_METHODS = ("seap", *(name for name, m in METHODS.items() if m.builds_masks))


def load_calibration_records(source: str) -> list[dict[str, Any]]:
    """Records from a JSON/JSONL file, or the built-in starter suite for ``"builtin"``."""
    if source == BUILTIN_CALIBRATION:
        return starter_calibration_records()
    return read_records(source)


def source_path(loaded: LoadedModel) -> str:
    """Where a loaded model came from, as the user gave it (``local:/m`` -> ``/m``)."""
    return loaded.source.split("+", 1)[0].split(":", 1)[-1]


def build_corpora(
    source: str,
    tasks: Sequence[str] | None = None,
    samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
) -> dict[str, CalibrationCorpus]:
    """Calibration corpora per task from a records file (``"task"`` field, else the file name)."""
    records = load_calibration_records(source)
    default_task = "builtin" if source == BUILTIN_CALIBRATION else Path(source).stem
    return corpora_from_records(records, default_task, samples, seed, tasks, source=source)


def make_corpus(source: str, out: str | Path, tasks: Sequence[str] | None = None,
                 samples: int | None = DEFAULT_SAMPLES_PER_TASK, seed: int = DEFAULT_SEED,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS, overwrite: bool = False) -> dict[str, CalibrationCorpus]:
    """The calibration corpora of ``source``'s records, written to the corpus file ``out``
    (never over ``source``; an existing corpus only with ``overwrite``)."""
    check_output(out, [source], overwrite, file=True)
    corpora = build_corpora(source, tasks, samples, seed)
    write_corpus(out, corpora, max_tokens=max_tokens)
    return corpora


def make_statistics(loaded: LoadedModel, corpus_file: str | Path, out_dir: str | Path, tasks: Sequence[str] | None = None,
                batch_size: int = 8, max_tokens: int | None = None, shard: tuple[int, int] | None = None,
                accumulate_dtype: str = "float64", overwrite: bool = False, progress: bool = True,
                second_moments: bool = False) -> dict[str, Path]:
    """Statistics for every task of a corpus file, one folder per task under ``out_dir`` (with
    ``second_moments``: also what reconstruction needs)."""
    corpora, header = read_corpus(corpus_file)
    cap = max_tokens if max_tokens is not None else header.get("max_tokens", DEFAULT_MAX_TOKENS)
    wanted = list(tasks) if tasks else list(corpora)
    missing = [t for t in wanted if t not in corpora]
    if missing:
        raise SeapError(f"task(s) {missing} are not in {corpus_file}", f"it holds: {', '.join(corpora)}")
    with atomic_directory(out_dir, overwrite, [corpus_file, source_path(loaded)]) as tmp:  # all tasks, or none
        for task in wanted:
            stats = collect_statistics(loaded, corpora[task], batch_size, cap, accumulate_dtype, shard, progress,
                                       second_moments=second_moments, spill_dir=tmp / f".spill-{task}")
            stats.save(tmp / task)
            shutil.rmtree(tmp / f".spill-{task}", ignore_errors=True)
    return {task: Path(out_dir) / task for task in wanted}


def read_refit_corpus(files: Sequence[str | Path], tasks: Sequence[str] | None = None
                      ) -> tuple[CalibrationCorpus, int | None]:
    """The calibration text a sequential refit runs on: the texts of ``tasks`` (all, if None)
    from the first corpus file, and every text of the others (generic text), in one corpus;
    and the first file's token cap."""
    from seap.data.corpus import merge_corpora

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
    return merge_corpora(parts), cap


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
    sparsity: float,
    schedule: str = DEFAULT_SCHEDULE,
    general: bool = False,
    weights: Mapping[str, float] | None = None,
    gqa_mode: str = DEFAULT_GQA_MODE,
    bias_stats_dir: str | Path | None = None,
    overwrite: bool = False,
    method: str | None = None,
    refit_model: LoadedModel | None = None,
    refit_stats_dir: str | Path | Sequence[str | Path] | None = None,
    refit_options: Mapping[str, Any] | None = None,
    refit_corpus: CalibrationCorpus | None = None,
    refit_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    **schedule_options: Any,
) -> PruningMask:
    """An expert mask from one task's scores, or the general mask from several (``general``).

    ``bias_stats_dir`` stores those statistics' means in the mask, so applying it adds FLAP's
    bias compensation; ``method`` records the method-table entry the mask was built for. With
    ``refit_model`` (the base) and ``refit_stats_dir`` (statistics with second moments; several
    folders are merged exactly, e.g. a task's and generic text's), the mask is reconstructed
    (:func:`seap.model.refitting.reconstruct_mask`, ``refit_options`` of
    :class:`~seap.maths.reconstruction.RefitOptions`). With ``sequential`` refit options it is
    refitted layer by layer on ``refit_corpus`` (texts, truncated to ``refit_max_tokens``) instead."""
    check_sparsity(sparsity)
    check_schedule(schedule)
    check_gqa_mode(gqa_mode)
    options = _refit_options(refit_options)
    refit_dirs = [] if refit_stats_dir is None else \
        [refit_stats_dir] if isinstance(refit_stats_dir, (str, Path)) else list(refit_stats_dir)
    if options.sequential:
        if refit_model is None or refit_corpus is None or refit_dirs:
            raise SeapError("the sequential refit needs the base model and the calibration text (not statistics)",
                            "pass --model and --refit-corpus (a corpus file from `seap corpus`)")
    elif (refit_model is None) != (not refit_dirs):
        raise SeapError("reconstruction needs both the base model and statistics with second moments",
                        "pass --model and --refit-stats (statistics from `seap stats --second-moments`)")
    reconstruct = refit_model is not None
    check_compensation(reconstruct, bias_stats_dir, "--bias-compensation-stats")
    refit_parts = [ActivationStatistics.load(d) for d in refit_dirs]
    for folder, part in zip(refit_dirs, refit_parts):
        if not part.has_second_moments:
            raise SeapError(f"the statistics in {folder} have no second moments",
                            "collect them with `seap stats --second-moments` (the pipeline: --reconstruct)")
    check_output(out, [*scores_dirs, bias_stats_dir, *refit_dirs, source_path(refit_model) if refit_model else None],
                 overwrite)
    all_scores = [ImportanceScores.load(p) for p in scores_dirs]
    if not all_scores:
        raise SeapError("no scores given", "pass at least one scores folder")
    if general:
        scores = combine_scores(all_scores, weights)
    elif len(all_scores) == 1:
        scores = all_scores[0]
    else:
        raise SeapError("several scores folders given for an expert mask", "pass one, or --general for the general mask")
    bias_stats = ActivationStatistics.load(bias_stats_dir) if bias_stats_dir else None
    mask = build_mask(scores, sparsity, schedule, gqa_mode, bias_compensation_stats=bias_stats, **schedule_options)
    if method:
        mask.meta["method"] = method
    if reconstruct:
        from seap.model.refitting import refit_mask

        beside = Path(out).parent if Path(out).parent.is_dir() else None  # large second moments spill there
        with tempfile.TemporaryDirectory(dir=beside, prefix=".refit-spill-") as spill:
            refit_stats = None if not refit_parts else refit_parts[0] if len(refit_parts) == 1 else \
                merge_statistics(refit_parts, "+".join(p.task for p in refit_parts), spill_dir=spill)
            mask = refit_mask(refit_model, mask, options, refit_stats, refit_corpus,  # type: ignore[arg-type]
                              max_tokens=refit_max_tokens, progress=False)
    mask.save(out, overwrite=overwrite)
    return mask


def _refit_options(options: Mapping[str, Any] | None) -> Any:
    """:class:`RefitOptions` from a mapping (missing keys keep their defaults); a clear error for bad values."""
    from seap.maths.reconstruction import RefitOptions

    try:
        return RefitOptions(**dict(options or {}))
    except (TypeError, ValueError) as exc:
        raise SeapError(f"bad reconstruction options: {exc}",
                       "alpha >= 0, prior slice or zero, bias and sequential true or false") \
            from None


@dataclass
class PruneResult:
    """What ``seap prune`` did."""

    out_dir: Path
    mask: PruningMask
    target_sparsity: float
    realised_sparsity: float
    dense_params: int
    pruned_params: int
    tasks: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        m = self.mask.meta
        lines = [
            f"pruned model:      {self.out_dir}",
            f"mask:              {m['kind']} ({', '.join(self.tasks)}), score {m['score']}, schedule {m['schedule']}, "
            f"GQA mode {m['gqa_mode']}",
            f"target sparsity:   {self.target_sparsity:.4f}",
            f"realised sparsity: {self.realised_sparsity:.4f} of prunable weights "
            f"({self.dense_params:,} -> {self.pruned_params:,})",
            "per layer:         " + " ".join(f"{layer['realised']:.2f}" for layer in m["layers"]),
            "timings (s):       " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()),
        ]
        return lines


def prune(
    model: str | LoadedModel,
    calib: str,
    sparsity: float,
    out: str | Path,
    method: str = "seap",
    score: str | None = None,
    schedule: str | None = None,
    bias_compensation: bool | None = None,
    gqa_mode: str = DEFAULT_GQA_MODE,
    tasks: Sequence[str] | None = None,
    samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    weights: Mapping[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = "auto",
    dtype: str | None = "auto",
    reconstruct: bool | None = None,
    refit_options: Mapping[str, Any] | None = None,
    **schedule_options: Any,
) -> PruneResult:
    """One shot: corpus -> statistics -> scores -> mask -> hard pruning -> saved model.

    ``method`` is an entry of the method table (:data:`seap.run.methods.METHODS`) that builds
    masks, or ``seap``: the SEAP expert with one task in the calibration data (or ``tasks``
    selecting one), the SEAP general mask (weighted sum of task scores) with several. Pooled
    methods (Wanda-sp, FLAP) score the statistics of all tasks merged. With ``reconstruct`` the
    statistics pass also collects second moments and the mask is refitted on the same
    calibration text (``refit_options``: :class:`~seap.maths.reconstruction.RefitOptions`
    fields); reconstruction replaces bias compensation. ``reconstruct=None`` takes the run
    configuration's default (:attr:`seap.run.config.RunConfig.reconstruct`, on), unless
    ``bias_compensation=True`` asks for the compensation it replaces. Everything is validated
    before the model is loaded.
    """
    if reconstruct is None:
        from seap.run.config import RunConfig

        reconstruct = RunConfig.reconstruct and bias_compensation is not True
    sparsity = check_sparsity(sparsity)
    check_compensation(reconstruct, bias_compensation, "--bias-compensation")
    options = _refit_options(refit_options) if reconstruct else None
    if method != "seap":
        get_method(method)
    check_gqa_mode(gqa_mode)
    out = Path(out)
    check_output(out, [model if not isinstance(model, LoadedModel) else source_path(model),
                       None if calib == BUILTIN_CALIBRATION else calib], overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpora = build_corpora(calib, tasks, samples, seed)
    entry, score_name, schedule_name, compensate = resolve_method(method, len(corpora), score, schedule,
                                                                  bias_compensation)
    compensate = compensate and not reconstruct
    if entry.calibration == "task" and len(corpora) > 1:
        raise SeapError(f"an expert is built from one task, and {calib} holds {len(corpora)}",
                        "pass --task NAME, or use --method seap for the general mask")
    owned = not isinstance(model, LoadedModel)  # a model we loaded ourselves may be pruned in place
    loaded = load_model(model, device=device, dtype=dtype) if owned else model
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    second = options is not None and not options.sequential  # what the one-shot refit reads
    stats = {t: collect_statistics(loaded, c, batch_size, max_tokens, progress=progress, second_moments=second)
             for t, c in corpora.items()}
    timings["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = next(iter(stats.values())) if len(stats) == 1 else merge_statistics(list(stats.values()), "pooled")
    if entry.calibration == "pooled":
        scores = compute_scores(merged, score_name)
    else:
        task_scores = [compute_scores(s, score_name) for s in stats.values()]
        scores = task_scores[0] if len(task_scores) == 1 else combine_scores(task_scores, weights)
    mask = build_mask(scores, sparsity, schedule_name, gqa_mode, bias_compensation_stats=merged if compensate else None,
                      base_source=loaded.source, **schedule_options)
    mask.meta["method"] = entry.name
    timings["scores+mask"] = time.perf_counter() - t0
    if options is not None:
        from seap.data.corpus import merge_corpora
        from seap.model.refitting import refit_mask

        t0 = time.perf_counter()
        mask = refit_mask(loaded, mask, options, merged, merge_corpora(list(corpora.values())), batch_size,
                          max_tokens, progress)
        timings["refit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = loaded.adapter.geometry(loaded.model).total_params()
    pruned = apply_mask(loaded, mask, "hard", inplace=owned)
    save_pruned(pruned, out, mask, overwrite=overwrite)
    timings["prune+save"] = time.perf_counter() - t0
    kept = pruned.adapter.geometry(pruned.model).total_params()
    return PruneResult(out, mask, sparsity, 1 - kept / dense, dense, kept, list(corpora), timings)
