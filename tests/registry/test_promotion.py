"""Promotion policy: stage order and gates (pure functions), and the shipped policy file."""

from __future__ import annotations

import pytest

from seap.errors import SeapError
from seap.registry.promotion import (
    DEFAULT_POLICY_FILE,
    Gate,
    check_transition,
    gate_failures,
    load_policy,
    metrics_from_tags,
    parse_policy,
)


def test_shipped_policy_gates_staging_and_production() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE)
    assert policy.gate("staging").rules["require_stage"] == "candidate"
    assert policy.gate("production").rules["require_stage"] == "staging"
    assert policy.gate("production").rules["min_retention_per_task"] >= policy.gate("staging").rules[
        "min_retention_per_task"]
    assert policy.gate("candidate").rules == {}


def test_gate_names_every_failed_rule_with_value_and_threshold() -> None:
    gate = parse_policy({"stages": {"staging": {"min_retention_per_task": 0.9, "min_prefill_speedup": 1.2,
                                                "max_realised_sparsity": 0.6}}}).gate("staging")
    metrics = {"retention_a": 0.95, "retention_b": 0.85, "prefill_speedup": 1.1, "realised_sparsity": 0.5}
    failures = gate_failures(gate, metrics, ["a", "b"])
    assert len(failures) == 2
    assert any("retention on b is 0.850 < 0.9" in f for f in failures)
    assert any("prefill_speedup is 1.100 < 1.2" in f for f in failures)
    assert gate_failures(gate, {**metrics, "retention_b": 0.9, "prefill_speedup": 1.2}, ["a", "b"]) == []


def test_missing_metrics_fail_the_rule_that_needs_them() -> None:
    gate = parse_policy({"stages": {"production": {"min_decode_speedup": 1.0, "min_retention_per_task": 0.5,
                                                   "require_stage": "staging"}}}).gate("production")
    failures = gate_failures(gate, {}, ["a"], current_stage="candidate")
    assert any("without the speed benchmark" in f for f in failures)
    assert any("no retention recorded for task a" in f for f in failures)
    assert any("must be in staging first" in f for f in failures)


@pytest.mark.parametrize("data, match", [
    ({"stages": {"prod": {}}}, "unknown stage"),
    ({"stages": {"staging": {"min_speed": 1}}}, "unknown rule"),
    ({"stages": {"staging": {"min_prefill_speedup": "fast"}}}, "must be a number"),
    ({"stages": {"staging": {"require_stage": "qa"}}}, "require_stage"),
    ({"gates": {}}, "'stages' mapping"),
])
def test_bad_policies_are_rejected_with_the_reason(data, match) -> None:
    with pytest.raises(SeapError, match=match):
        parse_policy(data)


def test_missing_policy_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(SeapError, match="not found") as info:
        load_policy(tmp_path / "nope.yaml")
    assert "SEAP_PROMOTION_POLICY" in info.value.fix


def test_transitions_move_forward_only() -> None:
    check_transition(None, "candidate")
    check_transition("candidate", "staging")
    check_transition("staging", "production")
    with pytest.raises(SeapError, match="already in staging"):
        check_transition("staging", "staging")
    with pytest.raises(SeapError, match="cannot move a version back"):
        check_transition("production", "candidate")
    with pytest.raises(SeapError, match="unknown stage"):
        check_transition(None, "archived")


def test_numeric_tags_become_metrics() -> None:
    assert metrics_from_tags({"retention_a": "0.9", "task": "a", "sparsity": "0.2"}) == {"retention_a": 0.9,
                                                                                        "sparsity": 0.2}


def test_budget_gates_compare_the_measured_drop_with_the_budget_it_was_sized_by() -> None:
    gate = Gate("staging", {"max_drop": 3.0, "within_budget": 0.5})
    sized = {"drop_capitals": 2.4, "max_drop": 2.4, "budget_drop": 2.0}
    assert gate_failures(gate, sized, ["capitals"]) == []
    failures = gate_failures(gate, {**sized, "max_drop": 3.5, "drop_capitals": 3.5}, ["capitals"])
    assert len(failures) == 2 and "3.50 points, more than its budget of 2.00 + 0.5" in failures[1]
    assert "max_drop is 3.500 > 3" in failures[0]
    unsized = gate_failures(gate, {"max_drop": 1.0}, ["capitals"])
    assert unsized and "not sized by an accuracy budget" in unsized[0]
    assert parse_policy({"stages": {"staging": {"within_budget": 0.5, "max_drop": 2}}}).gate("staging").rules
