"""How sure a comparison is: confidence intervals and paired tests on per-item results (pure).

Every function takes per-item correctness (``{task: {doc_id: 0 or 1}}``, what
:func:`correctness` reads from a row's ``items.json``) and returns plain numbers, so the
quality study (:mod:`seap.run.study`) and anyone else compute them the same way.

* :func:`wilson_interval`: the 95% interval of one task's accuracy (Wilson score interval,
  sound near 0 and 1 where the normal approximation is not).
* :func:`bootstrap_average`: the interval of the unweighted mean over tasks, resampling the
  items of each task independently (a stratified bootstrap).
* :func:`paired_difference`: method A minus method B on the same items: the mean difference
  over tasks, its stratified paired-bootstrap interval, and McNemar's exact test on the items
  where exactly one of the two is right. "A is ahead" means the interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Correctness = Mapping[str, Mapping[int, float]]  # task -> doc_id -> 1.0 (right) or 0.0
Z95 = 1.959963984540054
DEFAULT_RESAMPLES = 2000


def correctness(items: Mapping[str, Sequence[Mapping[str, Any]]], metric: str | Mapping[str, str] = "acc"
                ) -> dict[str, dict[int, float]]:
    """Per-item correctness from a row's per-item results (``metric`` per task, or one for all)."""
    out: dict[str, dict[int, float]] = {}
    for task, task_items in items.items():
        name = metric if isinstance(metric, str) else metric.get(task, "acc")
        out[task] = {int(item["doc_id"]): float(item[name]) for item in task_items}
    return out


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes out of ``n``."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _matrix(values: Mapping[int, float], docs: Sequence[int]) -> np.ndarray:
    return np.array([values[d] for d in docs], dtype=np.float64)


def bootstrap_average(results: Correctness, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean over tasks of per-task accuracy (items resampled within each task)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for values in results.values():
        x = np.fromiter(values.values(), dtype=np.float64)
        idx = rng.integers(0, len(x), size=(resamples, len(x)))
        draws += x[idx].mean(axis=1)
    draws /= max(len(results), 1)
    return _quantiles(draws, level)


def _quantiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    return (float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``only_a`` items right for A only, ``only_b`` for B only."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: Correctness, b: Correctness, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """A minus B on the items both evaluated: the mean over tasks of the accuracy difference,
    its paired stratified-bootstrap interval (the same resampled items for both), and McNemar's
    exact test pooled over tasks. Tasks or items only one side has are left out (and counted)."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in a if t in b]
    draws = np.zeros(resamples)
    diffs, only_a, only_b, items, dropped = [], 0, 0, 0, 0
    for task in tasks:
        docs = sorted(set(a[task]) & set(b[task]))
        dropped += len(set(a[task]) ^ set(b[task]))
        if not docs:
            continue
        x, y = _matrix(a[task], docs), _matrix(b[task], docs)
        d = x - y
        diffs.append(float(d.mean()))
        only_a += int(((x > 0.5) & (y < 0.5)).sum())
        only_b += int(((x < 0.5) & (y > 0.5)).sum())
        items += len(docs)
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        draws += d[idx].mean(axis=1)
    if not diffs:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p_mcnemar": 1.0,
                "only_a": 0, "only_b": 0, "items": 0, "tasks": 0, "unpaired_items": dropped}
    draws /= len(diffs)
    low, high = _quantiles(draws, level)
    return {"difference": sum(diffs) / len(diffs), "low": low, "high": high,
            "p_mcnemar": mcnemar_exact(only_a, only_b), "only_a": only_a, "only_b": only_b, "items": items,
            "tasks": len(diffs), "unpaired_items": dropped}


def verdict(difference: Mapping[str, Any]) -> str:
    """``ahead``, ``behind`` or ``level`` (the interval contains zero)."""
    if difference["low"] > 0:
        return "ahead"
    if difference["high"] < 0:
        return "behind"
    return "level"


__all__ = ["DEFAULT_RESAMPLES", "bootstrap_average", "correctness", "mcnemar_exact", "paired_difference", "verdict",
           "wilson_interval"]
