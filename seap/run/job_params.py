"""The parameters of each stage's jobs, one typed dataclass per stage.

The planner (:mod:`seap.run.plan`) fills them from the run configuration; the stage functions
(:mod:`seap.run.stages`) read their attributes. A parameter can be followed from a front door
to the stage that uses it by name, with no string keys in between.

On disk (a job's cache key, ``seap plan --json``, a DVC stage) parameters are plain JSON:
:func:`params_to_dict` keeps only the fields that differ from their defaults, so a field
added later with a neutral default leaves every earlier cache key as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelParams:
    """``model``: which base model, on which device, in which dtype, and where its layers and the
    calibration hidden states wait between layers (``offload``)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "disk"


@dataclass(frozen=True)
class CorpusParams:
    """``corpus``: calibration corpora of the tasks' train splits (``tasks`` of the catalogue in
    ``data_dir``), or of a records file (``records``: JSON/JSONL task records or ``builtin``;
    ``tasks`` then keeps only those of its tasks, all when ``None``)."""

    tasks: list[str] | None
    samples: int | None
    seed: int
    max_tokens: int
    data_dir: str | None = None
    records: str | None = None


@dataclass(frozen=True)
class StatisticsParams:
    """``statistics``: one pass over each task's corpus (``tasks``), one shard of it, the shards
    merged, or all tasks pooled. ``moe``: router statistics of a mixture-of-experts model
    (with channel sums unless ``unit`` is ``experts``)."""

    tasks: list[str]
    batch_size: int | None = None
    shard: list[int] | None = None
    moe: bool = False
    unit: str | None = None


@dataclass(frozen=True)
class ScoresParams:
    """``scores``: one score of one task's statistics (or of the pooled ones)."""

    score: str
    task: str


@dataclass(frozen=True)
class MaskParams:
    """``masks``: one mask of one method at one sparsity (the row), named ``mask`` (a task, or
    ``general``), of ``kind`` expert or general.

    Dense models: ``score`` names the scores read, ``schedule`` (with ``schedule_options``)
    allocates each layer's sparsity, ``bias_compensation`` stores FLAP's means, ``refit``
    (the :class:`~seap.maths.reconstruction.RefitOptions` that differ from their defaults) refits
    it where it is built with the text to refit on (``seap masks``; the plan refits in its
    ``refits`` stage). Mixture-of-experts models (``moe``): ``score`` is the expert score and
    ``unit`` says what is pruned."""

    method: str
    row: str
    mask: str
    kind: str
    sparsity: float
    score: str
    schedule: str
    schedule_options: dict[str, Any] = field(default_factory=dict)
    gqa_mode: str | None = None
    bias_compensation: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    refit: dict[str, Any] | None = None
    moe: bool = False
    unit: str | None = None
    allow_k_reduction: bool = False
    up_to_reachable: bool = False  # (a budget's candidate) beyond what the schedule reaches: built at its limit


@dataclass(frozen=True)
class RefitParams:
    """``refits``: the walk (``refits/walk``) that refits every mask of its inputs on the
    calibration text in one pass over the model's layers, each on its ``tasks`` entry (a task's
    text, or every task's for ``None``) plus the generic text, with the
    :class:`~seap.maths.reconstruction.RefitOptions` that differ from their defaults (``refit``)
    in batches of ``batch_size``; or one refitted mask (``member``: ``<row>/<name>``) taken from
    its walk."""

    refit: dict[str, Any] | None = None
    tasks: dict[str, str | None] = field(default_factory=dict)
    batch_size: int = 8
    member: str | None = None


@dataclass(frozen=True)
class EvaluationParams:
    """``evaluate-dense``, ``evaluate`` and ``evaluate-routed``: one row of the table."""

    tasks: list[str]
    data_dir: str | None
    limit: int | None
    num_fewshot: int
    metric: str
    batch_size: int
    method: str
    sparsity: float
    per_task: bool | None = None
    threshold: float | None = None  # (routed)
    router_kind: str | None = None  # (routed; None: the trained features router)


@dataclass(frozen=True)
class RouterParams:
    """``router``: the task router, trained on the tasks' training prompts."""

    tasks: list[str]
    data_dir: str | None
    prompts_per_task: int
    feature_layer: int
    seed: int
    threshold: float


@dataclass(frozen=True)
class PerplexityParams:
    """``perplexity``: WikiText-2 perplexity of the dense model or one general mask (``row``)."""

    data_dir: str | None
    windows: int | None
    row: str


