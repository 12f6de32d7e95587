"""``seap_pipeline``: the plan of a run configuration, one cached Prefect task per job.

    python -m flows.pipeline --model smollm2-135m --sparsities 0.2 0.5 --out runs/pipeline

The flow's parameters are the fields of :class:`seap.run.config.RunConfig` (same names, same
defaults, read from there), validated before any work. It walks the plan of
:func:`seap.run.plan.make_plan`, the same plan ``seap eval`` and the DVC stages walk, running
each job as the task of its stage (:mod:`tasks.stages`), then publishes the results in ``out``
and as Prefect artifacts. Statistics split into shards (``stats_shards``) can run on a Dask
cluster (``dask_workers`` for a local one, ``dask_address`` for an existing one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import flow

from seap.run.config import RunConfig, add_arguments, declared_defaults
from seap.run.cache_entries import RunLog, check_space, parse_size
from seap.run.execute import JobEvent, Ref, after_job, evict, resolve_inputs
from seap.run.plan import Job, Plan, make_plan, recorded_config
from tasks.stages import job_task

DEFAULTS = SimpleNamespace(**declared_defaults())  # the run configuration's defaults: every flow's signature
# reads them, none holds its own
_VIEW: list[Callable[[JobEvent], None]] = []  # the console view of `python -m flows.pipeline`, if any


def publish_artifacts(markdown: str, out: str | Path) -> None:
    """The summary as Prefect artifacts: Markdown (Table 1, router, speed, with the accuracy
    plot embedded) under the key ``seap-results`` and the flat metrics as a table."""
    try:
        import base64

        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        plot = Path(out) / "accuracy_vs_sparsity.png"
        if plot.is_file():
            encoded = base64.b64encode(plot.read_bytes()).decode()
            markdown += f"\n![average accuracy against sparsity](data:image/png;base64,{encoded})\n"
        create_markdown_artifact(markdown=markdown, key="seap-results", description="SEAP results (Table 1 layout)")
        metrics_file = Path(out) / "metrics.json"
        if metrics_file.is_file():
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
def sharded_statistics(jobs: list[dict[str, Any]], inputs: list[dict[str, Any]], workdir: str) -> list[Ref]:
    """Statistics shards submitted to the flow's task runner (merged by the next job)."""
    futures = [job_task(Job.from_dict(j)).submit(j, i, workdir) for j, i in zip(jobs, inputs, strict=True)]
    return [f.result() for f in futures]


def run_plan(plan: Plan, flow_run_id: str | None = None, given: dict[str, Ref] | None = None) -> dict[str, Ref]:
    """Run every job of ``plan`` as a Prefect task; returns job key -> output reference.
    ``given``: references of outputs supplied from outside (existing masks)."""
    c = plan.config
    workdir = str(Path(c.outputs.workdir).resolve())
    outputs: dict[str, Ref] = dict(given or {})
    shards = [j for j in plan.jobs if j.stage == "statistics" and j.name.startswith("shard-")]
    total = len(plan.jobs)
    check_space(plan.jobs, workdir, c.model.model, c.model.dtype, print)  # (before any work)
    run_log = RunLog(workdir)
    cap = parse_size(c.outputs.cache_max_size) if c.outputs.cache_max_size else None
    for index, job in enumerate(plan.jobs, 1):
        if cap is not None and index > 1:  # (the same eviction as the library's executor)
            evict(plan, outputs, index - 1, workdir, cap)
        if job.key in outputs:
            continue
        _notify(JobEvent(job, index, total, "running"))
        start = time.perf_counter()
        if shards and job is shards[0]:
            runner = sharded_statistics
            stats = c.statistics
            if stats.dask_workers or stats.dask_address:
                runner = sharded_statistics.with_options(
                    task_runner=dask_task_runner(stats.dask_workers or 2, stats.dask_address))
            refs = runner([j.to_dict() for j in shards], [resolve_inputs(j, outputs) for j in shards], workdir)
            outputs.update({j.key: r for j, r in zip(shards, refs, strict=True)})
            for r in refs:
                run_log.used(r["path"])
            continue
        if job.stage == "register":
            job = _with_run_params(job, c, flow_run_id)
        state = job_task(job)(job.to_dict(), resolve_inputs(job, outputs), workdir, return_state=True)
        if not Path(state.result()["path"]).exists():  # a cached result whose folder was evicted or pruned: rebuilt
            state = job_task(job).with_options(refresh_cache=True)(job.to_dict(), resolve_inputs(job, outputs), workdir,
                                                                  return_state=True)
        outputs[job.key] = state.result()
        run_log.used(outputs[job.key]["path"])
        after_job(job, outputs[job.key], c)
        cached = state.name == "Cached"
        _notify(JobEvent(job, index, total, "cached" if cached else "done", time.perf_counter() - start,
                         outputs[job.key]["path"]))
    if cap is not None:
        evict(plan, outputs, total, workdir, cap)
    return outputs


