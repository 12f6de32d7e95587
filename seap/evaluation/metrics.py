"""The one definition of every number a report, a registry record, a promotion gate or an MLflow
run shows. Pure functions on result rows (plain dicts), no model code.

Definitions:

* **accuracy** of a task: lm-eval's ``acc`` or ``acc_norm``, chosen by the run's metric:
  ``acc``, ``acc_norm``, or ``paper`` (``acc_norm`` where the paper reports it, see
  :func:`metric_for`).
* **average**: the unweighted mean over tasks (``table``: of the run's metric).
* **chance** of a task: the mean over its items of 1 / number of choices.
* **margin over chance**: accuracy - chance.
* **retention** of a row against dense: the mean over tasks of accuracy / dense accuracy
  (a mean of per-task ratios, so a task with high accuracy does not dominate);
  ``retention_<task>`` is one task's ratio and ``min_retention`` the smallest.
* **margin retention**: the mean over tasks of (accuracy - chance) / (dense - chance), the
  share of the dense model's skill above guessing that a pruned model keeps (``None`` for a
  task where dense is not above chance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PAPER_ACC_NORM = frozenset({"openbookqa", "hellaswag", "piqa", "arc_challenge"})
LM_EVAL_METRICS = ("acc", "acc_norm")


def metric_for(task: str, metric: str) -> str:
    """The lm-eval metric reported for ``task`` under the run's ``metric``."""
    if metric == "paper":  # the mix that matches the paper's dense numbers (method notes §9)
        return "acc_norm" if task in PAPER_ACC_NORM else "acc"
    return metric


def task_accuracy(row: Mapping[str, Any] | None, task: str, metric: str) -> float | None:
    """A row's accuracy on ``task`` under the run's metric (``None`` when not evaluated)."""
    if not row:
        return None
    value = row.get("tasks", {}).get(task, {}).get(metric_for(task, metric))
    return float(value) if isinstance(value, (int, float)) else None


def average(tasks: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, float]:
    """Mean ``acc`` and ``acc_norm`` over tasks, and ``table``: the mean of the run's metric."""
    avg: dict[str, float] = {}
    for name in LM_EVAL_METRICS:
        values = [float(t[name]) for t in tasks.values() if name in t]
        if values:
            avg[name] = sum(values) / len(values)
    values = [float(t[metric_for(task, metric)]) for task, t in tasks.items()]
    avg["table"] = sum(values) / len(values) if values else float("nan")
    return avg


def chance(items: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean of 1 / number of choices over a task's items (from per-item responses)."""
    sizes = [len(item["resps"]) for item in items if item.get("resps")]
    return sum(1 / n for n in sizes) / len(sizes) if sizes else None


def retention(row: Mapping[str, Any], dense: Mapping[str, Any] | None, metric: str,
              tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``retention_<task>`` per task, their mean ``retention`` and ``min_retention``; and, where
    the rows carry chance levels, ``margin_retention`` (see the module docstring)."""
    out: dict[str, float] = {}
    ratios, margins = [], []
    for task in tasks if tasks is not None else list(row.get("tasks", {})):
        value, reference = task_accuracy(row, task, metric), task_accuracy(dense, task, metric)
        if value is None or not reference:
            continue
        out[f"retention_{task}"] = value / reference
        ratios.append(value / reference)
        level = (dense or {}).get("tasks", {}).get(task, {}).get("chance")
        if isinstance(level, (int, float)) and reference > level:
            margins.append((value - level) / (reference - level))
    if ratios:
        out["retention"] = sum(ratios) / len(ratios)
        out["min_retention"] = min(ratios)
    if margins:
        out["margin_retention"] = sum(margins) / len(margins)
    return out


def drops(row: Mapping[str, Any], dense: Mapping[str, Any] | None, metric: str,
          tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``drop_<task>``: dense accuracy minus the row's, in points (positive: it lost accuracy),
    and their largest, ``max_drop``: what an accuracy budget and its promotion gate compare."""
    out: dict[str, float] = {}
    for task in tasks if tasks is not None else list(row.get("tasks", {})):
        value, reference = task_accuracy(row, task, metric), task_accuracy(dense, task, metric)
        if value is not None and reference is not None:
            out[f"drop_{task}"] = 100.0 * (reference - value)
    if out:
        out["max_drop"] = max(out.values())
    return out


def row_name(row: Mapping[str, Any]) -> str:
    """``dense`` or ``<method>@<sparsity>``: how flat metrics and the bench name a row."""
    return "dense" if row["method"] == "dense" else f"{row['method']}@{row['sparsity']:g}"


def speed_of(results: Mapping[str, Any], name: str, mask: str | None = None) -> Mapping[str, Any] | None:
    """The bench entry of row ``name`` (its ``mask``, else any of its masks)."""
    speed = (results.get("speed") or {}).get("models", {})
    if mask is not None and f"{name}:{mask}" in speed:
        return speed[f"{name}:{mask}"]
    return speed.get(name) or next((v for k, v in sorted(speed.items()) if k.startswith(f"{name}:")), None)


def flat_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat numbers per row: the average, realised sparsity, per-task accuracy and margin over
    chance, retention (all of :func:`retention`) and speed-ups. What DVC tracks
    (``metrics.json``), the report tabulates and MLflow logs."""
    metric = results.get("metric", "acc")
    rows = results["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row_name(row)
        entry: dict[str, Any] = {"average": row["average"]["table"], "realised_sparsity": row["realised_sparsity"]}
        for task, values in row["tasks"].items():
            entry[task] = task_accuracy(row, task, metric)
            level = values.get("chance")
            if isinstance(level, (int, float)) and entry[task] is not None:
                entry[f"{task}_margin"] = entry[task] - level
        if row is not dense:
            entry.update(retention(row, dense, metric))
        bench = speed_of(results, name)
        if bench:
            entry["prefill_speedup"] = bench["prefill_speedup"]
            entry["decode_speedup"] = bench["decode_speedup"]
        out[name] = entry
    return out


__all__ = ["average", "chance", "drops", "flat_metrics", "metric_for", "retention", "row_name", "speed_of", "task_accuracy"]
