"""Stage functions shared by the CLI, the DVC stages and the Prefect tasks.

Each function reads its inputs from paths, calls the pure engine and writes one artifact,
so every front end runs exactly the same code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collect import ActivationStatistics, collect_statistics, merge_statistics
from .corpus import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLES_PER_TASK,
    DEFAULT_SEED,
    CalibrationCorpus,
    corpora_from_records,
    read_corpus,
    read_records,
    write_corpus,
)
from .errors import SeapError
from .geometry import DEFAULT_GQA_MODE, check_gqa_mode
from .masks import PruningMask, build_mask
from .models import LoadedModel, load_model
from .prune import apply_mask
from .pruned import save_pruned
from .schedules import DEFAULT_SCHEDULE, check_schedule, check_sparsity
from .scores import DEFAULT_SCORE, ImportanceScores, combine_scores, compute_scores, get_score
from .starter import starter_calibration_records

BUILTIN_CALIBRATION = "builtin"


@dataclass(frozen=True)
class MethodPreset:
    """A method's original score, schedule and bias-compensation setting."""

    score: str
    schedule: str
    bias_compensation: bool


METHODS: dict[str, MethodPreset] = {
    "seap": MethodPreset("seap-sf", "logistic", False),
    "wanda-sp": MethodPreset("wanda-sp", "uniform", False),
    "flap": MethodPreset("flap", "flap-adaptive", True),
}


