"""The quality study's design, shared by its driver, analysis and tables: the methods it
compares, the ways of compensating the pruned layers, and the headline's chance margin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STUDY_METHODS = ("seap-expert", "seap-general", "seap-routed", "wanda-sp", "wanda-sp+logistic", "flap",
                 "flap+logistic")
SAME_SCHEDULE = {"wanda-sp+logistic": "logistic", "flap+logistic": "logistic"}  # baselines on SEAP's schedule
SELECTION_METHODS = ("seap-expert", "wanda-sp+logistic", "flap+logistic")
CONTROL = "control-per-task"  # the chosen refit with the baselines refitted on each task's own corpus too
CONTROL_METHODS = ("seap-expert", "wanda-sp+logistic", "flap+logistic")
CHANCE_MARGIN = 0.05  # tasks where dense is within 5 points of chance stay out of the headline average


@dataclass(frozen=True)
class Compensation:
    """One way of helping the layers that lost inputs: run-configuration changes."""

    name: str
    label: str
    changes: Mapping[str, Any]


NO_COMPENSATION = Compensation("none", "none", {"reconstruct": False, "bias_compensation": False})
BIAS_COMPENSATION = Compensation("bias", "bias compensation", {"reconstruct": False, "bias_compensation": True})

__all__ = ["BIAS_COMPENSATION", "CHANCE_MARGIN", "CONTROL", "CONTROL_METHODS", "NO_COMPENSATION", "SAME_SCHEDULE",
           "SELECTION_METHODS", "STUDY_METHODS", "Compensation"]
