"""``seap_pipeline``: a base model and tasks through corpus, statistics, scores, masks,
evaluation, router, speed and registration; every stage a content-cached Prefect task.

    python -m flows.pipeline --model smollm2-135m --sparsities 0.2 0.5 --out runs/pipeline

Fans out per task (statistics, scores, expert masks) and per sparsity (masks, evaluation
rows), publishes the Table 1 summary as a Prefect artifact and in ``out``, and registers
every SEAP expert, general mask and routed bundle (in the local registry folder, and in
MLflow when the registry is configured).

Statistics of large corpora can be split into shards (``stats_shards``) that run on a Dask
cluster (``dask_workers`` for a local cluster, ``dask_address`` for an existing one) through
Prefect's Dask task runner, and are merged exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from seap.errors import SeapError
from seap.experiment import VARIANTS
from tasks.stages import (
    ArtifactRef,
    bench_masks,
    build_mask,
    build_task_corpus,
    collect_statistics,
    collect_statistics_shard,
    compute_scores,
    default_workdir,
    evaluate_routed_row,
    evaluate_row,
    merge_statistics_shards,
    merge_task_statistics,
    ref,
    register_experts,
    resolve_model,
    train_router,
)
from tasks.tracking import register_in_mlflow

DEFAULT_TASKS = ["capitals", "antonyms", "arithmetic", "sentiment", "categories"]


@dataclass
class PipelineParams:
    """Every parameter of the pipeline, checked before any heavy work starts."""

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.5])
    score: str = "seap-sf"
    schedule: str = "logistic"
    baselines: list[str] = field(default_factory=lambda: ["wanda-sp", "flap"])
    router: bool = True
    bench: bool = True
    bench_repeats: int = 3
    eval_limit: int | None = None
    data_dir: str | None = None
    samples: int | None = 200
    seed: int = 42
    max_tokens: int = 512
    metric: str = "acc"
    gqa_mode: str = "kv-groups"
    router_prompts: int = 500
    router_layer: int = 0
    router_threshold: float = 0.5
    stats_batch_size: int = 8
    stats_shards: int = 1
    dask_workers: int = 0
    dask_address: str | None = None
    workdir: str | None = None
    out: str = "runs/pipeline"
    registry_dir: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "seap"

    def validate(self) -> None:
        """Raise a :class:`SeapError` naming the first invalid parameter."""
        from seap.pipeline import check_pipeline_options

        def bad(name: str, problem: str, fix: str) -> SeapError:
            return SeapError(f"parameter {name}: {problem}", fix)

        if not self.model:
            raise bad("model", "is empty", "pass a hub id, a local folder, a .gguf file or smollm2-135m")
        check_pipeline_options({}, tasks=self.tasks, sparsities=self.sparsities, score=self.score,
                               schedule=self.schedule, gqa_mode=self.gqa_mode, baselines=self.baselines,
                               metric=self.metric, router=self.router, router_threshold=self.router_threshold)
        for name in ("eval_limit", "samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(name, f"must be a positive integer or null, got {value!r}", "e.g. 200, or null for all")
        for name in ("seed", "max_tokens", "bench_repeats", "router_prompts", "stats_batch_size", "stats_shards"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise bad(name, f"must be a positive integer, got {value!r}", "pass a whole number")
        if self.dask_workers < 0:
            raise bad("dask_workers", f"must be 0 (no Dask) or more, got {self.dask_workers}", "e.g. 2")
        if (self.dask_workers or self.dask_address) and self.stats_shards < 2:
            raise bad("stats_shards", "a Dask cluster needs the statistics split into shards",
                      "pass stats_shards >= 2 (e.g. the number of workers)")
        if self.tracking_uri is not None and "://" not in self.tracking_uri:
            raise bad("tracking_uri", f"{self.tracking_uri!r} is not a URI",
                      "e.g. http://mlflow.internal:5000 or sqlite:///runs/mlflow/mlflow.db")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise bad("data_dir", f"{self.data_dir} is not a folder", "pass a folder of task data")
        from seap.tasks import TaskRegistry

        try:  # unknown tasks and missing splits fail here, before any model is loaded
            TaskRegistry(self.data_dir, Path(self.work) / "task-files").resolve(self.tasks)
        except SeapError as exc:
            raise bad("tasks", exc.problem, exc.fix) from None

    @property
    def work(self) -> str:
        return self.workdir or default_workdir()

    @property
    def registry(self) -> str:
        return self.registry_dir or str(Path(self.work).parent / "registry")

    @property
    def mlflow_dir(self) -> str:
        """The local MLflow store (sqlite + artifacts) used when no tracking URI is set."""
        return str(Path(self.work).parent / "mlflow")

    @property
    def resolved_tracking_uri(self) -> str | None:
        from seap.registry import resolve_tracking_uri

        return resolve_tracking_uri(self.tracking_uri, self.mlflow_dir) if self.mlflow else None


def _publish(markdown: str, out: str | Path | None = None) -> None:
    """The summary as Prefect artifacts: Markdown (Table 1, router, speed, with the accuracy
    plot embedded) under the key ``seap-results`` and the flat metrics as a table."""
    try:
        import base64

        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        plot = Path(out) / "accuracy_vs_sparsity.png" if out else None
        if plot is not None and plot.is_file():
            encoded = base64.b64encode(plot.read_bytes()).decode()
            markdown += f"\n![average accuracy against sparsity](data:image/png;base64,{encoded})\n"
        create_markdown_artifact(markdown=markdown, key="seap-results", description="SEAP results (Table 1 layout)")
        metrics_file = Path(out) / "metrics.json" if out else None
        if metrics_file is not None and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            rows = [{"row": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}}
                    for name, values in metrics.items()]
            create_table_artifact(table=rows, key="seap-metrics", description="SEAP metrics per method and sparsity")
    except Exception as exc:  # noqa: BLE001 - the summary is also on disk; never fail the run for the UI
        print(f"could not publish the Prefect artifacts: {exc}")


def dask_task_runner(workers: int = 2, address: str | None = None) -> Any:
    """Prefect's Dask task runner: an existing cluster by address, or a local cluster of
    ``workers`` single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="seap-sharded-statistics", log_prints=True)
