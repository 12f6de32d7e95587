"""The accuracy-budget search on plain numbers: the budget in points or relative to chance, the
chosen sparsity on noisy curves, bisection against a grid search, the general mask's
sparsity, the resolution warning's figure and the speed target."""

from __future__ import annotations

import math
import random

import pytest

from seap.maths.budget import (allowed_drop, chosen_sparsity, drop_bound, general_sparsity, next_probe, selection_resolution,
                               speed_sparsity)

GRID = [round(k * 0.025, 4) for k in range(1, 33)]  # 2.5% .. 80%


def test_the_budget_in_points_or_as_a_share_of_the_margin_over_chance() -> None:
    assert allowed_drop(0.8, max_drop=2) == pytest.approx(0.02)
    assert allowed_drop(0.8, max_drop_rel=0.1, chance=0.25) == pytest.approx(0.055)
    assert allowed_drop(0.2, max_drop_rel=0.5, chance=0.25) == 0.0  # (below chance: no margin to lose)
    for bad in (dict(), dict(max_drop=1, max_drop_rel=0.1), dict(max_drop=-1), dict(max_drop_rel=1.5, chance=0.5),
                dict(max_drop_rel=0.1)):
        with pytest.raises(ValueError):
            allowed_drop(0.8, **bad)


def test_the_chosen_sparsity_stops_at_the_first_failure() -> None:
    curve = {0.1: 0.80, 0.2: 0.79, 0.3: 0.75, 0.4: 0.79}  # 0.4 passes by luck after 0.3 failed
    assert chosen_sparsity(curve, dense=0.80, allowed=0.02) == 0.2
    assert chosen_sparsity(curve, dense=0.80, allowed=0.05) == 0.4
    assert chosen_sparsity({0.1: 0.5}, dense=0.80, allowed=0.02) == 0.0  # no sparsity meets it: dense
    assert chosen_sparsity({0.2: 0.78}, dense=0.80, allowed=0.02) == 0.2  # a tie with the budget passes


def bisect(true_accuracy, dense: float, allowed: float) -> tuple[float, int]:
    curve: dict[float, float] = {}
    while (probe := next_probe(curve, dense, allowed)) is not None:
        assert probe in GRID and probe not in curve
        curve[probe] = true_accuracy(probe)
    return chosen_sparsity(curve, dense, allowed), len(curve)


def test_bisection_finds_what_the_grid_finds_on_monotone_curves_in_a_few_probes() -> None:
    rng = random.Random(0)
    for _ in range(300):
        knee, slope, dense = rng.uniform(0, 0.9), rng.uniform(0.2, 3), rng.uniform(0.4, 0.95)

        def accuracy(s: float) -> float:
            return dense - slope * max(s - knee, 0) ** 2

        allowed = rng.choice([0.0, 0.005, 0.01, 0.02, 0.05])
        found, probes = bisect(accuracy, dense, allowed)
        grid = chosen_sparsity({s: accuracy(s) for s in GRID}, dense, allowed)
        assert found == grid
        assert probes <= math.ceil(math.log2(len(GRID) + 1)) + 1


def test_on_a_noisy_curve_bisection_returns_a_point_that_passes_with_every_smaller_probe() -> None:
    rng = random.Random(1)
    for _ in range(300):
        noise = {s: rng.gauss(0, 0.01) for s in GRID}

        def accuracy(s: float) -> float:
            return 0.8 - 0.3 * s * s + noise[s]

        curve: dict[float, float] = {}
        while (probe := next_probe(curve, 0.8, 0.02)) is not None:
            curve[probe] = accuracy(probe)
        found = chosen_sparsity(curve, 0.8, 0.02)
        assert all(v >= 0.78 - 1e-12 for s, v in curve.items() if s <= found)
        assert found == GRID[-1] or any(s > found and v < 0.78 for s, v in curve.items())


def test_the_general_sparsity_keeps_every_task_within_its_budget() -> None:
    curves = {"a": {0.1: 0.80, 0.2: 0.79, 0.3: 0.70}, "b": {0.1: 0.60, 0.2: 0.55, 0.3: 0.55}}
    assert general_sparsity(curves, {"a": 0.80, "b": 0.60}, {"a": 0.02, "b": 0.02}) == 0.1
    assert general_sparsity(curves, {"a": 0.80, "b": 0.60}, {"a": 0.02, "b": 0.05}) == 0.2
    assert general_sparsity(curves, {"a": 0.81, "b": 0.60}, {"a": 0.00, "b": 0.05}) == 0.0