def resolve_method(method: str, score: str | None, schedule: str | None, bias_compensation: bool | None) -> MethodPreset:
    """A preset with any explicit option overriding it; validates every name."""
    if method not in METHODS:
        raise SeapError(f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    preset = METHODS[method]
    resolved = MethodPreset(
        score or preset.score,
        schedule or preset.schedule,
        preset.bias_compensation if bias_compensation is None else bias_compensation,
    )
    get_score(resolved.score)
    check_schedule(resolved.schedule)
    return resolved


def check_pipeline_options(
    names: Mapping[str, str],
    *,
    tasks: Sequence[str],
    sparsities: Sequence[float],
    score: str,
    schedule: str,
    gqa_mode: str,
    baselines: Sequence[str],
    metric: str,
    router: bool,
    router_threshold: float,
) -> None:
    """The checks every pipeline front end (Prefect flow, DVC params) makes before any work.

    ``names`` maps each option to the name the user wrote (``"sparsities"`` for the flow,
    ``"masks.sparsities"`` for params.yaml); the error says ``parameter <name>: ...``.
    Task names are compared without their source prefix (``jsonl:geo`` and ``geo`` are one task).
    """
    from .experiment import BASELINES, REPORT_METRICS
    from .geometry import check_gqa_mode

    def bad(option: str, problem: str, fix: str | None) -> SeapError:
        return SeapError(f"parameter {names.get(option, option)}: {problem}", fix)

    def delegate(option: str, check: Any, value: Any) -> None:
        try:
            check(value)
        except SeapError as exc:
            raise bad(option, exc.problem, exc.fix) from None

    if not tasks:
        raise bad("tasks", "no tasks given", "list at least one task")
    stripped = [t.rpartition(":")[2] for t in tasks]
    if len(set(stripped)) != len(stripped):
        raise bad("tasks", f"a task is named twice: {list(tasks)}", "list each task once")
    if not sparsities:
        raise bad("sparsities", "no sparsity given", "e.g. [0.2, 0.5]")
    for s in sparsities:
        delegate("sparsities", check_sparsity, s)
        if s == 0:
            raise bad("sparsities", "0 is the dense model, which is always evaluated", "drop 0")
    if len({f"{s:g}" for s in sparsities}) != len(sparsities):
        raise bad("sparsities", f"a sparsity is listed twice: {list(sparsities)}", "list each sparsity once")
    delegate("score", get_score, score)
    delegate("schedule", check_schedule, schedule)
    delegate("gqa_mode", check_gqa_mode, gqa_mode)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise bad("baselines", f"unknown baseline(s) {unknown}", f"use any of: {', '.join(BASELINES)}")
    if len(set(baselines)) != len(baselines):
        raise bad("baselines", "a baseline is listed twice", "list each baseline once")
    if metric not in REPORT_METRICS:
        raise bad("metric", f"unknown metric {metric!r}", f"use one of: {', '.join(REPORT_METRICS)}")
    if not 0 <= router_threshold <= 1:
        raise bad("router_threshold", f"must be in [0, 1], got {router_threshold}", "e.g. 0.5")
    if router and len(tasks) < 2:
        raise bad("router", "a router needs at least two tasks", f"add tasks, or turn {names.get('router', 'router')} off")


def load_calibration_records(source: str) -> list[dict[str, Any]]:
    """Records from a JSON/JSONL file, or the built-in starter suite for ``"builtin"``."""
    if source == BUILTIN_CALIBRATION:
        return starter_calibration_records()
    return read_records(source)


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


def corpus_stage(source: str, out: str | Path, tasks: Sequence[str] | None = None,
                 samples: int | None = DEFAULT_SAMPLES_PER_TASK, seed: int = DEFAULT_SEED,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict[str, CalibrationCorpus]:
    corpora = build_corpora(source, tasks, samples, seed)
    write_corpus(out, corpora, max_tokens=max_tokens)
    return corpora


def stats_stage(loaded: LoadedModel, corpus_file: str | Path, out_dir: str | Path, tasks: Sequence[str] | None = None,
                batch_size: int = 8, max_tokens: int | None = None, shard: tuple[int, int] | None = None,
                accumulate_dtype: str = "float64", overwrite: bool = False, progress: bool = True) -> dict[str, Path]:
    """Statistics for every task of a corpus file, one folder per task under ``out_dir``."""
    corpora, header = read_corpus(corpus_file)
    cap = max_tokens if max_tokens is not None else header.get("max_tokens", DEFAULT_MAX_TOKENS)
    wanted = list(tasks) if tasks else list(corpora)
    missing = [t for t in wanted if t not in corpora]
    if missing:
        raise SeapError(f"task(s) {missing} are not in {corpus_file}", f"it holds: {', '.join(corpora)}")
    written = {}
    for task in wanted:
        stats = collect_statistics(loaded, corpora[task], batch_size, cap, accumulate_dtype, shard, progress)
        written[task] = stats.save(Path(out_dir) / task, overwrite=overwrite)
    return written


def merge_stats_stage(inputs: Sequence[str | Path], out: str | Path, task: str | None = None, overwrite: bool = False) -> Path:
    return merge_statistics([ActivationStatistics.load(p) for p in inputs], task).save(out, overwrite=overwrite)


def scores_stage(stats_dir: str | Path, out: str | Path, score: str = DEFAULT_SCORE, overwrite: bool = False) -> Path:
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


def mask_stage(
    scores_dirs: Sequence[str | Path],
    out: str | Path,
    sparsity: float,
    schedule: str = DEFAULT_SCHEDULE,
    general: bool = False,
    weights: Mapping[str, float] | None = None,
    gqa_mode: str = DEFAULT_GQA_MODE,
    bias_stats_dir: str | Path | None = None,
    overwrite: bool = False,
    **schedule_options: Any,
) -> PruningMask:
    """An expert mask from one task's scores, or the general mask from several (``general``)."""
    check_sparsity(sparsity)
    check_schedule(schedule)
    check_gqa_mode(gqa_mode)
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
    mask.save(out, overwrite=overwrite)
    return mask


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
    **schedule_options: Any,
) -> PruneResult:
    """One shot: corpus -> statistics -> scores -> mask -> hard pruning -> saved model.

    With one task in the calibration data the mask is that task's expert; with several it
    is the general mask (weighted sum of task scores) unless ``tasks`` selects one.
    Everything is validated before the model is loaded.
    """
    sparsity = check_sparsity(sparsity)
    preset = resolve_method(method, score, schedule, bias_compensation)
    check_gqa_mode(gqa_mode)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SeapError(f"output {out} already exists", "choose another --out, or pass --overwrite")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpora = build_corpora(calib, tasks, samples, seed)
    owned = not isinstance(model, LoadedModel)  # a model we loaded ourselves may be pruned in place
    loaded = load_model(model, device=device, dtype=dtype) if owned else model
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = {t: collect_statistics(loaded, c, batch_size, max_tokens, progress=progress) for t, c in corpora.items()}
    timings["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    task_scores = [compute_scores(s, preset.score) for s in stats.values()]
    scores = task_scores[0] if len(task_scores) == 1 else combine_scores(task_scores, weights)
    bias_stats = None
    if preset.bias_compensation:  # a general mask compensates with the pooled means of all its tasks
        bias_stats = next(iter(stats.values())) if len(stats) == 1 else merge_statistics(list(stats.values()), "general")
    mask = build_mask(scores, sparsity, preset.schedule, gqa_mode, bias_compensation_stats=bias_stats,
                      base_source=loaded.source, **schedule_options)
    mask.meta["method"] = method
    timings["scores+mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = loaded.adapter.geometry(loaded.model).total_params()
    pruned = apply_mask(loaded, mask, "hard", bias_compensation=preset.bias_compensation, inplace=owned)
    save_pruned(pruned, out, mask, overwrite=overwrite)
    timings["prune+save"] = time.perf_counter() - t0
    kept = pruned.adapter.geometry(pruned.model).total_params()
    return PruneResult(out, mask, sparsity, 1 - kept / dense, dense, kept, list(corpora), timings)


# ---------------------------------------------------------------------------------------
# task-registry stages (the pipeline's corpus and evaluation steps)


def task_corpus_stage(tasks: Sequence[str], out: str | Path, data_dir: str | Path | None = None,
                      samples: int | None = DEFAULT_SAMPLES_PER_TASK, seed: int = DEFAULT_SEED,
                      max_tokens: int | None = DEFAULT_MAX_TOKENS, work_dir: str | Path | None = None,
                      ) -> dict[str, CalibrationCorpus]:
    """Calibration corpora of registry tasks (their train splits) written to one corpus file."""
    from .corpus import build_corpus
    from .tasks import TaskRegistry

    registry = TaskRegistry(data_dir, work_dir)
    specs = registry.resolve(list(tasks))
    corpora = {s.name: build_corpus(s.calibration_records(), s.name, samples, seed, source=s.source) for s in specs}
    write_corpus(out, corpora, max_tokens=max_tokens)
    return corpora


def evaluate_stage(
    model: str | LoadedModel,
    tasks: Sequence[str],
    out: str | Path,
    method: str = "dense",
    sparsity: float = 0.0,
    masks: Mapping[str, str | Path] | None = None,
    bias_compensation: bool = False,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    metric: str = "acc",
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate one table row and write it as JSON: the dense model (no ``masks``), a general
    mask (``{"general": dir}``) on every task, or experts (``{task: dir}``), each on its task."""
    from .experiment import evaluate_masks
    from .io import atomic_write_json
    from .masks import PruningMask
    from .tasks import TaskRegistry

    registry = TaskRegistry(data_dir, work_dir)
    specs = registry.resolve(list(tasks))
    loaded_masks = {name: PruningMask.load(path) for name, path in (masks or {}).items()}
    loaded = load_model(model) if isinstance(model, str) else model
    row = evaluate_masks(loaded, registry, specs, method, sparsity, loaded_masks, bias_compensation, limit,
                         num_fewshot, batch_size, metric)
    row["model_fingerprint"] = loaded.fingerprint
    row["masks"] = {name: m.digest() for name, m in loaded_masks.items()}
    atomic_write_json(out, row)
    return row


def _registry(data_dir: str | Path | None, work_dir: str | Path | None, tasks: Sequence[str]) -> tuple[Any, list[Any]]:
    from .tasks import TaskRegistry

    registry = TaskRegistry(data_dir, work_dir)
    return registry, registry.resolve(list(tasks))


def router_stage(model: str | LoadedModel, tasks: Sequence[str], out: str | Path, data_dir: str | Path | None = None,
                 prompts_per_task: int = 500, feature_layer: int = 0, seed: int = DEFAULT_SEED, threshold: float = 0.5,
                 work_dir: str | Path | None = None, overwrite: bool = False) -> Any:
    """Train the task router on the tasks' training prompts and save it (tensors + JSON)."""
    from .evaluation import training_prompts
    from .router import train_router

    registry, specs = _registry(data_dir, work_dir, tasks)
    loaded = load_model(model) if isinstance(model, str) else model
    router = train_router(loaded, training_prompts(registry, specs, prompts_per_task, seed), feature_layer, seed=seed,
                          threshold=threshold)
    router.save(out, overwrite=overwrite)
    return router


def routed_evaluate_stage(model: str | LoadedModel, tasks: Sequence[str], out: str | Path, sparsity: float,
                          experts: Mapping[str, str | Path], general: str | Path | None, router: str | Path,
                          data_dir: str | Path | None = None, limit: int | None = None, num_fewshot: int = 0,
                          batch_size: int = 16, metric: str = "acc", threshold: float | None = None,
                          work_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``seap-routed`` row (router picks the expert per input) written as JSON."""
    from .experiment import evaluate_routed, router_info
    from .io import atomic_write_json
    from .router import Router

    registry, specs = _registry(data_dir, work_dir, tasks)
    loaded_router = Router.load(router)
    expert_masks = {name: PruningMask.load(path) for name, path in experts.items()}
    general_mask = PruningMask.load(general) if general else None
    loaded = load_model(model) if isinstance(model, str) else model
    row = evaluate_routed(loaded, registry, specs, sparsity, expert_masks, general_mask, loaded_router, limit,
                          num_fewshot, batch_size, metric, threshold)
    row["model_fingerprint"] = loaded.fingerprint
    row["masks"] = {name: m.digest() for name, m in expert_masks.items()}
    if general_mask is not None:
        row["masks"]["general"] = general_mask.digest()
    row["router"] = router_info(loaded_router)
    atomic_write_json(out, row)
    return row


def shape_signature(mask: PruningMask) -> tuple[tuple[int, int, int], ...]:
    """Per-layer kept (heads, kv heads, channels): masks with equal signatures run at the same speed."""
    return tuple((g.num_heads, g.num_kv_heads, g.intermediate_size) for g in mask.kept_geometry().layers)


def bench_stage(model: str | LoadedModel, masks: Mapping[str, str | Path], out: str | Path,
                bias_compensation: Mapping[str, bool] | None = None, repeats: int = 3,
                prefill_batch_size: int = 8, prefill_tokens: int = 128, decode_tokens: int = 64) -> dict[str, Any]:
    """Dense against every mask's hard-pruned model, in one run on the same prompts.

    Masks that prune to the same per-layer shapes (for example the experts and the general
    mask of one logistic schedule) are timed once; the others reuse that measurement and say so
    (``same_shapes_as``).
    """
    from .bench import benchmark
    from .io import atomic_write_json

    loaded = load_model(model) if isinstance(model, str) else model
    loaded_masks = {name: PruningMask.load(path) for name, path in masks.items()}
    representative: dict[tuple[Any, ...], str] = {}
    alias: dict[str, str] = {}
    for name, mask in loaded_masks.items():
        rep = representative.setdefault(shape_signature(mask), name)
        alias[name] = rep
    comp = dict(bias_compensation or {})
    models = {"dense": loaded}
    for name in dict.fromkeys(alias.values()):
        models[name] = apply_mask(loaded, loaded_masks[name], "hard", bias_compensation=comp.get(name, False))
    result = benchmark(models, prefill_batch_size, prefill_tokens, decode_tokens, repeats=repeats)
    for name, rep in alias.items():
        if name != rep:
            result["models"][name] = {**result["models"][rep], "same_shapes_as": rep}
    atomic_write_json(out, result)
    return result


def summary_stage(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, config: Mapping[str, Any],
                  tasks: Sequence[str], data_dir: str | Path | None = None, limit: int | None = None,
                  metric: str = "acc", num_fewshot: int = 0, router: str | Path | None = None,
                  speed: Mapping[str, Any] | None = None, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Assemble evaluated rows into the results (Table 1 layout, plot, JSON) and save them."""
    from .evaluation import data_fingerprint, lm_eval_version
    from .experiment import router_info, save_results
    from .router import Router

    _, specs = _registry(data_dir, work_dir, tasks)
    results: dict[str, Any] = {
        "config": dict(config),
        "model_fingerprint": next((r.get("model_fingerprint") for r in rows if r.get("model_fingerprint")), None),
        "lm_eval_version": lm_eval_version(),
        "data_fingerprint": data_fingerprint(specs, limit, num_fewshot),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "tasks": [s.describe() for s in specs],
        "metric": metric,
        "rows": [dict(r) for r in rows],
        "router": router_info(Router.load(router)) if router else None,
    }
    if speed:
        results["speed"] = dict(speed)
    save_results(results, out_dir)
    return results


def register_stage(results: str | Path | Mapping[str, Any], masks: Mapping[str, Mapping[str, str | Path]],
                   registry_dir: str | Path, router: str | Path | None = None, score: str = DEFAULT_SCORE,
                   schedule: str = DEFAULT_SCHEDULE) -> list[dict[str, Any]]:
    """Register every SEAP expert, general mask and routed bundle of a run in the local
    registry folder (the MLflow registry takes the same records); returns what was written."""
    from .io import read_json
    from .registry import expert_records, register_locally

    data = read_json(results, "results file") if isinstance(results, (str, Path)) else results
    records = expert_records(data, masks, router, score, schedule)
    written = register_locally(records, registry_dir)
    return [{"name": r.name, "version": p.name, "path": str(p), "tags": r.tags} for r, p in zip(records, written)]
