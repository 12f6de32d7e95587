"""Intervals and paired tests on per-item results."""

from __future__ import annotations

import random

from seap.evaluation.significance import (
    bootstrap_average,
    correctness,
    mcnemar_exact,
    paired_difference,
    verdict,
    wilson_interval,
)


def test_wilson_interval_contains_the_estimate_and_narrows_with_more_items() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((hi - lo) - 0.195) < 0.01
    lo2, hi2 = wilson_interval(500, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_mcnemar_exact_matches_the_binomial() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert abs(mcnemar_exact(10, 0) - 2 / 2 ** 10) < 1e-12
    assert mcnemar_exact(5, 5) == 1.0


def test_paired_difference_sees_a_real_gap_and_not_a_fake_one() -> None:
    rng = random.Random(0)
    base = {t: {i: float(rng.random() < 0.6) for i in range(300)} for t in ("a", "b")}
    better = {t: {i: 1.0 if rng.random() < 0.3 else v for i, v in items.items()} for t, items in base.items()}
    diff = paired_difference(better, base)
    assert diff["difference"] > 0 and verdict(diff) == "ahead" and diff["p_mcnemar"] < 1e-6
    assert diff["only_b"] == 0 and diff["items"] == 600
    same = paired_difference(base, base)
    assert same["difference"] == 0 and verdict(same) == "level" and same["p_mcnemar"] == 1.0
    assert verdict(paired_difference(base, better)) == "behind"
    lo, hi = bootstrap_average(base)
    mean = sum(sum(v.values()) / len(v) for v in base.values()) / 2
    assert lo < mean < hi


def test_correctness_reads_items_with_a_metric_per_task() -> None:
    items = {"a": [{"doc_id": 0, "acc": 1.0, "acc_norm": 0.0}], "b": [{"doc_id": 3, "acc": 0.0, "acc_norm": 1.0}]}
    assert correctness(items, {"a": "acc", "b": "acc_norm"}) == {"a": {0: 1.0}, "b": {3: 1.0}}