def test_the_resolution_and_the_speed_target() -> None:
    assert selection_resolution(0.8, 200) == pytest.approx(2.828, abs=1e-3)  # 2 points cannot be resolved on 200 items
    assert selection_resolution(0.8, 0) == math.inf
    assert speed_sparsity({0.2: 1.1, 0.3: 1.25, 0.5: 1.6}, 1.2) == 0.3
    assert speed_sparsity({0.2: 1.1}, 1.2) is None
    assert speed_sparsity({0.05: 1.25, 0.1: 1.02, 0.2: 1.48, 0.3: 1.29}, 1.2) == 0.2  # (a lucky 5% is not taken)
    assert speed_sparsity({0.2: 1.3, 0.3: 1.1}, 1.2) is None  # (the largest does not reach it)


def test_the_uniform_comparison_takes_the_grid_sparsity_nearest_the_budgets_mean() -> None:
    from seap.maths.budget import nearest_uniform

    grid = [round(k * 0.05, 4) for k in range(1, 16)]
    assert nearest_uniform({"a": 0.25, "b": 0.35, "c": 0.05, "d": 0.7, "e": 0.15}, grid) == 0.3
    assert nearest_uniform({"a": 0.1, "b": 0.25}, [0.1, 0.15, 0.2]) == 0.2  # (0.175: the larger of two equally near)
    assert nearest_uniform({"a": 0.0, "b": 0.0}, grid) == 0.05


def test_the_fallback_is_the_sparsest_candidate_that_keeps_every_held_out_task_within_budget() -> None:
    from seap.maths.budget import fallback_choice

    dense = {"piqa": 0.60, "boolq": 0.55}
    allowed = {"piqa": 0.02, "boolq": 0.02}
    candidates = {"seap-budget-general": ({"piqa": 0.55, "boolq": 0.56}, 0.30),  # piqa 5 points down
                  "wanda-sp@0.2": ({"piqa": 0.59, "boolq": 0.54}, 0.20),
                  "flap@0.2": ({"piqa": 0.60, "boolq": 0.55}, 0.20)}  # as sparse, more accurate
    assert fallback_choice(dense, candidates, allowed) == "flap@0.2"
    assert fallback_choice(dense, {"seap-budget-general": candidates["seap-budget-general"]}, allowed) == "dense"
    assert fallback_choice(dense, candidates, {"piqa": 0.05, "boolq": 0.05}) == "seap-budget-general"


def test_a_speed_target_alone_or_against_an_accuracy_budget() -> None:
    from seap.maths.budget import with_speed_target

    speedups = {0.1: 1.05, 0.2: 1.12, 0.3: 1.25, 0.4: 1.31}
    assert with_speed_target(None, speedups, 1.2) == (0.3, 0.3, True)  # alone: the smallest that reaches it
    assert with_speed_target(None, speedups, 1.5) == (0.0, None, False)  # none reaches it: dense
    assert with_speed_target(0.4, speedups, 1.2) == (0.4, 0.3, True)  # the budget allows more: both met
    assert with_speed_target(0.2, speedups, 1.2) == (0.2, 0.3, False)  # they conflict: the budget stands


def test_the_drop_bound_adds_standard_errors_of_the_paired_difference() -> None:
    """Paired by item: an expert wrong on 2 of 8 items dense had right, and right on none dense
    had wrong, drops 0.25 with a standard error of sqrt(0.25 * 0.75 / 7 / 8)."""
    dense = {str(i): 1.0 for i in range(8)}
    expert = {**dense, "0": 0.0, "1": 0.0}
    assert drop_bound(dense, expert, 0.0) == pytest.approx(0.25)
    se = math.sqrt(sum((d - 0.25) ** 2 for d in [1, 1, 0, 0, 0, 0, 0, 0]) / 7 / 8)
    assert drop_bound(dense, expert, 1.0) == pytest.approx(0.25 + se)
    assert drop_bound(dense, dense, 2.0) == 0.0  # (the same answers: no doubt about the drop)
    swapped = {**dense, "0": 0.0, "extra": 1.0}  # (an item only one side scored is left out)
    assert drop_bound(dense, swapped, 0.0) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="no item"):
        drop_bound({"a": 1.0}, {"b": 1.0}, 1.0)
