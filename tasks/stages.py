"""Prefect tasks for the pipeline stages.

Each task calls the same library function as the CLI and the DVC stages, takes and returns
only paths and content hashes (an :class:`ArtifactRef`), and is cached on the *content* of
its inputs: the cache key hashes the stage name, its parameters, the files it reads and the
source of the library modules it runs (:func:`seap.contenthash.stage_key`). A second run
with the same inputs and work folder is served from the cache in any process (each work folder
has its own cache, so a hit never points into another one); changing one parameter
re-runs only the stages that depend on it.

Outputs are content-addressed: a stage writes ``<workdir>/<stage>/<key>/`` atomically, so
an interrupted run leaves no partial output, a restarted run resumes from the finished
stages, and concurrent runs with the same inputs agree on one result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from typing_extensions import TypedDict  # pydantic validates flow parameters typed with it on Python < 3.12

from seap.contenthash import stage_key, tree_digest
from seap.errors import SeapError
from seap.io import atomic_directory

RETRIES = 2  # transient I/O (network filesystems, object stores)
CACHE_EXPIRATION = timedelta(days=90)


class ArtifactRef(TypedDict):
    """What tasks pass around: where an artifact is and the hash of its content."""

    path: str
    digest: str


def ref(path: str | Path) -> ArtifactRef:
    return {"path": str(path), "digest": tree_digest(path)}


_EVAL = ("seap.evaluation", "seap.experiment", "seap.tasks", "seap.prune", "seap.masks", "seap.pipeline")
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "corpus": ("seap.corpus", "seap.starter", "seap.pipeline"),
    "task-corpus": ("seap.corpus", "seap.starter", "seap.tasks", "seap.pipeline"),
    "evaluate": _EVAL,
    "router": ("seap.router", "seap.evaluation", "seap.tasks", "seap.pipeline"),
    "evaluate-routed": (*_EVAL, "seap.router", "seap.routing"),
    "bench": ("seap.bench", "seap.prune", "seap.masks", "seap.pipeline"),
    "statistics-shard": ("seap.collect", "seap.stats", "seap.hooks", "seap.corpus", "seap.adapters.base"),
    "merge-shards": ("seap.collect", "seap.stats"),
    "statistics": ("seap.collect", "seap.stats", "seap.hooks", "seap.corpus", "seap.adapters.base"),
    "merge-statistics": ("seap.collect", "seap.stats"),
    "scores": ("seap.scores", "seap.collect"),
    "masks": ("seap.masks", "seap.schedules", "seap.geometry", "seap.scores"),
    "prune": ("seap.prune", "seap.pruned", "seap.masks"),
}


def _digest_of(value: Any) -> Any:
    """Replace artifact refs (and lists of them) by their content digests."""
    if isinstance(value, dict) and set(value) == {"path", "digest"}:
        return value["digest"]
    if isinstance(value, (list, tuple)):
        return [_digest_of(v) for v in value]
    return value


def content_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn``: stage + parameters (refs by content) + stage code."""

    def key_fn(_ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
        params = {k: _digest_of(v) for k, v in parameters.items() if k not in ("workdir", "progress")}
        if parameters.get("workdir"):  # each work folder has its own cache: a hit never points into another one
            params["workdir"] = str(Path(parameters["workdir"]).resolve())
        return stage_key(stage, params, modules=STAGE_MODULES[stage])

    return key_fn


def _output_dir(workdir: str, stage: str, parameters: dict[str, Any]) -> Path:
    return Path(workdir) / stage / content_key(stage)(None, parameters)  # type: ignore[arg-type]


def _produce(out: Path, build: Callable[[Path], Any]) -> ArtifactRef:
    """Build ``out`` once: reuse a finished one, tolerate a concurrent writer of the same key."""
    if out.exists():
        return ref(out)
    try:
        build(out)
    except SeapError as exc:
        if out.exists() and "already exists" in exc.problem:  # a concurrent run finished it first
            return ref(out)
        raise
    except OSError:
        if out.exists():
            return ref(out)
        raise
    return ref(out)


def retry_transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry I/O failures only; a bad input (SeapError) fails at once."""
    try:
        state.result()
    except SeapError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: do not retry
        return False
    return False


def _stage_task(stage: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    return task(name=stage, cache_key_fn=content_key(stage), cache_expiration=CACHE_EXPIRATION,
                persist_result=True, retries=RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_transient,
                **kwargs)


_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


def cached_model(model: ArtifactRef) -> Any:
    """The loaded base model, kept once per process (keyed by its content digest), so the
    stages of one run do not reload it from disk. Stages never modify it in place."""
    from seap.models import load_model

    with _MODEL_LOCK:
        loaded = _MODEL_CACHE.get(model["digest"])
        if loaded is None:
            _MODEL_CACHE.clear()  # one base model at a time
            loaded = _MODEL_CACHE[model["digest"]] = load_model(model["path"])
        return loaded


def _check(*refs: ArtifactRef) -> None:
    for r in refs:
        if not Path(r["path"]).exists():
            raise SeapError(f"input {r['path']} of this stage is missing (deleted after it was cached?)",
                            "re-run with PREFECT_TASKS_REFRESH_CACHE=true, or restore the work folder")


@task(name="model", retries=RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def resolve_model(model: str) -> ArtifactRef:
    """A local folder for the model (fetching/converting a built-in or GGUF model once)."""
    from seap.models import resolve_model_path

    location, kind = resolve_model_path(model)
    if kind == "hub":
        return {"path": str(location), "digest": f"hub:{location}"}
    return ref(location)


@_stage_task("corpus")
def build_corpus(source: str | ArtifactRef, task_name: str | None, samples: int | None, seed: int, max_tokens: int,
                 workdir: str) -> ArtifactRef:
    """``source`` is ``"builtin"`` or the ref of a records file (so its content is in the key)."""
    from seap.pipeline import corpus_stage

    out = _output_dir(workdir, "corpus", {"source": source, "task_name": task_name, "samples": samples, "seed": seed,
                                          "max_tokens": max_tokens})
    path = source if isinstance(source, str) else source["path"]

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            corpus_stage(path, tmp / "corpus.jsonl", [task_name] if task_name else None, samples, seed, max_tokens)

    return _produce(out, build)


@_stage_task("statistics")
def collect_statistics(model: ArtifactRef, corpus: ArtifactRef, batch_size: int, workdir: str,
                       progress: bool = False) -> ArtifactRef:
    from seap.pipeline import stats_stage

    _check(corpus)
    out = _output_dir(workdir, "statistics", {"model": model, "corpus": corpus, "batch_size": batch_size})

    def build(o: Path) -> None:
        loaded = cached_model(model)
        with atomic_directory(o) as tmp:
            stats_stage(loaded, Path(corpus["path"]) / "corpus.jsonl", tmp, batch_size=batch_size, progress=progress)

    return _produce(out, build)


@_stage_task("scores")
def compute_scores(statistics: ArtifactRef, task_name: str, score: str, workdir: str) -> ArtifactRef:
    from seap.pipeline import scores_stage

    _check(statistics)
    out = _output_dir(workdir, "scores", {"statistics": statistics, "task_name": task_name, "score": score})
    return _produce(out, lambda o: scores_stage(Path(statistics["path"]) / task_name, o, score))


@_stage_task("masks")
def build_mask(scores: list[ArtifactRef], sparsity: float, schedule: str, general: bool, gqa_mode: str,
               workdir: str, bias_statistics: ArtifactRef | None = None, bias_task: str | None = None) -> ArtifactRef:
    from seap.pipeline import mask_stage

    _check(*scores)
    params = {"scores": scores, "sparsity": sparsity, "schedule": schedule, "general": general, "gqa_mode": gqa_mode,
              "bias_statistics": bias_statistics, "bias_task": bias_task}
    out = _output_dir(workdir, "masks", params)
    bias_dir = Path(bias_statistics["path"]) / bias_task if bias_statistics and bias_task else None
    return _produce(out, lambda o: mask_stage([s["path"] for s in scores], o, sparsity, schedule, general,
                                              gqa_mode=gqa_mode, bias_stats_dir=bias_dir))


@_stage_task("prune")
def prune_model(model: ArtifactRef, mask: ArtifactRef, bias_compensation: bool, workdir: str) -> ArtifactRef:
    from seap.masks import PruningMask
    from seap.prune import apply_mask
    from seap.pruned import save_pruned

    _check(mask)
    out = _output_dir(workdir, "prune", {"model": model, "mask": mask, "bias_compensation": bias_compensation})

    def build(o: Path) -> None:
        m = PruningMask.load(mask["path"])
        save_pruned(apply_mask(cached_model(model), m, "hard", bias_compensation), o, m)

    return _produce(out, build)


@_stage_task("task-corpus")
def build_task_corpus(tasks: list[str], data: ArtifactRef | None, samples: int | None, seed: int, max_tokens: int,
                      workdir: str) -> ArtifactRef:
    """Calibration corpus of registry tasks (train splits); ``data`` is the ref of the data folder."""
    from seap.pipeline import task_corpus_stage

    out = _output_dir(workdir, "task-corpus", {"tasks": tasks, "data": data, "samples": samples, "seed": seed,
                                               "max_tokens": max_tokens})

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            task_corpus_stage(tasks, tmp / "corpus.jsonl", data["path"] if data else None, samples, seed, max_tokens,
                              Path(workdir) / "task-files")

    return _produce(out, build)


@_stage_task("merge-statistics")
def merge_task_statistics(statistics: ArtifactRef, tasks: list[str], workdir: str) -> ArtifactRef:
    """The pooled statistics of several tasks (what the task-agnostic baselines calibrate on)."""
    from seap.pipeline import merge_stats_stage

    _check(statistics)
    out = _output_dir(workdir, "merge-statistics", {"statistics": statistics, "tasks": tasks})
    def build(o: Path) -> None:  # laid out like `statistics`: one sub-folder, "pooled"
        with atomic_directory(o) as tmp:
            merge_stats_stage([Path(statistics["path"]) / t for t in tasks], tmp / "pooled", "pooled")

    return _produce(out, build)


@_stage_task("evaluate")
def evaluate_row(model: ArtifactRef, tasks: list[str], data: ArtifactRef | None, method: str, sparsity: float,
                 masks: dict[str, ArtifactRef], bias_compensation: bool, limit: int | None, metric: str,
                 workdir: str) -> ArtifactRef:
    """One row of the results table as JSON (dense, a general mask, or per-task experts)."""
    from seap.pipeline import evaluate_stage

    _check(*masks.values())
    out = _output_dir(workdir, "evaluate", {"model": model, "tasks": tasks, "data": data, "method": method,
                                            "sparsity": sparsity, "masks": masks,
                                            "bias_compensation": bias_compensation, "limit": limit, "metric": metric})

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            evaluate_stage(cached_model(model), tasks, tmp / "row.json", method, sparsity,
                           {k: v["path"] for k, v in masks.items()}, bias_compensation, data["path"] if data else None,
                           limit, metric=metric, work_dir=Path(workdir) / "task-files")

    return _produce(out, build)


@_stage_task("statistics-shard")
def collect_statistics_shard(model: ArtifactRef, corpus: ArtifactRef, shard: int, shards: int, batch_size: int,
                             workdir: str) -> ArtifactRef:
    """Statistics of shard ``shard`` of ``shards`` of every task's corpus (for a Dask cluster)."""
    from seap.pipeline import stats_stage

    _check(corpus)
    out = _output_dir(workdir, "statistics-shard", {"model": model, "corpus": corpus, "shard": shard,
                                                    "shards": shards, "batch_size": batch_size})

    def build(o: Path) -> None:
        loaded = cached_model(model)
        with atomic_directory(o) as tmp:
            stats_stage(loaded, Path(corpus["path"]) / "corpus.jsonl", tmp, batch_size=batch_size,
                        shard=(shard, shards), progress=False)

    return _produce(out, build)


@_stage_task("merge-shards")
def merge_statistics_shards(shards: list[ArtifactRef], tasks: list[str], workdir: str) -> ArtifactRef:
    """Merge shard statistics per task exactly, laid out like ``collect_statistics``'s output."""
    from seap.pipeline import merge_stats_stage

    _check(*shards)
    out = _output_dir(workdir, "merge-shards", {"shards": shards, "tasks": tasks})

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            for t in tasks:
                merge_stats_stage([Path(s["path"]) / t for s in shards], tmp / t, t)

    return _produce(out, build)


@_stage_task("router")
def train_router(model: ArtifactRef, tasks: list[str], data: ArtifactRef | None, prompts_per_task: int,
                 feature_layer: int, seed: int, threshold: float, workdir: str) -> ArtifactRef:
    """The task router (layer-``feature_layer`` mean-pooled features, logistic regression)."""
    from seap.pipeline import router_stage

    out = _output_dir(workdir, "router", {"model": model, "tasks": tasks, "data": data, "prompts": prompts_per_task,
                                          "feature_layer": feature_layer, "seed": seed, "threshold": threshold})
    return _produce(out, lambda o: router_stage(cached_model(model), tasks, o, data["path"] if data else None,
                                                prompts_per_task, feature_layer, seed, threshold,
                                                Path(workdir) / "task-files"))


@_stage_task("evaluate-routed")
def evaluate_routed_row(model: ArtifactRef, tasks: list[str], data: ArtifactRef | None, sparsity: float,
                        experts: dict[str, ArtifactRef], general: ArtifactRef | None, router: ArtifactRef,
                        limit: int | None, metric: str, workdir: str) -> ArtifactRef:
    """The ``seap-routed`` row: routing errors included."""
    from seap.pipeline import routed_evaluate_stage

    _check(router, *experts.values(), *([general] if general else []))
    out = _output_dir(workdir, "evaluate-routed", {"model": model, "tasks": tasks, "data": data, "sparsity": sparsity,
                                                   "experts": experts, "general": general, "router": router,
                                                   "limit": limit, "metric": metric})

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            routed_evaluate_stage(cached_model(model), tasks, tmp / "row.json", sparsity,
                                  {k: v["path"] for k, v in experts.items()}, general["path"] if general else None,
                                  router["path"], data["path"] if data else None, limit, metric=metric,
                                  work_dir=Path(workdir) / "task-files")

    return _produce(out, build)


@_stage_task("bench")
def bench_masks(model: ArtifactRef, masks: dict[str, ArtifactRef], bias_compensation: dict[str, bool], repeats: int,
                workdir: str) -> ArtifactRef:
    """Dense against every mask's hard-pruned model in one run (prefill and decode tokens/s)."""
    from seap.pipeline import bench_stage

    _check(*masks.values())
    out = _output_dir(workdir, "bench", {"model": model, "masks": masks, "bias_compensation": bias_compensation,
                                         "repeats": repeats})

    def build(o: Path) -> None:
        with atomic_directory(o) as tmp:
            bench_stage(cached_model(model), {k: v["path"] for k, v in masks.items()}, tmp / "bench.json",
                        bias_compensation, repeats)

    return _produce(out, build)


@task(name="register", retries=RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def register_experts(results: str, masks: dict[str, dict[str, ArtifactRef]], router: ArtifactRef | None,
                     registry_dir: str, score: str, schedule: str) -> list[dict[str, Any]]:
    """Register every SEAP expert, general mask and routed bundle (local registry folder;
    idempotent, so it is not cached: a record already there is kept as it is)."""
    from seap.pipeline import register_stage

    return register_stage(results, {k: {n: r["path"] for n, r in g.items()} for k, g in masks.items()}, registry_dir,
                          router["path"] if router else None, score, schedule)


def default_workdir() -> str:
    return os.environ.get("SEAP_WORK_DIR", str(Path("runs") / "work"))


__all__: Sequence[str] = ["ArtifactRef", "bench_masks", "build_corpus", "build_mask", "build_task_corpus",
                          "cached_model", "collect_statistics", "collect_statistics_shard", "compute_scores",
                          "default_workdir", "evaluate_routed_row", "evaluate_row", "merge_statistics_shards",
                          "merge_task_statistics", "prune_model", "register_experts", "resolve_model", "train_router"]
