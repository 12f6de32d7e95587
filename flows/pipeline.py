"""``seap_pipeline``: a base model and tasks through corpus, statistics, scores, masks and
evaluation, every stage a content-cached Prefect task, ending with the Table 1 summary
published as a Prefect artifact.

    python -m flows.pipeline --model smollm2-135m --sparsities 0.2 0.5 --out runs/pipeline

Not yet here (see the pipeline issue): router training, routed evaluation, the speed bench,
registration, Dask sharding and deployments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow

from seap.experiment import VARIANTS, ExperimentConfig, save_results
from tasks.stages import (
    build_mask,
    build_task_corpus,
    collect_statistics,
    compute_scores,
    default_workdir,
    evaluate_row,
    merge_task_statistics,
    ref,
    resolve_model,
)

DEFAULT_TASKS = ["capitals", "antonyms", "arithmetic", "sentiment", "categories"]


def _publish(markdown: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key="seap-results", description="SEAP results (Table 1 layout)")
    except Exception as exc:  # noqa: BLE001 - the summary is also on disk; never fail the run for the UI
        print(f"could not publish the Prefect artifact: {exc}")


@flow(name="seap-pipeline", log_prints=True)
def seap_pipeline(
    model: str = "smollm2-135m",
    tasks: list[str] | None = None,
    sparsities: list[float] | None = None,
    score: str = "seap-sf",
    schedule: str = "logistic",
    baselines: list[str] | None = None,
    eval_limit: int | None = None,
    data_dir: str | None = None,
    samples: int | None = 200,
    seed: int = 42,
    max_tokens: int = 512,
    metric: str = "acc",
    gqa_mode: str = "kv-groups",
    workdir: str | None = None,
    out: str = "runs/pipeline",
) -> dict[str, Any]:
    """Experts and general masks (SEAP) plus baselines at each sparsity, evaluated on the tasks."""
    tasks = list(tasks or DEFAULT_TASKS)
    sparsities = list(sparsities or [0.2, 0.5])
    baselines = list(["wanda-sp", "flap"] if baselines is None else baselines)
    methods = ["seap-expert", "seap-general", *baselines]
    config = ExperimentConfig(model=model, tasks=tasks, data_dir=data_dir, sparsities=sparsities, methods=methods,
                              limit=eval_limit, samples=samples or 200, seed=seed, max_tokens=max_tokens,
                              seap_score=score, metric=metric, gqa_mode=gqa_mode)
    config.validate()  # every parameter is checked before any heavy work
    from seap.schedules import check_schedule
    from seap.tasks import TaskRegistry

    check_schedule(schedule)
    work = workdir or default_workdir()
    TaskRegistry(data_dir, Path(work) / "task-files").resolve(tasks)  # unknown tasks fail here

    data = ref(data_dir) if data_dir else None
    model_ref = resolve_model(model)
    corpus = build_task_corpus(tasks, data, samples, seed, max_tokens, work)
    stats = collect_statistics(model_ref, corpus, 8, work)
    pooled = merge_task_statistics(stats, tasks, work) if baselines else None
    seap_scores = {t: compute_scores(stats, t, score, work) for t in tasks}

    rows = [evaluate_row(model_ref, tasks, data, "dense", 0.0, {}, False, eval_limit, metric, work)]
    for sparsity in sparsities:
        experts = {t: build_mask([seap_scores[t]], sparsity, schedule, False, gqa_mode, work) for t in tasks}
        rows.append(evaluate_row(model_ref, tasks, data, "seap-expert", sparsity, experts, False, eval_limit, metric, work))
        general = build_mask(list(seap_scores.values()), sparsity, schedule, True, gqa_mode, work)
        rows.append(evaluate_row(model_ref, tasks, data, "seap-general", sparsity, {"general": general}, False,
                                 eval_limit, metric, work))
        for method in baselines:
            v = VARIANTS[method]
            base_scores = compute_scores(pooled, "pooled", v.score, work)
            mask = build_mask([base_scores], sparsity, v.schedule, False, gqa_mode, work,
                              pooled if v.bias_compensation else None, "pooled" if v.bias_compensation else None)
            rows.append(evaluate_row(model_ref, tasks, data, method, sparsity, {"general": mask}, v.bias_compensation,
                                     eval_limit, metric, work))

    import json

    loaded_rows = [json.loads((Path(r["path"]) / "row.json").read_text()) for r in rows]
    from seap.evaluation import data_fingerprint, lm_eval_version
    from seap.tasks import TaskRegistry as _Registry

    specs = _Registry(data_dir, Path(work) / "task-files").resolve(tasks)
    results = {
        "config": {**config.__dict__, "schedule": schedule},
        "model_fingerprint": loaded_rows[0].get("model_fingerprint"),
        "lm_eval_version": lm_eval_version(),
        "data_fingerprint": data_fingerprint(specs, eval_limit, 0),
        "limit": eval_limit,
        "num_fewshot": 0,
        "tasks": [s.describe() for s in specs],
        "metric": metric,
        "rows": loaded_rows,
        "router": None,
    }
    paths = save_results(results, out)
    from seap.report import markdown_report

    _publish(markdown_report(results))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return {"results": {k: str(v) for k, v in paths.items()}, "rows": [r["path"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the cached SEAP pipeline flow.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument("--baselines", nargs="*", default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="runs/pipeline")
    args = parser.parse_args()
    seap_pipeline(model=args.model, tasks=args.tasks, sparsities=args.sparsities, baselines=args.baselines,
                  eval_limit=args.eval_limit, data_dir=args.data_dir, workdir=args.workdir, out=args.out)


if __name__ == "__main__":
    main()