def sharded_statistics(model: ArtifactRef, corpus: ArtifactRef, tasks: list[str], shards: int, batch_size: int,
                       workdir: str) -> ArtifactRef:
    """Statistics in ``shards`` parts submitted to the flow's task runner, merged exactly."""
    futures = [collect_statistics_shard.submit(model, corpus, i, shards, batch_size, workdir) for i in range(shards)]
    return merge_statistics_shards([f.result() for f in futures], tasks, workdir)


def statistics_step(p: PipelineParams, model: ArtifactRef, corpus: ArtifactRef) -> ArtifactRef:
    if p.stats_shards <= 1:
        return collect_statistics(model, corpus, p.stats_batch_size, p.work)
    sub = sharded_statistics
    if p.dask_workers or p.dask_address:
        sub = sharded_statistics.with_options(task_runner=dask_task_runner(p.dask_workers or 2, p.dask_address))
    return sub(model, corpus, p.tasks, p.stats_shards, p.stats_batch_size, str(Path(p.work).resolve()))


def where_to_look(out: str, registry: str, tracking_uri: str | None = None) -> list[str]:
    """The closing lines: results, plots, registry and the UIs."""
    import os

    lines = [f"results table: {Path(out) / 'results.md'}", f"results JSON:  {Path(out) / 'results.json'}",
             f"plot:          {Path(out) / 'accuracy_vs_sparsity.png'}", f"registry:      {registry}"]
    api = os.environ.get("PREFECT_API_URL")
    lines.append(f"Prefect UI:    {api.removesuffix('/api') if api else 'run `prefect server start` and open http://127.0.0.1:4200 (this run used a temporary server)'}")
    if tracking_uri is None:
        lines.append("MLflow:        off (--no-mlflow); register later with `seap register --results OUT --registry DIR`")
    elif tracking_uri.startswith(("http://", "https://")):
        lines.append(f"MLflow UI:     {tracking_uri}")
    else:
        lines.append(f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)")
    return lines


