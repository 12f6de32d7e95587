"""The study's analysis: every number of its tables from the finished runs (step 4 of
:mod:`seap.run.study`). The statistics are the pure functions of
:mod:`seap.evaluation.significance`: 95% intervals (Wilson per task, bootstrap over the headline
average), paired differences of the SEAP expert against each baseline on the same items
(paired bootstrap and McNemar), retention of the margin over chance, the WikiText-2 perplexity
of each general mask gathered per compensation, and the mean KL divergence from dense on
held-out text of each task (:mod:`seap.evaluation.divergence`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seap.io import atomic_write_json, read_json
from seap.run.config import DEFAULT_TASKS, RunConfig
from seap.run.methods import DENSE, row_key
from seap.run.study.design import CHANCE_MARGIN, SAME_SCHEDULE
from seap.run.study.ledger import StudyRun


def row_correctness(outputs: Mapping[str, str], plan_rows: Mapping[str, str], metric: str
                    ) -> dict[str, dict[str, dict[int, float]]]:
    """Row key -> per-item correctness, from each row's ``items.json``."""
    from seap.evaluation.metrics import metric_for
    from seap.evaluation.significance import correctness
    from seap.run.stages import ITEMS_FILE

    out = {}
    for row, key in plan_rows.items():
        items = read_json(Path(outputs[key]) / ITEMS_FILE, "row items")
        out[row] = correctness(items, {t: metric_for(t, metric) for t in items})
    return out


def analyse(runs: Sequence[StudyRun], metric: str) -> dict[str, Any]:
    """Every number of the study's tables from the finished runs (pure). Runs that share a name
    (one compensation, one run per sparsity) make one table; the dense row is taken once."""
    from seap.evaluation.metrics import retention
    from seap.evaluation.significance import bootstrap_average, paired_difference, verdict, wilson_interval

    table: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    headline: list[str] | None = None
    excluded: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for run in runs:
        rows, items = run.rows, run.items
        dense = rows[DENSE]
        if headline is None:
            headline = []
            for task, t in dense["tasks"].items():
                value = t[_metric(task, metric)]
                if value - t["chance"] >= CHANCE_MARGIN:
                    headline.append(task)
                else:
                    excluded[task] = {"dense": value, "chance": t["chance"]}
        for key, row in rows.items():
            if (key == DENSE and table) or (run.name, key) in seen:
                continue
            seen.add((run.name, key))
            per_task = {}
            for task, t in row["tasks"].items():
                values = items[key].get(task, {})
                right = sum(values.values())
                per_task[task] = {"accuracy": t[_metric(task, metric)], "items": len(values),
                                  "ci95": wilson_interval(right, len(values)), "chance": t.get("chance")}
            head = {t: items[key][t] for t in headline if t in items[key]}
            low, high = bootstrap_average(head)
            entry = {"run": run.name, "row": key, "method": row["method"], "sparsity": row["sparsity"],
                     "realised": row.get("realised_sparsity"), "tasks": per_task,
                     "headline": sum(per_task[t]["accuracy"] for t in head) / max(len(head), 1),
                     "headline_ci95": (low, high),
                     "starter": mean_or_none([per_task[t]["accuracy"] for t in DEFAULT_TASKS if t in per_task]),
                     "retention": retention(row, dense, metric, list(head)),
                     "kl": run.kl.get(key)}
            table.append(entry)
        for sparsity in run.config.masks.sparsities:
            expert = row_key("seap-expert", sparsity)
            if expert not in items:
                continue
            for baseline in ("wanda-sp", "wanda-sp+logistic", "flap", "flap+logistic", "seap-general"):
                other = row_key(baseline, sparsity)
                if other not in items:
                    continue
                head = lambda rows: {t: v for t, v in rows.items() if t in (headline or [])}  # noqa: E731
                diff = paired_difference(head(items[expert]), head(items[other]))
                paired.append({"run": run.name, "sparsity": sparsity, "baseline": baseline,
                               "same_schedule": baseline in SAME_SCHEDULE, **diff, "verdict": verdict(diff)})
    return {"rows": table, "paired": paired, "headline_tasks": headline, "excluded_tasks": excluded}


def perplexity_by_run(runs: Sequence[StudyRun]) -> dict[str, Any]:
    """Run name (a compensation) -> row -> its WikiText-2 perplexity entry, gathered from every
    run that measured perplexity (pure)."""
    perplexity: dict[str, Any] = {}
    for r in runs:
        if r.results.get("perplexity"):
            perplexity.setdefault(r.name, {}).update(r.results["perplexity"])
    return perplexity


def _metric(task: str, metric: str) -> str:
    from seap.evaluation.metrics import metric_for

    return metric_for(task, metric)


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; None when there are none."""
    return sum(values) / len(values) if values else None


def measure_kl(c: RunConfig, outputs: Mapping[str, str], texts_per_task: int, say: Callable[[str], None]
               ) -> dict[str, Any]:
    """Row -> mean KL from dense on each task's held-out text, for every mask row of the run of
    ``c`` whose job outputs are ``outputs`` (an expert row: each task with its own expert; not
    the routed row, whose mask depends on each input), cached in the work folder by the masks'
    content."""
    from seap.data.catalogue import TaskCatalogue
    from seap.evaluation.divergence import heldout_texts, mean_kl
    from seap.maths.masks import PruningMask
    from seap.model.masking import apply_mask
    from seap.run.plan import make_plan
    from seap.run.stages import StageContext

    plan = make_plan(c)
    workdir = Path(c.outputs.workdir)
    ctx = StageContext(workdir / "task-files")
    specs = TaskCatalogue(c.data.data_dir, workdir / "task-files").resolve(c.data.tasks)
    texts = {s.name: heldout_texts(s, texts_per_task, c.data.seed) for s in specs}
    base = None
    out: dict[str, Any] = {}
    for job in plan.of_stage("evaluate"):
        masks = job.inputs["masks"]
        cache_key = {"masks": sorted(Path(outputs[k]).name for k in masks.values()),
                     "tasks": sorted(texts), "texts": texts_per_task, "seed": c.data.seed}
        digest = hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode()).hexdigest()[:24]
        cache = workdir / "kl" / f"{job.name.replace('@', '_')}-{digest}.json"
        if cache.is_file() and read_json(cache, "KL cache").get("key") == cache_key:
            out[job.row] = read_json(cache, "KL cache")["kl"]
            continue
        if base is None:
            base = ctx.base(outputs["model"])
        per_task = {}
        pruned: dict[str, Any] = {}  # one model per mask (a general mask serves every task)
        for task, text in texts.items():
            mask_key = masks.get(task) or masks["general"]
            if mask_key not in pruned:
                pruned[mask_key] = apply_mask(base, PruningMask.load(outputs[mask_key]), "hard")
            per_task[task] = mean_kl(base, pruned[mask_key], text)["kl"]
        value = {"tasks": per_task, "mean": sum(per_task.values()) / len(per_task)}
        atomic_write_json(cache, {"key": cache_key, "kl": value})
        out[job.row] = value
        say(f"KL {job.row}: {value['mean']:.3f}")
    return out


__all__ = ["analyse", "mean_or_none", "measure_kl", "perplexity_by_run", "row_correctness"]
