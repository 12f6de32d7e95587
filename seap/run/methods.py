"""The method table: every row a run can produce, each one typed entry.

A method says how its masks are calibrated and built; the planner (:mod:`seap.run.plan`)
turns it into jobs and nothing else decides what a method means. Adding a method is one
entry here plus its pure functions (a score in :mod:`seap.maths.scores`, a schedule in
:mod:`seap.maths.schedules`).

Calibration, per method:

* ``task``: one mask per task, from that task's own statistics and scores (a SEAP *expert*);
  each task is evaluated with its own expert (oracle task identity, as in the paper's tables).
* ``general``: one mask from the weighted sum of the tasks' scores (SEAP-gen).
* ``pooled``: one mask from the statistics of all tasks' corpora merged (the task-agnostic
  baselines Wanda-sp and FLAP, with their original allocation or SEAP's logistic schedule).
* ``routed``: no masks of its own; the router picks one of the ``task`` method's experts per
  input, falling back to the ``general`` method's mask below its confidence threshold.

Units: a method prunes heads and MLP channels (``neurons``; of a mixture-of-experts model, the
channels inside every expert), whole experts of an MoE model (``experts``), experts and the
channels inside the kept ones (``both``), or any of them (the SEAP rows); ``moe`` says whether
it runs on an MoE model at all (the dense baselines do not). With ``experts`` a SEAP
expert keeps the experts its task's tokens route to (the run's ``expert_score``: PreMoe's
TCESS by default), the general mask those of all tasks' tokens, and ``moe-frequency`` is the
task-agnostic baseline (selection frequency over the pooled corpora).

Bias compensation (FLAP) is a property of the method, stored in each mask it builds (the
calibration means travel with the mask), so applying a mask always does what its method says;
the run's ``bias_compensation`` option overrides it for every method (the study's "bias
compensation" rows).

Reconstruction (the run's ``reconstruct`` option, or a method's own ``reconstruct``) refits
each mask's ``o_proj`` / ``down_proj`` in closed form on calibration second moments
(:mod:`seap.maths.reconstruction`), and replaces bias compensation where both would apply.
Every method gets the same help, refitted on the text it was calibrated on
(:meth:`Method.refit_source`): a SEAP expert on its own task's corpus (or, with
``refit_corpus: pooled``, on all tasks' corpora while its mask stays task-specific), the
general mask and the pooled baselines on the pooled corpora. ``refit_corpus: per-task`` is
the control that separates the two halves of an expert (a task-specific mask, a task-specific
refit): the pooled baselines are then refitted on each task's own corpus too, one refitted
copy of their task-agnostic mask per task, evaluated like experts (the general mask stays
pooled: it is the routing fallback).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from seap.errors import SeapError

Calibration = Literal["task", "general", "pooled", "routed"]
UNITS = ("neurons", "experts", "both")  # what a run prunes (the run's `unit`; `auto` picks experts for MoE models)
SEAP_SCORE = "seap-sf"  # the default SEAP score (paper's s_F); the run's `score` option overrides it
SEAP_SCHEDULE = "logistic"  # the default SEAP schedule; the run's `schedule` option overrides it


def check_compensation(reconstruct: bool, bias_compensation: bool | str | None, drop: str,
                       off: str = "--no-reconstruct") -> None:
    """Refuse asking for both reconstruction and FLAP's bias compensation: the refit replaces
    it (a refit with a bias term is its generalisation). ``drop`` names the caller's option
    that asked for bias compensation, ``off`` how the caller turns reconstruction off (it is
    on by default), both for the message."""
    if reconstruct and bias_compensation:
        raise SeapError("reconstruction replaces bias compensation",
                        f"drop {drop}, or turn reconstruction off ({off}) to use FLAP's bias compensation; "
                        "--refit-bias (params.yaml reconstruction.bias) fits a bias as part of the refit")


@dataclass(frozen=True)
class Method:
    """One row kind of the results table.

    ``score`` and ``schedule`` of ``None`` mean "the run's SEAP score / schedule" (the
    ``score`` and ``schedule`` options), so the SEAP rows follow the configuration while
    each baseline keeps its own.
    """

    name: str
    calibration: Calibration
    description: str
    score: str | None = None
    schedule: str | None = None
    bias_compensation: bool = False
    reconstruct: bool | None = None  # None: the run's `reconstruct` option
    schedule_options: Mapping[str, Any] = field(default_factory=dict)
    family: Literal["seap", "baseline"] = "baseline"
    units: tuple[str, ...] = ("neurons",)  # what it can prune: heads and MLP channels, or whole MoE experts
    moe: bool = False  # whether it runs on a mixture-of-experts model (router statistics, expert masks)

    def resolved_score(self, run_score: str) -> str:
        return self.score or run_score

    def resolved_schedule(self, run_schedule: str) -> str:
        return self.schedule or run_schedule

    def resolved_reconstruct(self, run_reconstruct: bool) -> bool:
        return run_reconstruct if self.reconstruct is None else self.reconstruct

    def resolved_bias_compensation(self, run_override: bool | None, reconstruct: bool) -> bool:
        """FLAP-style bias compensation: the run's override, else the method's own; never
        together with reconstruction (the refit replaces it)."""
        if reconstruct:
            return False
        return self.bias_compensation if run_override is None else run_override

    def refit_source(self, refit_corpus: str) -> Literal["task", "pooled"]:
        """Which statistics a reconstructed mask is refitted on: each task's own (a SEAP expert
        unless ``refit_corpus: pooled``; a pooled baseline with ``refit_corpus: per-task``) or
        all tasks' merged (everything else)."""
        if refit_corpus == "pooled":
            return "pooled"
        if self.calibration == "task" or (self.calibration == "pooled" and refit_corpus == "per-task"):
            return "task"
        return "pooled"

    def refits_per_task(self, reconstruct: bool, refit_corpus: str) -> bool:
        """Whether this method's one task-agnostic mask becomes one refitted mask per task."""
        return reconstruct and self.calibration == "pooled" and self.refit_source(refit_corpus) == "task"

    @property
    def builds_masks(self) -> bool:
        return self.calibration != "routed"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("seap-expert", "task", "SEAP: one expert per task, from its own activations (MoE: its router's "
               "choices)", family="seap", units=UNITS, moe=True),
        Method("seap-general", "general", "SEAP-gen: one mask from the weighted sum of task scores (MoE: all tasks' "
               "router statistics)", family="seap", units=UNITS, moe=True),
        Method("seap-routed", "routed", "router picks the task's expert per input (general mask below threshold)",
               family="seap", units=UNITS, moe=True),
        Method("wanda-sp", "pooled", "Wanda-sp: |W| x ||X||, uniform sparsity", score="wanda-sp", schedule="uniform"),
        Method("wanda-sp+logistic", "pooled", "Wanda-sp score with SEAP's logistic schedule", score="wanda-sp",
               schedule="logistic"),
        Method("flap", "pooled", "FLAP: fluctuation score, adaptive allocation, bias compensation", score="flap",
               schedule="flap-adaptive", bias_compensation=True),
        Method("flap+logistic", "pooled", "FLAP score and bias compensation with SEAP's logistic schedule",
               score="flap", schedule="logistic", bias_compensation=True),
        Method("moe-frequency", "pooled", "task-agnostic expert pruning: the experts all tasks' tokens select most",
               score="frequency", units=("experts", "both"), moe=True),
    )
}
DENSE = "dense"  # the unpruned row every table starts with (not a method: nothing to build)
ROUTED_EXPERTS = "seap-expert"  # where the routed row takes its experts ...
ROUTED_FALLBACK = "seap-general"  # ... and its low-confidence fallback
BUDGET_ROW = "seap-budget"  # the row (and registered method) of the experts an accuracy budget sizes
BUDGET_GENERAL_ROW = "seap-budget-general"  # ... and of the general mask it sizes
BUDGET_UNIFORM_ROW = "seap-budget-uniform"  # one grid sparsity for every expert, the nearest the budget's mean
BUDGET_ROUTED_ROW = "seap-budget-routed"  # the router in front of those experts, that general mask its fallback
FALLBACK_MASK = "fallback"  # (in that routed row's output) the fallback mask it chose
DEFAULT_METHODS = ("seap-expert", "seap-general", "seap-routed", "wanda-sp", "flap")
MOE_DEFAULT_METHODS = ("seap-expert", "seap-general", "seap-routed", "moe-frequency")  # the default with unit experts
BASELINES = tuple(name for name, m in METHODS.items() if m.family == "baseline")
NEURON_METHODS = tuple(name for name, m in METHODS.items() if "neurons" in m.units)  # for a dense model
REFIT_CORPORA = ("own", "pooled", "per-task")  # what masks are refitted on (the run's `refit_corpus`)