@dataclass(frozen=True)
class BenchParams:
    """``bench``: speed of dense against every distinct pruned shape."""

    repeats: int
    llama_cpp: str = "off"
    engine: str = "pytorch"  # (candidate-speed) where the candidates are timed: pytorch, or llama.cpp (llama_cpp: where)


@dataclass(frozen=True)
class ReportParams:
    """``report``: the results of the rows (Table 1 and its files)."""

    metric: str
    tasks: list[str]
    data_dir: str | None
    limit: int | None
    num_fewshot: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisterParams:
    """``register``: the local registry and MLflow (``run_params``/``run_tags``: what the
    front door adds to the MLflow run)."""

    score: str
    schedule: str
    registry_dir: str
    mlflow: bool
    tracking_uri: str | None
    mlflow_dir: str
    experiment: str
    run_params: dict[str, Any] = field(default_factory=dict)
    run_tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointParams:
    """``checkpoint``: the hard-pruned model of one mask, saved as a checkpoint (``seap prune``)."""

    row: str
    mask: str


@dataclass(frozen=True)
class SelectionParams:
    """``selection``: the data folder of the run's tasks with each train split cut in two
    (:func:`seap.data.selection.write_selection_data`): ``items`` held out to select, the rest
    calibrates."""

    tasks: list[str]
    data_dir: str | None
    items: int
    seed: int


@dataclass(frozen=True)
class BudgetParams:
    """``budget``: each task's sparsity under the accuracy budget (``max_drop`` points, or
    ``max_drop_rel`` of the dense model's margin over chance), chosen from the candidates'
    selection rows; or (``member``) one task's chosen expert, copied from that choice."""

    tasks: list[str] = field(default_factory=list)
    metric: str = "acc"
    max_drop: float | None = None
    max_drop_rel: float | None = None
    min_speedup: float | None = None
    member: str | None = None
    confidence: float = 0.0  # standard errors of the paired drop added before it is held against the budget


@dataclass(frozen=True)
class SearchParams:
    """``search``: the accuracy budget's bisection. Each member (a task's expert, or ``general``)
    is built from its ``masks`` template (:class:`MaskParams` as JSON, its sparsity set per
    probe), refitted on its ``refit_tasks`` entry's text (``refit``: the options; ``None``: not
    refitted) and scored on the selection items with the ``evaluation`` parameters, round by
    round, on the grid ``step, 2 step, ...`` up to ``ceiling``."""

    tasks: list[str]
    metric: str
    max_drop: float | None
    max_drop_rel: float | None
    step: float
    ceiling: float
    masks: dict[str, Any]
    evaluation: dict[str, Any]
    refit: dict[str, Any] | None = None
    refit_tasks: dict[str, str | None] = field(default_factory=dict)
    batch_size: int = 8
    confidence: float = 0.0  # (as the budget's)


STAGE_PARAMS: dict[str, type] = {
    "model": ModelParams,
    "selection": SelectionParams,
    "corpus": CorpusParams,
    "statistics": StatisticsParams,
    "scores": ScoresParams,
    "masks": MaskParams,
    "refits": RefitParams,
    "evaluate-dense": EvaluationParams,
    "evaluate": EvaluationParams,
    "select": EvaluationParams,
    "search": SearchParams,
    "budget": BudgetParams,
    "router": RouterParams,
    "evaluate-routed": EvaluationParams,
    "perplexity": PerplexityParams,
    "bench": BenchParams,
    "report": ReportParams,
    "register": RegisterParams,
    "checkpoint": CheckpointParams,
}


def params_to_dict(params: Any) -> dict[str, Any]:
    """A stage's parameters as plain JSON: the fields that differ from their defaults (required
    fields always), in declaration order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = value
    return out


def params_from_dict(stage: str, data: Mapping[str, Any]) -> Any:
    """The typed parameters of a job of ``stage`` from :func:`params_to_dict`'s form."""
    return STAGE_PARAMS[stage](**dict(data))


__all__ = ["STAGE_PARAMS", "BenchParams", "BudgetParams", "CheckpointParams", "CorpusParams", "EvaluationParams", "MaskParams",
           "ModelParams", "PerplexityParams", "RefitParams", "RegisterParams", "ReportParams", "RouterParams", "SearchParams", "ScoresParams",
           "SelectionParams", "StatisticsParams", "params_from_dict", "params_to_dict"]
