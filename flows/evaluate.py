"""``evaluate_flow``: evaluation only, of existing masks (folders written by the pipeline,
``seap masks`` or the registry): the dense model and each mask on the tasks, every row a cached
task as in the pipeline, and the Table 1 summary. Each mask is applied as it says (a FLAP
mask with its bias compensation); an expert mask is evaluated on its own task.

    python -m flows.evaluate --model smollm2-135m --masks runs/registry/seap-smollm2-135m-general/*/masks/general
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import DEFAULTS, publish_artifacts, run_plan
from seap.errors import SeapError
from seap.run.config import RunConfig, add_arguments, given_arguments
from seap.run.execute import ref
from seap.run.methods import row_key
from seap.run.plan import GENERAL, make_evaluation_plan


def mask_rows(paths: list[str], tasks: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Row specs and output references of existing masks (checked before any work)."""
    from seap.maths.masks import PruningMask

    rows: dict[str, dict[str, Any]] = {}
    refs: dict[str, Any] = {}
    names = [t.rpartition(":")[2] for t in tasks]
    for path in paths:
        try:
            mask = PruningMask.load(path)
        except SeapError as exc:
            raise SeapError(f"parameter masks: {exc.problem}", exc.fix) from None
        method = mask.meta.get("method") or ("seap-general" if mask.meta.get("kind") == "general" else "seap-expert")
        sparsity = float(mask.meta.get("target_sparsity", round(mask.realised_sparsity(), 2)))
        expert = mask.task in names
        row = row_key(method, sparsity) + (f":{mask.task}" if expert else "")
        while row in rows:
            row += "+"
        name = mask.task if expert else GENERAL
        rows[row] = {"method": method, "sparsity": sparsity, "mask": name,
                     "tasks": [tasks[names.index(mask.task)]] if expert else list(tasks)}
        refs[f"masks/{row}/{name}"] = ref(path)
    return rows, refs


EVALUATE_OPTIONS = ("model", "tasks", "data_dir", "limit", "metric", "workdir")  # the flow's RunConfig fields
EVALUATE_OUT = "runs/evaluate"


@flow(name="seap-evaluate", log_prints=True)
def evaluate_flow(
    masks: list[str] | None = None,
    model: str = DEFAULTS.model,
    tasks: list[str] = DEFAULTS.tasks,
    data_dir: str | None = DEFAULTS.data_dir,
    limit: int | None = DEFAULTS.limit,
    metric: str = DEFAULTS.metric,
    workdir: str = DEFAULTS.workdir,
    out: str = EVALUATE_OUT,
) -> dict[str, Any]:
    """The dense model and each mask (a general mask on every task, an expert on its own)."""
    given = {name: value for name, value in locals().items() if name in EVALUATE_OPTIONS}
    config = RunConfig.from_mapping({**given, "out": out}, front="flow").validate()
    if not masks:
        raise SeapError("parameter masks: nothing to evaluate", "pass one or more mask folders")
    rows, given = mask_rows(list(masks), list(config.data.tasks))
    outputs = run_plan(make_evaluation_plan(config, rows), given=given)  # publishes the results to `out`
    from seap.evaluation.report import markdown_report

    results = json.loads((Path(config.outputs.out) / "results.json").read_text(encoding="utf-8"))
    publish_artifacts(markdown_report(results), config.outputs.out)
    print(f"results table: {Path(config.outputs.out) / 'results.md'}")
    return {"results": str(Path(config.outputs.out) / "results.json"),
            "rows": [outputs[k]["path"] for k in outputs if k.startswith(("evaluate/", "evaluate-dense/"))]}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.evaluate``."""
    parser = argparse.ArgumentParser(description="Evaluate existing masks (cached per row).")
    parser.add_argument("--masks", nargs="+", required=True, help="mask folders")
    parser.add_argument("--out", default=EVALUATE_OUT, help=f"results folder (default: {EVALUATE_OUT})")
    add_arguments(parser, only=EVALUATE_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    given = {name: value for name, value in given_arguments(args).items() if name in EVALUATE_OPTIONS}
    evaluate_flow(masks=args.masks, out=args.out, **given)  # (--out is the flow's own, not a config field here)


if __name__ == "__main__":
    main()