@flow(name="seap-pipeline", log_prints=True)
def seap_pipeline(
    model: str = "smollm2-135m",
    tasks: list[str] | None = None,
    sparsities: list[float] | None = None,
    score: str = "seap-sf",
    schedule: str = "logistic",
    baselines: list[str] | None = None,
    router: bool = True,
    bench: bool = True,
    eval_limit: int | None = None,
    data_dir: str | None = None,
    samples: int | None = 200,
    seed: int = 42,
    max_tokens: int = 512,
    metric: str = "acc",
    gqa_mode: str = "kv-groups",
    bench_repeats: int = 3,
    stats_shards: int = 1,
    dask_workers: int = 0,
    dask_address: str | None = None,
    workdir: str | None = None,
    out: str = "runs/pipeline",
    registry_dir: str | None = None,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "seap",
) -> dict[str, Any]:
    """Experts and general masks (SEAP) plus baselines at each sparsity, evaluated on the tasks,
    with the router, routed evaluation, speed and registration."""
    p = PipelineParams(model=model, tasks=list(tasks or DEFAULT_TASKS), sparsities=list(sparsities or [0.2, 0.5]),
                       score=score, schedule=schedule,
                       baselines=list(["wanda-sp", "flap"] if baselines is None else baselines), router=router,
                       bench=bench, bench_repeats=bench_repeats, eval_limit=eval_limit, data_dir=data_dir,
                       samples=samples, seed=seed, max_tokens=max_tokens, metric=metric, gqa_mode=gqa_mode,
                       stats_shards=stats_shards, dask_workers=dask_workers, dask_address=dask_address,
                       workdir=workdir, out=out, registry_dir=registry_dir, mlflow=mlflow,
                       tracking_uri=tracking_uri, experiment=experiment)
    p.validate()  # every parameter is checked before any heavy work
    started = time.perf_counter()
    work, tasks_ = p.work, p.tasks
    data = ref(p.data_dir) if p.data_dir else None
    model_ref = resolve_model(p.model)
    corpus = build_task_corpus(tasks_, data, p.samples, p.seed, p.max_tokens, work)
    stats = statistics_step(p, model_ref, corpus)
    pooled = merge_task_statistics(stats, tasks_, work) if p.baselines else None
    seap_scores = {t: compute_scores(stats, t, p.score, work) for t in tasks_}

    limit, metric_ = p.eval_limit, p.metric
    rows = [evaluate_row(model_ref, tasks_, data, "dense", 0.0, {}, False, limit, metric_, work)]
    masks: dict[str, dict[str, ArtifactRef]] = {}
    bias: dict[str, bool] = {}
    for sparsity in p.sparsities:
        experts = {t: build_mask([seap_scores[t]], sparsity, p.schedule, False, p.gqa_mode, work) for t in tasks_}
        masks[f"seap-expert@{sparsity:g}"] = experts
        rows.append(evaluate_row(model_ref, tasks_, data, "seap-expert", sparsity, experts, False, limit, metric_, work))
        general = build_mask(list(seap_scores.values()), sparsity, p.schedule, True, p.gqa_mode, work)
        masks[f"seap-general@{sparsity:g}"] = {"general": general}
        rows.append(evaluate_row(model_ref, tasks_, data, "seap-general", sparsity, {"general": general}, False,
                                 limit, metric_, work))
        for method in p.baselines:
            v = VARIANTS[method]
            base_scores = compute_scores(pooled, "pooled", v.score, work)
            mask = build_mask([base_scores], sparsity, v.schedule, False, p.gqa_mode, work,
                              pooled if v.bias_compensation else None, "pooled" if v.bias_compensation else None)
            masks[f"{method}@{sparsity:g}"] = {"general": mask}
            bias[f"{method}@{sparsity:g}:general"] = v.bias_compensation
            rows.append(evaluate_row(model_ref, tasks_, data, method, sparsity, {"general": mask},
                                     v.bias_compensation, limit, metric_, work))

    router_ref = None
    if p.router:
        router_ref = train_router(model_ref, tasks_, data, p.router_prompts, p.router_layer, p.seed,
                                  p.router_threshold, work)
        for sparsity in p.sparsities:
            rows.append(evaluate_routed_row(model_ref, tasks_, data, sparsity, masks[f"seap-expert@{sparsity:g}"],
                                            masks[f"seap-general@{sparsity:g}"]["general"], router_ref, limit,
                                            metric_, work))
    speed = None
    if p.bench:
        flat = {f"{key}:{name}": r for key, group in masks.items() for name, r in group.items()}
        speed_ref = bench_masks(model_ref, flat, {k: bias.get(k, False) for k in flat}, p.bench_repeats, work)
        speed = json.loads((Path(speed_ref["path"]) / "bench.json").read_text())

    from seap.pipeline import summary_stage
    from seap.report import markdown_report

    loaded_rows = [json.loads((Path(r["path"]) / "row.json").read_text()) for r in rows]
    from seap.io import redact_uri

    config = {k: redact_uri(v) if k == "tracking_uri" and v else v for k, v in p.__dict__.items()}
    results = summary_stage(loaded_rows, p.out, config, tasks_, p.data_dir, limit, metric_,
                            router=router_ref["path"] if router_ref else None, speed=speed,
                            work_dir=Path(work) / "task-files")
    _publish(markdown_report(results), p.out)
    registered = register_experts(str(Path(p.out) / "results.json"), masks, router_ref, p.registry, p.score,
                                  p.schedule)
    print(f"registered {len(registered)} expert versions in {p.registry}")
    tracked = None
    if p.mlflow:
        from prefect.runtime import flow_run

        tracked = register_in_mlflow(p.out, [r["path"] for r in registered], config, p.tracking_uri, p.mlflow_dir,
                                     p.experiment, flow_run.get_id())
        created = sum(v["created"] for v in tracked["versions"])
        print(f"MLflow run {tracked['run_id']} ({tracked['tracking_uri']}): {len(tracked['versions'])} versions, "
              f"{created} new")
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s")
    for line in where_to_look(p.out, p.registry, p.resolved_tracking_uri):
        print(line)
    return {"results": str(Path(p.out) / "results.json"), "rows": [r["path"] for r in rows],
            "masks": {k: {n: r["path"] for n, r in g.items()} for k, g in masks.items()},
            "router": router_ref["path"] if router_ref else None, "registered": registered, "mlflow": tracked}


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Run the cached SEAP pipeline flow (no server needed).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument("--score", default="seap-sf")
    parser.add_argument("--schedule", default="logistic")
    parser.add_argument("--baselines", nargs="*", default=None)
    parser.add_argument("--no-router", dest="router", action="store_false")
    parser.add_argument("--no-bench", dest="bench", action="store_false")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--metric", default="acc")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bench-repeats", type=int, default=3)
    parser.add_argument("--stats-shards", type=int, default=1)
    parser.add_argument("--dask-workers", type=int, default=0)
    parser.add_argument("--dask-address", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--registry-dir", default=None)
    parser.add_argument("--out", default="runs/pipeline")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                        help="register in the local registry folder only")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite beside --workdir)")
    parser.add_argument("--experiment", default="seap", help="MLflow experiment of the pipeline runs")
    return vars(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    seap_pipeline(**parse_args(argv))


if __name__ == "__main__":
    main()
