"""Promotion policy of registered experts: stages, their order, and the gates a version
must pass to enter a stage. Pure functions on dictionaries of metrics; the MLflow side
(``mlflow/seap_registry.py``) reads a version's tags and applies them.

Stages, in order: ``candidate`` -> ``staging`` -> ``production`` (``archived`` is where a
replaced production version goes). A policy file (default ``mlflow/promotion.yaml``) sets the
gate of each stage::

    stages:
      staging:
        min_retention_per_task: 0.80   # accuracy / dense accuracy on every task of the mask
        min_prefill_speedup: 1.10      # prefill throughput / dense, same shapes
      production:
        min_retention_per_task: 0.90
        min_prefill_speedup: 1.10
        require_stage: staging         # promoted only from staging

Rules: ``min_retention_per_task``, ``min_retention`` (mean over the mask's tasks),
``min_accuracy``, ``min_prefill_speedup``, ``min_decode_speedup``, ``max_realised_sparsity``,
``min_realised_sparsity``, ``max_drop`` (points below dense on the worst of the mask's tasks),
``within_budget`` (an expert sized by an accuracy budget: its measured drop on the reported
items may exceed the budget it was sized by by at most this many points), ``require_stage``. A metric a rule needs but the version lacks fails
the rule (say, no speed-up when the pipeline ran without the benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError

STAGES = ("candidate", "staging", "production")
ARCHIVED = "archived"
#: MLflow's legacy stage names for each stage (the deprecated stage API still shows these)
LEGACY_STAGES = {"candidate": "None", "staging": "Staging", "production": "Production", ARCHIVED: "Archived",
                 "registered": "None"}
DEFAULT_POLICY_FILE = Path(__file__).resolve().parents[2] / "mlflow" / "promotion.yaml"

_MIN_RULES = {
    "min_retention": "retention",
    "min_accuracy": "accuracy",
    "min_prefill_speedup": "prefill_speedup",
    "min_decode_speedup": "decode_speedup",
    "min_realised_sparsity": "realised_sparsity",
}
_MAX_RULES = {"max_realised_sparsity": "realised_sparsity", "max_drop": "max_drop"}
KNOWN_RULES = {"min_retention_per_task", "require_stage", "within_budget", *_MIN_RULES, *_MAX_RULES}


@dataclass(frozen=True)
class Gate:
    """The rules a version must meet to enter one stage."""

    stage: str
    rules: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.rules.items())) or "no rules"


@dataclass(frozen=True)
class PromotionPolicy:
    """Gates per stage, read from a policy file."""

    gates: dict[str, Gate]
    source: str = "built-in"

    def gate(self, stage: str) -> Gate:
        return self.gates.get(stage, Gate(stage))


def policy_path(path: str | Path | None = None) -> Path:
    """The policy file: ``path``, else ``$SEAP_PROMOTION_POLICY``, else ``mlflow/promotion.yaml``."""
    return Path(path or os.environ.get("SEAP_PROMOTION_POLICY") or DEFAULT_POLICY_FILE)


def load_policy(path: str | Path | None = None) -> PromotionPolicy:
    """Read and validate a promotion policy; unknown stages or rules are errors, not ignored."""
    import yaml

    file = policy_path(path)
    if not file.is_file():
        raise SeapError(f"promotion policy {file} not found",
                        "pass --policy FILE or set SEAP_PROMOTION_POLICY (see mlflow/promotion.yaml)")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SeapError(f"promotion policy {file} is not valid YAML: {exc}", "fix the file") from None
    return parse_policy(data, str(file))


def parse_policy(data: Mapping[str, Any], source: str = "policy") -> PromotionPolicy:
    """A :class:`PromotionPolicy` from its mapping form (``{"stages": {stage: {rule: value}}}``)."""
    stages = data.get("stages") if isinstance(data, Mapping) else None
    if not isinstance(stages, Mapping):
        raise SeapError(f"{source}: expected a 'stages' mapping", "see mlflow/promotion.yaml for the layout")
    gates = {}
    for stage, rules in stages.items():
        if stage not in STAGES:
            raise SeapError(f"{source}: unknown stage {stage!r}", f"stages: {', '.join(STAGES)}")
        rules = dict(rules or {})
        unknown = sorted(set(rules) - KNOWN_RULES)
        if unknown:
            raise SeapError(f"{source}: unknown rule(s) {', '.join(unknown)} in stage {stage}",
                            f"rules: {', '.join(sorted(KNOWN_RULES))}")
        for rule, value in rules.items():
            if rule == "require_stage":
                if value not in STAGES:
                    raise SeapError(f"{source}: {stage}.require_stage must be one of {', '.join(STAGES)}, "
                                    f"got {value!r}", "fix the file")
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SeapError(f"{source}: {stage}.{rule} must be a number, got {value!r}", "fix the file")
        gates[stage] = Gate(stage, rules)
    return PromotionPolicy(gates, source)


def check_transition(current: str | None, target: str) -> None:
    """Raise unless ``target`` is a stage and comes after ``current`` (a version moves forward)."""
    if target not in STAGES:
        raise SeapError(f"unknown stage {target!r}", f"stages: {', '.join(STAGES)} (roll back with seap rollback)")
    if current == target:
        raise SeapError(f"the version is already in {target}", "nothing to do")
    if current in STAGES and STAGES.index(target) < STAGES.index(current):
        raise SeapError(f"cannot move a version back from {current} to {target}",
                        "promote another version, or roll production back with `seap rollback NAME`")


def gate_failures(gate: Gate, metrics: Mapping[str, float], tasks: Sequence[str],
                  current_stage: str | None = None) -> list[str]:
    """Every rule of ``gate`` the version fails, each as a sentence naming the rule, the
    measured value and the threshold. ``metrics`` holds ``retention_<task>``, ``retention``,
    ``accuracy``, speed-ups and ``realised_sparsity``; ``tasks`` are the tasks of the mask."""
    failures = []
    where = f"gate {gate.stage}"
    for rule, threshold in sorted(gate.rules.items()):
        if rule == "require_stage":
            if current_stage != threshold:
                failures.append(f"{where}.require_stage: the version must be in {threshold} first "
                                f"(it is {current_stage or 'registered'}); run `seap promote NAME VERSION "
                                f"--to {threshold}`")
        elif rule == "min_retention_per_task":
            if not tasks:
                failures.append(f"{where}.{rule}: the version records no tasks")
            for task in tasks:
                value = metrics.get(f"retention_{task}")
                if value is None:
                    failures.append(f"{where}.{rule}: no retention recorded for task {task}")
                elif value < threshold:
                    failures.append(f"{where}.{rule}: retention on {task} is {value:.3f} < {threshold:g}")
        elif rule == "within_budget":
            budget, drop = metrics.get("budget_drop"), metrics.get("max_drop")
            if budget is None:
                failures.append(f"{where}.{rule}: the version was not sized by an accuracy budget "
                                "(register the seap-budget row of a run with --max-drop)")
            elif drop is None:
                failures.append(f"{where}.{rule}: no measured drop recorded")
            elif drop > budget + threshold:
                failures.append(f"{where}.{rule}: the measured drop is {drop:.2f} points, more than its budget "
                                f"of {budget:.2f} + {threshold:g}")
        else:
            key = _MIN_RULES.get(rule) or _MAX_RULES[rule]
            value = metrics.get(key)
            if value is None:
                hint = " (the pipeline ran without the speed benchmark)" if "speedup" in key else ""
                failures.append(f"{where}.{rule}: no {key} recorded{hint}")
            elif rule in _MIN_RULES and value < threshold:
                failures.append(f"{where}.{rule}: {key} is {value:.3f} < {threshold:g}")
            elif rule in _MAX_RULES and value > threshold:
                failures.append(f"{where}.{rule}: {key} is {value:.3f} > {threshold:g}")
    return failures


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The numeric tags of a registered version (``retention_capitals`` -> 0.87, ...)."""
    out = {}
    for key, value in tags.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


__all__ = ["ARCHIVED", "DEFAULT_POLICY_FILE", "Gate", "LEGACY_STAGES", "PromotionPolicy", "STAGES",
           "check_transition", "gate_failures", "load_policy", "metrics_from_tags", "parse_policy", "policy_path"]