def _notify(event: JobEvent) -> None:
    for view in _VIEW:
        view(event)


def _with_run_params(job: Job, config: RunConfig, flow_run_id: str | None) -> Job:
    tags = {"prefect_flow_run_id": flow_run_id} if flow_run_id else {}
    return dataclasses.replace(job, params=dataclasses.replace(job.params, run_params=recorded_config(config),
                                                                run_tags=tags))


def where_to_look(config: RunConfig) -> list[str]:
    """The closing lines: results, plots, registry and the UIs."""
    import os

    from seap.registry.records import resolve_tracking_uri

    out = Path(config.outputs.out)
    lines = [f"results table: {out / 'results.md'}", f"results JSON:  {out / 'results.json'}",
             f"plot:          {out / 'accuracy_vs_sparsity.png'}", f"registry:      {config.registry}"]
    api = os.environ.get("PREFECT_API_URL")
    lines.append("Prefect UI:    " + (api.removesuffix("/api") if api else
                                      "run `prefect server start` and open http://127.0.0.1:4200 "
                                      "(this run used a temporary server)"))
    if not config.register.mlflow:
        lines.append("MLflow:        off (--no-mlflow); register later with `seap register --results OUT --registry DIR`")
    else:
        uri = resolve_tracking_uri(config.register.tracking_uri, config.mlflow_store)
        if uri.startswith(("http://", "https://")):
            lines.append(f"MLflow UI:     {uri}")
        else:
            lines.append(f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    return lines


@flow(name="seap-pipeline", log_prints=True)
def seap_pipeline(
    model: str = DEFAULTS.model,
    device: str = DEFAULTS.device,
    dtype: str = DEFAULTS.dtype,
    offload: str = DEFAULTS.offload,
    tasks: list[str] = DEFAULTS.tasks,
    data_dir: str | None = DEFAULTS.data_dir,
    samples: int | None = DEFAULTS.samples,
    seed: int = DEFAULTS.seed,
    max_tokens: int = DEFAULTS.max_tokens,
    stats_batch_size: int = DEFAULTS.stats_batch_size,
    stats_shards: int = DEFAULTS.stats_shards,
    dask_workers: int = DEFAULTS.dask_workers,
    dask_address: str | None = DEFAULTS.dask_address,
    methods: list[str] = DEFAULTS.methods,
    sparsities: list[float] = DEFAULTS.sparsities,
    score: str = DEFAULTS.score,
    schedule: str = DEFAULTS.schedule,
    schedule_k: float | None = DEFAULTS.schedule_k,
    schedule_x0: float | None = DEFAULTS.schedule_x0,
    protect_first: int | None = DEFAULTS.protect_first,
    protect_last: int | None = DEFAULTS.protect_last,
    channel_multiple: int | None = DEFAULTS.channel_multiple,
    same_width: bool = DEFAULTS.same_width,
    gqa_mode: str = DEFAULTS.gqa_mode,
    unit: str = DEFAULTS.unit,
    expert_score: str = DEFAULTS.expert_score,
    allow_k_reduction: bool = DEFAULTS.allow_k_reduction,
    bias_compensation: bool | None = DEFAULTS.bias_compensation,
    general_weights: dict[str, float] = DEFAULTS.general_weights,
    reconstruct: bool | None = DEFAULTS.reconstruct,
    refit_alpha: float | None = DEFAULTS.refit_alpha,
    refit_prior: str | None = DEFAULTS.refit_prior,
    refit_bias: bool | None = DEFAULTS.refit_bias,
    refit_sequential: bool | None = DEFAULTS.refit_sequential,
    refit_corpus: str = DEFAULTS.refit_corpus,
    refit_generic: list[str] = DEFAULTS.refit_generic,
    refit_generic_samples: int | None = DEFAULTS.refit_generic_samples,
    max_drop: float | None = DEFAULTS.max_drop,
    max_drop_rel: float | None = DEFAULTS.max_drop_rel,
    budget_grid: list[float] = DEFAULTS.budget_grid,
    budget_confidence: float = DEFAULTS.budget_confidence,
    budget_search: str = DEFAULTS.budget_search,
    budget_step: float | None = DEFAULTS.budget_step,
    selection_items: int = DEFAULTS.selection_items,
    min_speedup: float | None = DEFAULTS.min_speedup,
    speedup_engine: str = DEFAULTS.speedup_engine,
    fallback_tasks: list[str] = DEFAULTS.fallback_tasks,
    limit: int | None = DEFAULTS.limit,
    num_fewshot: int = DEFAULTS.num_fewshot,
    metric: str = DEFAULTS.metric,
    eval_batch_size: int = DEFAULTS.eval_batch_size,
    perplexity: bool = DEFAULTS.perplexity,
    perplexity_windows: int | None = DEFAULTS.perplexity_windows,
    router_prompts: int = DEFAULTS.router_prompts,
    router_layer: int = DEFAULTS.router_layer,
    router_threshold: float = DEFAULTS.router_threshold,
    router_kind: str = DEFAULTS.router_kind,
    bench: bool = DEFAULTS.bench,
    bench_repeats: int = DEFAULTS.bench_repeats,
    bench_llama_cpp: str = DEFAULTS.bench_llama_cpp,
    workdir: str = DEFAULTS.workdir,
    out: str = DEFAULTS.out,
    cache_max_size: str | None = DEFAULTS.cache_max_size,
    registry_dir: str | None = DEFAULTS.registry_dir,
    mlflow: bool = DEFAULTS.mlflow,
    tracking_uri: str | None = DEFAULTS.tracking_uri,
    mlflow_dir: str | None = DEFAULTS.mlflow_dir,
    experiment: str = DEFAULTS.experiment,
) -> dict[str, Any]:
    """Dense, SEAP experts, general mask and routed inference, and the baselines, at each
    sparsity: the plan of the run configuration, every job a cached task."""
    config = RunConfig.from_mapping(dict(locals()), front="flow").validate()  # every parameter, before any work
    from prefect.runtime import flow_run

    from seap.evaluation.report import markdown_report

    started = time.perf_counter()
    plan = make_plan(config)
    outputs = run_plan(plan, flow_run.get_id())  # publishes the results to `out` right after the report
    results = json.loads((Path(config.outputs.out) / "results.json").read_text(encoding="utf-8"))
    publish_artifacts(markdown_report(results), config.outputs.out)
    registered = json.loads((Path(outputs["register"]["path"]) / "registered.json").read_text(encoding="utf-8"))
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s")
    for line in where_to_look(config):
        print(line)
    groups = plan.mask_groups()
    return {"results": str(Path(config.outputs.out) / "results.json"),
            "rows": [outputs[j.key]["path"] for j in plan.jobs if j.row],
            "masks": {row: {name: outputs[key]["path"] for name, key in group.items()} for row, group in groups.items()},
            "router": outputs["router"]["path"] if "router" in outputs else None,
            "registered": registered["registered"], "mlflow": registered["mlflow"]}


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the cached SEAP pipeline flow (no server needed). Every option is a field of the run "
                    "configuration; options left out keep its defaults.")
    add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show library output instead of the log file")
    args = parser.parse_args(argv)
    config = RunConfig.from_cli(args)
    return config.to_dict(), args