def get_method(name: str) -> Method:
    """The method called ``name``; a :class:`SeapError` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise SeapError(f"unknown method {name!r}", f"use any of: {', '.join(METHODS)}") from None


def methods_to_build(names: list[str] | tuple[str, ...]) -> list[Method]:
    """The methods whose masks a run builds: the requested ones, plus the experts and general
    mask the routed row needs, in table order."""
    wanted = set(names)
    if "seap-routed" in wanted:
        wanted |= {ROUTED_EXPERTS, ROUTED_FALLBACK}
    return [m for name, m in METHODS.items() if name in wanted and m.builds_masks]


def row_key(method: str, sparsity: float) -> str:
    """``"<method>@<sparsity:g>"``: the one key of a table row (dense: ``"dense"``)."""
    return DENSE if method == DENSE else f"{method}@{sparsity:g}"


__all__ = ["FALLBACK_MASK", "BUDGET_GENERAL_ROW", "BUDGET_ROUTED_ROW", "BUDGET_ROW", "BUDGET_UNIFORM_ROW", "BASELINES", "DEFAULT_METHODS", "MOE_DEFAULT_METHODS", "NEURON_METHODS", "UNITS", "DENSE", "METHODS", "REFIT_CORPORA", "Method", "check_compensation", "get_method", "methods_to_build", "row_key"]
