"""``evaluate_flow``: evaluation only. Takes existing masks (folders written by the pipeline,
``seap masks`` or the registry) and evaluates the dense model and each mask on the tasks,
cached per row like the pipeline's evaluation, and writes the Table 1 summary.

    python -m flows.evaluate --model smollm2-135m --mask runs/registry/seap-smollm2-135m-general/*/masks/general
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import DEFAULT_TASKS, PipelineParams, _publish
from seap.errors import SeapError
from tasks.stages import default_workdir, evaluate_row, ref, resolve_model


@flow(name="seap-evaluate", log_prints=True)
def evaluate_flow(
    model: str = "smollm2-135m",
    masks: list[str] | None = None,
    tasks: list[str] | None = None,
    eval_limit: int | None = None,
    data_dir: str | None = None,
    metric: str = "acc",
    bias_compensation: bool = False,
    dense: bool = True,
    workdir: str | None = None,
    out: str = "runs/evaluate",
) -> dict[str, Any]:
    """Each mask (a general mask, or an expert evaluated on its own task) and the dense model."""
    from seap.maths.masks import PruningMask

    p = PipelineParams(model=model, tasks=list(tasks or DEFAULT_TASKS), eval_limit=eval_limit, data_dir=data_dir,
                       metric=metric, router=False, workdir=workdir, out=out, baselines=[])
    p.validate()
    loaded_masks = []
    for path in masks or []:
        try:
            loaded_masks.append((path, PruningMask.load(path)))
        except SeapError as exc:
            raise SeapError(f"parameter masks: {exc.problem}", exc.fix) from None
    if not loaded_masks and not dense:
        raise SeapError("parameter masks: nothing to evaluate", "pass mask folders, or dense=true")
    work = p.work
    data = ref(p.data_dir) if p.data_dir else None
    model_ref = resolve_model(p.model)
    rows = [evaluate_row(model_ref, p.tasks, data, "dense", 0.0, {}, False, p.eval_limit, p.metric, work)] if dense else []
    for path, mask in loaded_masks:
        method = mask.meta.get("method") or ("seap-general" if mask.meta.get("kind") == "general" else "seap-expert")
        sparsity = float(mask.meta.get("target_sparsity", round(mask.realised_sparsity(), 2)))
        task = mask.task
        if task in p.tasks:  # an expert: evaluated on its own task
            row_tasks, group = [task], {task: ref(path)}
        else:
            row_tasks, group = p.tasks, {"general": ref(path)}
        rows.append(evaluate_row(model_ref, row_tasks, data, method, sparsity, group, bias_compensation,
                                 p.eval_limit, p.metric, work))
    from seap.run.stages import summary_stage
    from seap.evaluation.report import markdown_report

    loaded_rows = [json.loads((Path(r["path"]) / "row.json").read_text()) for r in rows]
    results = summary_stage(loaded_rows, p.out, {"model": p.model, "masks": masks or []}, p.tasks, p.data_dir,
                            p.eval_limit, p.metric, work_dir=Path(work) / "task-files")
    _publish(markdown_report(results), p.out)
    print(f"results table: {Path(p.out) / 'results.md'}")
    return {"results": str(Path(p.out) / "results.json"), "rows": [r["path"] for r in rows]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate existing masks (cached per row).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mask", dest="masks", action="append", default=[])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--metric", default="acc")
    parser.add_argument("--no-dense", dest="dense", action="store_false")
    parser.add_argument("--workdir", default=default_workdir())
    parser.add_argument("--out", default="runs/evaluate")
    evaluate_flow(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