def summary(result: dict[str, Any], config: RunConfig) -> list[str]:
    """What the main job ends with: Table 1, the router and speed lines, and where to look."""
    from seap.evaluation.report import table1

    results = json.loads(Path(result["results"]).read_text(encoding="utf-8"))
    lines = ["", table1(results).rstrip()]
    if results.get("router"):
        lines.append(f"router: held-out accuracy {results['router']['heldout_accuracy'] * 100:.1f}%")
    speed = (results.get("speed") or {}).get("models", {})
    for name, m in speed.items():
        if name != "dense" and "same_shapes_as" not in m:
            lines.append(f"speed {name}: prefill x{m['prefill_speedup']:.2f}, decode x{m['decode_speedup']:.2f} "
                         f"(realised {m['realised_sparsity'] * 100:.1f}%)")
    mlflow_run = result.get("mlflow")
    lines.append(f"registered {len(result['registered'])} expert versions in {config.registry}"
                 + (f"; MLflow run {mlflow_run['run_id']}" if mlflow_run else ""))
    return lines + [""] + where_to_look(config)


def main(argv: list[str] | None = None) -> int:
    """The main job's entry point: a readable progress view, library output in a log file."""
    from seap.errors import SeapError
    from seap.run.progress import run_with_view

    try:
        params, args = parse_args(argv)
        config = RunConfig.from_mapping(params, front="cli").validate()
    except SeapError as exc:
        print(f"error: {exc.problem}")
        if exc.fix:
            print(f"  fix: {exc.fix}")
        return 2
    return run_with_view(config, lambda: seap_pipeline(**params), lambda r: summary(r, config), "pipeline",
                         verbose=args.verbose, views=_VIEW)


if __name__ == "__main__":
    raise SystemExit(main())
