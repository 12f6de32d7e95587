"""The planner: a :class:`~seap.run.config.RunConfig` in, the list of jobs out.

Every front door walks this one plan: ``seap eval`` (:mod:`seap.run.execute`), the DVC stages
(:mod:`seap.run.dvc`, one ``dvc.yaml`` stage per :data:`STAGES` entry) and the Prefect flow
(``flows/pipeline.py``, one task per job). None of them decides what to build.

A job is one unit of work with a stable key ``<stage>/<name>`` (``masks/seap-expert@0.2/capitals``),
the keys of the jobs whose outputs it reads (``inputs``, by role) and the parameters it needs
(``params``, plain JSON). Jobs come in dependency order. The stage table says, per stage,
which library modules it runs (the DVC dependencies and the Prefect cache-key sources are
both generated from it) and which configuration options it reads (the DVC ``params``).

    model -> corpus -> statistics -> scores -> masks -> evaluate ------------\\
        \\-> evaluate-dense ---------------------------------------------> report -> register
        \\-> router -> evaluate-routed (experts, general, expert row) -------/
                                     bench, perplexity (masks) ----------/
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from seap.errors import SeapError
from seap.run.config import DataSection, ModelSection, RunConfig, task_name
from seap.run.job_params import (
    BenchParams,
    BudgetParams,
    CheckpointParams,
    CorpusParams,
    EvaluationParams,
    MaskParams,
    ModelParams,
    PerplexityParams,
    RefitParams,
    RegisterParams,
    ReportParams,
    RouterParams,
    ScoresParams,
    SearchParams,
    SelectionParams,
    StatisticsParams,
    params_from_dict,
    params_to_dict,
)
from seap.run.methods import (
    BUDGET_GENERAL_ROW,
    BUDGET_ROUTED_ROW,
    BUDGET_ROW,
    BUDGET_UNIFORM_ROW,
    DENSE,
    METHODS,
    ROUTED_EXPERTS,
    ROUTED_FALLBACK,
    Method,
    methods_to_build,
    row_key,
)

GENERAL = "general"  # the mask name of a method with one mask for all tasks
GENERIC = "generic"  # the corpus of generic text added to every refit (refit_generic)
POOLED = "pooled"  # the statistics (and scores) of all tasks' corpora merged


@dataclass(frozen=True)
class Stage:
    """One kind of job: what it runs and what it reads.

    ``modules``: the ``seap`` modules whose source the stage runs (a change re-runs it);
    ``options``: the :class:`RunConfig` fields its jobs read; ``upstream``: the stages whose
    outputs it may read; ``cached``: whether a finished output is reused (registration is
    idempotent instead, and always runs); ``pipeline``: whether the evaluation pipeline runs it
    (a ``dvc.yaml`` stage, a task of the flow) or only ``seap prune``.
    """

    name: str
    description: str
    modules: tuple[str, ...]
    options: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    cached: bool = True
    pipeline: bool = True


_APPLY = ("seap.maths.mask_formats", "seap.model.masking", "seap.model.pruning", "seap.model.surgery",
          "seap.maths.masks", "seap.model.expert_pruning", "seap.maths.expert_selection",
          "seap.model.adapters.moe")  # reading any mask and applying it
_EVAL = ("seap.evaluation.rows", "seap.evaluation.harness", "seap.evaluation.loglikelihood", "seap.evaluation.metrics",
         "seap.data.catalogue", *_APPLY)
_BASE = ("seap.run.stages", "seap.model.loading", "seap.model.loaded", "seap.model.adapters")
_EVAL_OPTIONS = ("tasks", "data_dir", "limit", "num_fewshot", "metric", "eval_batch_size")
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("model", "resolve the base model (fetch or convert once) and record its content digest",
              ("seap.run.stages", "seap.model.loading", "seap.model.layer_stream", "seap.model.shards"), ("model", "device", "dtype", "offload"),
              cached=False),
        Stage("selection", "with an accuracy budget: each task's train split cut in two, the part that "
              "calibrates and the held-out selection items",
              ("seap.run.stages", "seap.data.selection", "seap.data.corpus", "seap.data.starter", "seap.data.catalogue"),
              ("tasks", "data_dir", "seed", "selection_items")),
        Stage("corpus", "calibration corpora of the tasks' train splits",
              ("seap.run.stages", "seap.data.corpus", "seap.data.starter", "seap.data.catalogue"),
              ("tasks", "data_dir", "samples", "seed", "max_tokens", "reconstruct", "refit_generic",
               "refit_generic_samples"), ("selection",)),
        Stage("statistics", "activation statistics per task (and pooled over all tasks, for the baselines)",
              (*_BASE, "seap.model.calibration", "seap.model.batching", "seap.model.layer_stream", "seap.model.shards", "seap.model.hooks",
               "seap.maths.moments",
               "seap.maths.statistics",
               "seap.data.corpus", "seap.model.expert_pruning", "seap.maths.expert_selection", "seap.model.adapters.moe",
               "seap.model.devices"),
              ("stats_batch_size", "stats_shards", "methods", "unit"),
              ("model", "corpus")),
        Stage("scores", "importance scores of heads and channels",
              ("seap.run.stages", "seap.run.commands", "seap.maths.scores", "seap.maths.statistics"),
              ("score", "methods"), ("statistics",)),
        Stage("masks", "per-layer sparsity and one mask per expert, general mask and baseline",
              (*_BASE, "seap.run.commands", "seap.run.mask_building", "seap.model.pruning", "seap.maths.masks",
               "seap.maths.schedules", "seap.maths.geometry", "seap.maths.scores", "seap.maths.statistics",
               "seap.data.corpus", "seap.maths.expert_selection"),
              ("sparsities", "methods", "schedule", "schedule_k", "schedule_x0", "protect_first", "protect_last",
               "channel_multiple", "same_width", "gqa_mode", "bias_compensation", "general_weights", "reconstruct",
               "unit", "expert_score", "allow_k_reduction"),
              ("scores", "statistics")),
        Stage("refits", "the masks refitted on their calibration text: one walk over the model's layers "
              "refits all of them, at every sparsity (least squares on each layer's second moments, built "
              "and freed layer by layer)",
              (*_BASE, "seap.maths.masks", "seap.maths.mask_formats", "seap.run.mask_building", "seap.maths.moments",
               "seap.maths.reconstruction", "seap.model.refitting",
               "seap.model.batching", "seap.model.layer_stream", "seap.model.shards", "seap.model.hooks",
               "seap.model.surgery", "seap.data.corpus", "seap.io", "seap.model.devices"),
              ("sparsities", "methods", "reconstruct", "refit_alpha", "refit_prior", "refit_bias", "refit_sequential",
               "refit_corpus", "refit_generic", "stats_batch_size"),
              ("masks", "model", "corpus")),
        Stage("evaluate-dense", "the dense row (a sparsity change never re-runs it)", (*_BASE, *_EVAL),
              _EVAL_OPTIONS, ("model",)),
        Stage("evaluate", "one row per method and sparsity (experts: each task with its own)",
              (*_BASE, *_EVAL),
              _EVAL_OPTIONS, ("model", "masks", "refits", "budget", "search")),
        Stage("select", "with an accuracy budget: the dense model and each candidate expert of the search on the "
              "held-out selection items", (*_BASE, *_EVAL), (*_EVAL_OPTIONS, "budget_grid"),
              ("model", "masks", "refits", "selection")),
        Stage("search", "with an accuracy budget searched by bisection: rounds of candidate experts (one per "
              "task and round, and the general mask), each round's masks built, refitted in one walk and scored on "
              "the selection items, until each task's sparsity is known to within the step",
              (*_BASE, *_EVAL, "seap.run.commands", "seap.run.mask_building", "seap.maths.schedules", "seap.maths.geometry", "seap.maths.scores", "seap.maths.statistics",
               "seap.maths.moments", "seap.maths.reconstruction", "seap.model.refitting", "seap.model.batching",
               "seap.model.layer_stream", "seap.model.shards", "seap.model.hooks", "seap.data.corpus", "seap.io",
               "seap.model.devices", "seap.maths.budget", "seap.run.job_params", "seap.run.methods",
               "seap.evaluation.significance"),
              (*_EVAL_OPTIONS, "budget_grid", "budget_search", "budget_step", "max_drop", "max_drop_rel",
               "budget_confidence",
               "schedule", "schedule_k", "schedule_x0", "protect_first", "protect_last", "channel_multiple",
               "same_width", "gqa_mode", "reconstruct", "refit_alpha", "refit_prior", "refit_bias",
               "refit_sequential", "refit_corpus", "refit_generic", "stats_batch_size", "score"),
              ("model", "selection", "select", "corpus", "scores", "statistics")),
        Stage("candidate-speed", "with a speed target: the prefill speed of dense and of each candidate shape of "
              "the search", (*_BASE, "seap.evaluation.speed", *_APPLY, "seap.evaluation.llama_cpp_runtime",
                             "seap.export.to_gguf", "seap.export.gguf_names", "seap.export.bpe_pretokenizers"),
              ("bench_repeats", "min_speedup", "speedup_engine", "bench_llama_cpp"),
              ("model", "masks", "refits")),
        Stage("budget", "each task's sparsity under the accuracy budget (the largest candidate whose selection "
              "accuracy keeps within it) and the speed target, and its expert",
              ("seap.run.stages", "seap.maths.budget", "seap.maths.schedules", "seap.evaluation.budget_plot",
               "seap.evaluation.metrics", "seap.evaluation.significance",
               "seap.maths.mask_formats", "seap.maths.masks", "seap.io"),
              ("max_drop", "max_drop_rel", "min_speedup", "budget_grid", "metric", "budget_confidence"),
              ("select", "search", "candidate-speed", "masks", "refits")),
        Stage("router", "the task router on the tasks' training prompts",
              (*_BASE, "seap.evaluation.router", "seap.evaluation.harness", "seap.data.catalogue",
               "seap.model.calibration"),
              ("tasks", "data_dir", "seed", "router_prompts", "router_layer", "router_threshold", "methods"),
              ("model",)),
        Stage("evaluate-routed", "the routed row: the router's expert per input (reusing the expert row where "
              "the router picks the task's own expert)",
              (*_BASE, *_EVAL, "seap.evaluation.router", "seap.evaluation.routed", "seap.maths.budget", "seap.run.methods"),
              (*_EVAL_OPTIONS, "router_threshold", "router_kind"),
              ("model", "masks", "refits", "router", "evaluate", "evaluate-dense", "budget")),
        Stage("perplexity", "WikiText-2 perplexity of dense and each general mask",
              (*_BASE, "seap.evaluation.harness", *_APPLY),
              ("perplexity", "perplexity_windows", "data_dir"), ("model", "masks", "refits")),
        Stage("bench", "prefill and decode speed of dense and each distinct pruned shape",
              (*_BASE, "seap.evaluation.speed", *_APPLY, "seap.evaluation.llama_cpp_runtime",
               "seap.export.to_gguf", "seap.export.gguf_names", "seap.export.bpe_pretokenizers"),
              ("bench", "bench_repeats", "bench_llama_cpp"), ("model", "masks", "refits", "budget")),
        Stage("report", "Table 1, results.json, metrics, CSV and plot",
              ("seap.run.stages", "seap.evaluation.report", "seap.evaluation.metrics", "seap.evaluation.harness",
               "seap.evaluation.router", "seap.evaluation.rows", "seap.data.catalogue", "seap.evaluation.significance"),
              ("metric", "tasks", "data_dir", "limit", "num_fewshot"),
              ("evaluate-dense", "evaluate", "evaluate-routed", "router", "bench", "perplexity", "budget")),
        Stage("register", "every SEAP expert, general mask and routed bundle in the local registry and MLflow",
              ("seap.run.stages", "seap.registry.records", "seap.evaluation.metrics",
               "seap.maths.budget", "seap.maths.mask_formats"),
              ("registry_dir", "mlflow", "tracking_uri", "mlflow_dir", "experiment"),
              ("report", "masks", "refits", "router", "budget", "evaluate-routed"), cached=False),
        Stage("checkpoint", "the hard-pruned model of one mask, saved as a checkpoint (`seap prune`)",
              (*_BASE, "seap.model.checkpoint", "seap.model.layer_stream", "seap.model.shards", *_APPLY),
              (), ("model", "masks", "refits", "budget"), pipeline=False),
    )
}


PIPELINE_STAGES = tuple(name for name, s in STAGES.items() if s.pipeline)  # dvc.yaml's stages, the flow's tasks


def is_reference(value: Any) -> bool:
    """A resolved input: ``{"path": ..., "digest": ...}`` (a job's output folder and its content)."""
    return isinstance(value, Mapping) and set(value) == {"path", "digest"}


def map_inputs(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` (one role of a job's inputs) with ``leaf`` applied to each job key (a string)
    or resolved reference in it, keeping its nesting (mappings, lists) and ``None``."""
    if value is None:
        return None
    if isinstance(value, str) or is_reference(value):
        return leaf(value)
    if isinstance(value, Mapping):
        return {k: map_inputs(v, leaf) for k, v in value.items()}
    return [map_inputs(v, leaf) for v in value]


def input_leaves(value: Any) -> list[Any]:
    """The job keys or references in ``value``, in order."""
    found: list[Any] = []
    map_inputs(value, found.append)
    return found


@dataclass(frozen=True)
class Job:
    """One unit of work: ``stage`` + ``name`` (unique), the jobs it reads, its parameters (the
    stage's dataclass of :mod:`seap.run.job_params`)."""

    stage: str
    name: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)  # role -> job key, list of keys, or {name: key}
    params: Any = None
    row: str | None = None  # the table row this job evaluates, if any

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}" if self.name else self.stage

    def input_keys(self) -> list[str]:
        """Every job key this job reads, in a stable order."""
        keys: list[str] = []
        for value in self.inputs.values():
            keys.extend(_keys(value))
        return keys

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "name": self.name, "inputs": dict(self.inputs),
                "params": params_to_dict(self.params) if self.params is not None else {}, "row": self.row}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        return cls(data["stage"], data.get("name", ""), data.get("inputs", {}),
                   params_from_dict(data["stage"], data.get("params", {})), data.get("row"))


def _keys(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    values = value.values() if isinstance(value, Mapping) else value
    return [key for v in values for key in _keys(v)]


@dataclass
class Plan:
    """The jobs of one run, in dependency order, and the configuration they came from."""

    config: RunConfig
    jobs: list[Job]
    given: frozenset[str] = frozenset()  # keys of outputs supplied from outside (existing masks)

    def __iter__(self) -> Iterable[Job]:  # type: ignore[override]
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, key: str) -> Job:
        for job in self.jobs:
            if job.key == key:
                return job
        raise KeyError(key)

    def of_stage(self, stage: str) -> list[Job]:
        return [j for j in self.jobs if j.stage == stage]

    @property
    def stages(self) -> list[str]:
        """The stages this plan uses, in :data:`STAGES` order."""
        used = {j.stage for j in self.jobs}
        return [s for s in STAGES if s in used]

    @property
    def rows(self) -> list[str]:
        """The table rows it evaluates, in report order."""
        return [j.row for j in self.jobs if j.row]

    def upstream_of(self, keys: Iterable[str]) -> Plan:
        """The sub-plan that produces ``keys``: those jobs and everything they read, in order."""
        wanted = set(keys)
        for job in reversed(self.jobs):
            if job.key in wanted:
                wanted.update(job.input_keys())
        return Plan(self.config, [j for j in self.jobs if j.key in wanted], self.given)

    def mask_groups(self) -> dict[str, dict[str, str]]:
        """Row key -> {mask name: job key} of every mask group (what registration and bench read)."""
        refitted = {j.name: j.key for j in self.of_stage("refits") if j.params.member}  # (the refitted masks)
        groups: dict[str, dict[str, str]] = {}
        for j in self.of_stage("masks"):
            groups.setdefault(j.params.row, {})[j.params.mask] = refitted.get(j.name, j.key)
        return groups


def make_plan(config: RunConfig) -> Plan:
    """The jobs for ``config``, in dependency order (``config`` is validated first): the masks
    of every method and sparsity, then their evaluation, routing, speed, report and registry."""
    config.validate(check_data=False)
    candidates: dict[str, dict[str, str]] = {}
    jobs, mask_jobs = mask_chain(config, _corpus(config.data, data_dir=config.data.data_dir), candidates)
    return _finish_plan(config, jobs, mask_jobs, candidates)


def make_prune_plan(config: RunConfig, records: str) -> Plan:
    """The one job chain of ``seap prune``: the masks chain of ``config`` (one method, one
    sparsity, the tasks of the calibration ``records`` file) and the hard-pruned checkpoint of
    its one mask. With an accuracy budget (or a speed target) the one task's expert is sized by
    the same search as ``seap eval``'s (:func:`_search_jobs`; calibration and selection items
    from the task's train split, ``records`` unused) and that expert is the checkpoint. The
    same planner, stage functions and cache as :func:`make_plan`."""
    config.validate(check_data=False)
    if len(config.masks.methods) != 1 or len(config.masks.sparsities) != 1:
        raise SeapError("a one-shot prune builds one mask", "give one method and one sparsity")
    if config.budget.enabled:  # the expert sized by the budget's search (tasks, not a records file)
        candidates: dict[str, dict[str, str]] = {}
        jobs, _ = mask_chain(config, _corpus(config.data, data_dir=config.data.data_dir), candidates)
        _search_jobs(config, jobs, candidates)
        (task,) = config.data.task_names
        jobs.append(Job("checkpoint", "", {"model": "model", "mask": f"budget/{task}"},
                        CheckpointParams(row=BUDGET_ROW, mask=task)))
        plan = Plan(config, jobs)
        check_plan(plan)
        return plan
    jobs, mask_jobs = mask_chain(config, _corpus(config.data, records=records))
    (row, group), = mask_jobs.items()
    if len(group) != 1:
        raise SeapError(f"{row} builds {len(group)} masks ({', '.join(group)}), a one-shot prune one",
                        "prune for one task (--task NAME), or use the general mask")
    (name, key), = group.items()
    jobs.append(Job("checkpoint", "", {"model": "model", "mask": key}, CheckpointParams(row=row, mask=name)))
    plan = Plan(config, jobs)
    check_plan(plan)
    return plan


def _model_job(model: ModelSection) -> Job:
    return Job("model", params=ModelParams(model=model.model, device=model.device, dtype=model.dtype,
                                           offload=model.offload))


def _corpus(data: DataSection, **source: Any) -> CorpusParams:
    """The calibration corpus of the run's tasks, from ``source`` (``data_dir`` or ``records``)."""
    return CorpusParams(tasks=list(data.tasks), samples=data.samples, seed=data.seed, max_tokens=data.max_tokens,
                        **source)


def mask_chain(c: RunConfig, corpus: CorpusParams, candidates: dict[str, dict[str, str]] | None = None
               ) -> tuple[list[Job], dict[str, dict[str, str]]]:
    """The jobs up to the masks: model, corpus (``corpus``), statistics, scores and one mask job
    per method, sparsity and mask name; and row -> mask name -> job key of the masks. Every
    unit goes through here (a mixture-of-experts model: :func:`_expert_jobs`).

    With an accuracy budget, the corpus comes from the calibrating part of each task's train
    split (a ``selection`` job holds the rest out), and ``candidates`` is filled with the SEAP
    experts the search tries: row (``seap-expert@<s>`` for each sparsity of the grid) -> task
    -> job key (a candidate at one of the run's sparsities is that row's expert)."""
    tasks = c.data.task_names
    masks, rec, stats = c.masks, c.reconstruction, c.statistics
    methods = methods_to_build(masks.methods)
    jobs: list[Job] = [_model_job(c.model)]
    if c.budget.enabled:
        jobs.append(Job("selection", params=SelectionParams(tasks=list(c.data.tasks), data_dir=c.data.data_dir,
                                                            items=c.budget.selection_items, seed=c.data.seed)))
        jobs.append(Job("corpus", "", {"data": "selection"}, corpus))
    else:
        jobs.append(Job("corpus", params=corpus))
    if c.moe:
        return _expert_jobs(c, tasks, methods, jobs)
    add = jobs.append
    reconstructing = [m for m in methods if m.resolved_reconstruct(rec.reconstruct)]
    pooled = any(m.calibration == "pooled" for m in methods)
    generic = [task_name(t) for t in rec.refit_generic] if reconstructing else []
    if generic:  # generic text added to every refit's calibration text: its own corpus
        add(Job("corpus", GENERIC, params=CorpusParams(tasks=list(rec.refit_generic), data_dir=c.data.data_dir,
                                                       samples=rec.refit_generic_samples or c.data.samples,
                                                       seed=c.data.seed, max_tokens=c.data.max_tokens)))
    # statistics: one pass per task, or shards merged exactly
    if stats.stats_shards > 1:
        shards = [f"statistics/shard-{i}-of-{stats.stats_shards}" for i in range(stats.stats_shards)]
        for i, key in enumerate(shards):
            add(Job("statistics", key.split("/", 1)[1], {"model": "model", "corpus": "corpus"},
                    StatisticsParams(tasks=tasks, batch_size=stats.stats_batch_size, shard=[i, stats.stats_shards])))
        add(Job("statistics", "tasks", {"shards": shards}, StatisticsParams(tasks=tasks)))
    else:
        add(Job("statistics", "tasks", {"model": "model", "corpus": "corpus"},
                StatisticsParams(tasks=tasks, batch_size=stats.stats_batch_size)))
    if pooled:
        add(Job("statistics", POOLED, {"statistics": "statistics/tasks"}, StatisticsParams(tasks=tasks)))

    # scores: SEAP's per task; each pooled method's score on the pooled statistics
    score_keys: dict[tuple[str, str], str] = {}
    searched = METHODS[ROUTED_EXPERTS]  # (the experts an accuracy budget sizes)
    for m in [*methods, *([searched] if c.budget.enabled and searched not in methods else [])]:
        score = m.resolved_score(masks.score)
        for source in ([POOLED] if m.calibration == "pooled" else tasks):
            if (score, source) not in score_keys:
                job = Job("scores", f"{score}/{source}",
                          {"statistics": "statistics/pooled" if source == POOLED else "statistics/tasks"},
                          ScoresParams(score=score, task=source))
                add(job)
                score_keys[(score, source)] = job.key

    # masks and their rows
    mask_jobs: dict[str, dict[str, str]] = {}
    refitted: dict[float, dict[str, tuple[str, str | None]]] = {}  # sparsity -> row/name -> (mask job, task)

    def masks_of(m: Method, sparsity: float, up_to_reachable: bool = False) -> dict[str, str]:
        """The masks of method ``m`` at ``sparsity`` (name -> job key), each to be refitted when
        the method is (``up_to_reachable``: a search's candidate, built at the schedule's limit
        when the sparsity is past it)."""
        row = row_key(m.name, sparsity)
        reconstruct = m.resolved_reconstruct(rec.reconstruct)
        common = _mask_params(c, m, sparsity)
        group: dict[str, str] = {}
        per_task = m.refits_per_task(reconstruct, rec.refit_corpus)
        for name, inputs in _mask_inputs(m, c, tasks, score_keys, per_task):
            job = Job("masks", f"{row}/{name}", inputs,
                      MaskParams(mask=name, up_to_reachable=up_to_reachable, **common))  # type: ignore[arg-type]
            add(job)
            group[name] = job.key
            if reconstruct:  # refitted in the walk
                source = m.refit_source(rec.refit_corpus)
                refitted.setdefault(sparsity, {})[f"{row}/{name}"] = (job.key, name if source == "task" else None)
        return group

    for sparsity in masks.sparsities:
        for m in methods:
            mask_jobs[row_key(m.name, sparsity)] = masks_of(m, sparsity)
    if c.budget.enabled and candidates is not None:  # the search's candidates, refitted in the same walk
        general = METHODS[ROUTED_FALLBACK]  # (sized too when the run builds the general mask)
        # a grid: every grid sparsity; a bisection: the run's own sparsities (its first measured points,
        # and the uniform comparison), the rest found by the search job
        bisect = c.budget.budget_search == "bisect"
        for m in [searched, *([general] if general in methods else [])]:
            for sparsity in (masks.sparsities if bisect else c.budget.budget_grid):
                # (past what the schedule reaches: built at its limit, not taken)
                row = row_key(m.name, sparsity)
                candidates[row] = dict(mask_jobs[row]) if row in mask_jobs else masks_of(m, sparsity, up_to_reachable=True)
    # refits: one walk refits every mask of every sparsity (each layer's second moments, built once
    # per part of the text, serve them all); each refitted mask is then a job of its own
    members = {m: v for at in refitted.values() for m, v in at.items()}
    if members:
        walk = Job("refits", "walk",
                   {"model": "model", "refit_corpus": "corpus", "masks": {m: key for m, (key, _) in members.items()},
                    **({"refit_generic": f"corpus/{GENERIC}"} if generic else {})},
                   RefitParams(refit=rec.refit_options, tasks={m: t for m, (_, t) in members.items()},
                               batch_size=stats.stats_batch_size))
        add(walk)
        for member in members:
            row, name = member.split("/", 1)
            job = Job("refits", member, {"walk": walk.key}, RefitParams(member=member))
            add(job)
            for group in (mask_jobs, candidates if candidates is not None else {}):
                if row in group:
                    group[row][name] = job.key
    return jobs, mask_jobs


def _expert_jobs(c: RunConfig, tasks: list[str], methods: list[Method], jobs: list[Job]
                 ) -> tuple[list[Job], dict[str, dict[str, str]]]:
    """The jobs after model and corpus for a mixture-of-experts model (every unit: ``moe`` in
    their parameters): router statistics per task (and pooled; with channel sums unless the
    unit is experts), then one expert mask per task (SEAP experts, on the run's
    ``expert_score``), one general mask (all tasks' router statistics) and each pooled
    method's mask (its own score on the pooled statistics). Nothing is refitted."""
    add = jobs.append
    unit, masks = c.resolved_unit, c.masks
    add(Job("statistics", "tasks", {"model": "model", "corpus": "corpus"},
            StatisticsParams(tasks=tasks, batch_size=c.statistics.stats_batch_size, unit=unit, moe=True)))
    if any(m.calibration != "task" for m in methods):
        add(Job("statistics", POOLED, {"statistics": "statistics/tasks"},
                StatisticsParams(tasks=tasks, unit=unit, moe=True)))
    mask_jobs: dict[str, dict[str, str]] = {}
    for sparsity in masks.sparsities:
        for m in methods:
            row = row_key(m.name, sparsity)
            schedule = m.resolved_schedule(masks.schedule)
            names = [(t, "statistics/tasks") for t in tasks] if m.calibration == "task" else \
                [(GENERAL, "statistics/pooled")]
            group = {}
            for name, source in names:
                job = Job("masks", f"{row}/{name}", {"statistics": source},
                          MaskParams(method=m.name, row=row, mask=name, kind=_kind(m), sparsity=sparsity,
                                     score=m.score or masks.expert_score, schedule=schedule,
                                     schedule_options={**masks.schedule_options, **m.schedule_options}
                                     if schedule == "logistic" else {},
                                     moe=True, unit=unit, allow_k_reduction=masks.allow_k_reduction))
                add(job)
                group[name] = job.key
            mask_jobs[row] = group
    return jobs, mask_jobs


def _finish_plan(c: RunConfig, jobs: list[Job], mask_jobs: dict[str, dict[str, str]],
                 candidates: Mapping[str, Mapping[str, str]] | None = None) -> Plan:
    """``jobs`` (up to the masks, ``mask_jobs``: row -> mask name -> job key) and what follows,
    the same for every unit: evaluation rows, router and routed rows, perplexity, bench,
    report and registration; with an accuracy budget, the search over ``candidates`` and the
    ``seap-budget`` row (:func:`_budget_jobs`)."""
    add = jobs.append
    masks, router = c.masks, c.router
    methods = methods_to_build(masks.methods)
    # evaluation rows: dense, then per sparsity in method-table order
    rows: dict[str, str] = {}
    dense = Job("evaluate-dense", DENSE, {"model": "model"}, _evaluation(c, DENSE, 0.0), row=DENSE)
    add(dense)
    rows[DENSE] = dense.key
    for sparsity in masks.sparsities:
        for m in methods:
            if m.name not in masks.methods:
                continue  # built only for the routed row
            row = row_key(m.name, sparsity)
            job = Job("evaluate", row, {"model": "model", "masks": mask_jobs[row]},
                      _evaluation(c, m.name, sparsity,
                                  per_task=m.calibration == "task" or GENERAL not in mask_jobs[row]),
                      row=row)
            add(job)
            rows[row] = job.key
    budget = _budget_jobs(c, jobs, candidates or {}, rows) if c.budget.enabled else None

    if c.routed:
        add(Job("router", "", {"model": "model"},
                RouterParams(tasks=list(c.data.tasks), data_dir=c.data.data_dir, prompts_per_task=router.router_prompts,
                             feature_layer=router.router_layer, seed=c.data.seed, threshold=router.router_threshold)))
        for sparsity in masks.sparsities:
            row = row_key("seap-routed", sparsity)
            experts = row_key(ROUTED_EXPERTS, sparsity)
            inputs: dict[str, Any] = {"model": "model", "router": "router", "experts": mask_jobs[experts],
                                      "general": mask_jobs[row_key(ROUTED_FALLBACK, sparsity)][GENERAL]}
            if experts in rows:  # the expert row's per-item results are reused where routing agrees
                inputs["expert_row"] = rows[experts]
            job = Job("evaluate-routed", row, inputs,
                      _evaluation(c, "seap-routed", sparsity, threshold=router.router_threshold,
                                  router_kind=router.router_kind if router.router_kind != "features" else None),
                      row=row)
            add(job)
            rows[row] = job.key
        if budget and BUDGET_GENERAL_ROW in rows:  # the router in front of the experts the budget sized
            fallback: dict[str, Any] = {"general": f"budget/{GENERAL}"}
            if c.budget.fallback_tasks:  # the fallback chosen on tasks no calibration saw
                fallback = _fallback_jobs(c, jobs, mask_jobs)
            job = Job("evaluate-routed", BUDGET_ROUTED_ROW,
                      {"model": "model", "router": "router", "experts": {t: f"budget/{t}" for t in c.data.task_names},
                       **fallback, "expert_row": rows[BUDGET_ROW]},
                      _evaluation(c, BUDGET_ROUTED_ROW, 0.0, threshold=router.router_threshold,
                                  router_kind=router.router_kind if router.router_kind != "features" else None),
                      row=BUDGET_ROUTED_ROW)
            add(job)
            rows[BUDGET_ROUTED_ROW] = job.key

    perplexity: list[str] = []
    if c.evaluate.perplexity:
        targets = {DENSE: None} | {row: group[GENERAL] for row, group in mask_jobs.items()
                                   if GENERAL in group and row.split("@")[0] in masks.methods}
        for row, mask in targets.items():
            job = Job("perplexity", row, {"model": "model", "mask": mask},
                      PerplexityParams(data_dir=c.data.data_dir, windows=c.evaluate.perplexity_windows, row=row))
            add(job)
            perplexity.append(job.key)

    bench = None
    if c.bench.bench:
        flat = {f"{row}:{name}": key for row, group in mask_jobs.items() for name, key in group.items()}
        if budget:  # each task's expert (and the general mask) at the size the budget chose
            flat.update({f"{BUDGET_ROW}:{t}": f"budget/{t}" for t in c.data.task_names})
            if BUDGET_GENERAL_ROW in rows:
                flat[f"{BUDGET_GENERAL_ROW}:{GENERAL}"] = f"budget/{GENERAL}"
        job = Job("bench", "", {"model": "model", "masks": flat},
                  BenchParams(repeats=c.bench.bench_repeats, llama_cpp=c.bench.bench_llama_cpp))
        add(job)
        bench = job.key

    add(Job("report", "", {"rows": rows, "router": "router" if c.routed else None, "bench": bench,
                           "perplexity": perplexity, **({"budget": budget} if budget else {})}, _report(c)))
    seap_groups = {row: group for row, group in mask_jobs.items()
                   if row.split("@")[0] in (ROUTED_EXPERTS, ROUTED_FALLBACK)}
    if budget:  # each task's expert (and the general mask) at the size the budget chose
        seap_groups[BUDGET_ROW] = {t: f"budget/{t}" for t in c.data.task_names}
        if BUDGET_GENERAL_ROW in rows:
            seap_groups[BUDGET_GENERAL_ROW] = {GENERAL: f"budget/{GENERAL}"}
        if BUDGET_ROUTED_ROW in rows:  # (its fallback, as the routed row chose it)
            seap_groups[BUDGET_ROUTED_ROW] = {"row": rows[BUDGET_ROUTED_ROW]}
    add(Job("register", "", {"report": "report", "masks": seap_groups, "router": "router" if c.routed else None},
            RegisterParams(score=masks.expert_score if c.resolved_unit != "neurons" else masks.score,
                           # (MoE neurons: the channel score)
                           schedule=masks.schedule, registry_dir=c.registry, mlflow=c.register.mlflow,
                           tracking_uri=c.register.tracking_uri, mlflow_dir=c.mlflow_store,
                           experiment=c.register.experiment)))
    plan = Plan(c, jobs)
    check_plan(plan)
    return plan


def _search_jobs(c: RunConfig, jobs: list[Job], candidates: Mapping[str, Mapping[str, str]]
                 ) -> tuple[Job, dict[str, dict[str, str]]]:
    """The accuracy budget's search: the dense model and every candidate row (each task with its
    own expert at one sparsity of the grid) on the selection items, the candidates timed when
    there is a speed target, the choice of each task's sparsity and each task's chosen expert
    (``budget/<task>``, and ``budget/general`` when general candidates were searched). Returns
    the choice job and the selection rows searched (``rows``: experts, ``general_rows``)."""
    add = jobs.append
    dense = Job("select", DENSE, {"model": "model", "data": "selection"}, _evaluation(c, DENSE, 0.0))
    add(dense)
    selected: dict[str, dict[str, str]] = {"rows": {}, "general_rows": {}}
    for method, kind in ((ROUTED_EXPERTS, "rows"), (ROUTED_FALLBACK, "general_rows")):
        for row in sorted((r for r in candidates if r.partition("@")[0] == method),
                          key=lambda r: float(r.partition("@")[2])):
            sparsity = float(row.partition("@")[2])
            job = Job("select", row, {"model": "model", "masks": dict(candidates[row]), "data": "selection"},
                      _evaluation(c, method, sparsity, per_task=method == ROUTED_EXPERTS))
            add(job)
            selected[kind][row] = job.key
    tasks = c.data.task_names
    search = _bisect_job(c, jobs, dense.key, searched_general=bool(selected["general_rows"])) \
        if c.budget.budget_search == "bisect" else None
    speed = None
    if c.budget.min_speedup is not None:  # every candidate shape timed against dense, in one run
        engine = c.budget.speedup_engine
        speed = Job("candidate-speed", "grid", {"model": "model", "masks": {
            f"{row}:{name}": key for row, group in candidates.items() for name, key in group.items()}},
                    BenchParams(repeats=c.bench.bench_repeats, engine=engine,
                                llama_cpp=c.bench.bench_llama_cpp if engine == "llama.cpp" else "off"))
        add(speed)
    choice = Job("budget", "choice", {"dense": dense.key, **{k: v for k, v in selected.items() if v},
                                      **({"speed": speed.key} if speed else {}),
                                      **({"search": search.key} if search else {}),
                                      "candidates": {row: dict(group) for row, group in candidates.items()}},
                 BudgetParams(tasks=tasks, metric=c.evaluate.metric, max_drop=c.budget.max_drop,
                              max_drop_rel=c.budget.max_drop_rel, min_speedup=c.budget.min_speedup,
                              confidence=c.budget.budget_confidence))
    add(choice)
    members = [*tasks, *([GENERAL] if selected["general_rows"] else [])]
    for member in members:
        add(Job("budget", member, {"choice": choice.key}, BudgetParams(member=member)))
    return choice, selected


def _bisect_job(c: RunConfig, jobs: list[Job], dense: str, searched_general: bool) -> Job:
    """The bisection's job (``search/bisect``): each task's SEAP expert (and, with
    ``searched_general``, the general mask) built, refitted and scored on the selection items
    round by round, from the masks' scores and the refit text the plan already has (the
    selection rows of the run's own sparsities, planned before it, are its first points)."""
    tasks = c.data.task_names
    rec = c.reconstruction
    score_keys = {(j.params.score, j.params.task): j.key for j in jobs if j.stage == "scores"}
    planned = {j.key for j in jobs}
    members: dict[str, Any] = {}
    templates: dict[str, Any] = {}
    refit_tasks: dict[str, str | None] = {}
    methods = [METHODS[ROUTED_EXPERTS], *([METHODS[ROUTED_FALLBACK]] if searched_general else [])]
    reconstruct = False
    for m in methods:
        reconstruct = reconstruct or m.resolved_reconstruct(rec.reconstruct)
        for name, inputs in _mask_inputs(m, c, tasks, score_keys):
            members[name] = inputs
            templates[name] = params_to_dict(MaskParams(mask=name, up_to_reachable=True, **_mask_params(c, m, 0.0)))
            refit_tasks[name] = name if m.refit_source(rec.refit_corpus) == "task" and name != GENERAL else None
    generic = f"corpus/{GENERIC}" if f"corpus/{GENERIC}" in planned else None
    job = Job("search", "bisect",
              {"model": "model", "data": "selection", "dense": dense,
               "seeds": {j.name: j.key for j in jobs if j.stage == "select" and j.name != DENSE},
               "members": members,
               **({"refit_corpus": "corpus", **({"refit_generic": generic} if generic else {})} if reconstruct else {})},
              SearchParams(tasks=tasks, metric=c.evaluate.metric, max_drop=c.budget.max_drop,
                           max_drop_rel=c.budget.max_drop_rel, step=c.budget.resolved_step,
                           ceiling=max(c.budget.budget_grid), masks=templates,
                           refit=rec.refit_options if reconstruct else None, refit_tasks=refit_tasks,
                           batch_size=c.statistics.stats_batch_size, confidence=c.budget.budget_confidence,
                           evaluation=params_to_dict(_evaluation(c, ROUTED_EXPERTS, 0.0))))
    jobs.append(job)
    return job


def _mask_params(c: RunConfig, m: Method, sparsity: float) -> dict[str, Any]:
    """The :class:`MaskParams` of method ``m``'s masks at ``sparsity`` but their name
    (``mask``) and reach (``up_to_reachable``): the same for every mask of one row."""
    masks = c.masks
    reconstruct = m.resolved_reconstruct(c.reconstruction.reconstruct)
    return dict(sparsity=sparsity, method=m.name, row=row_key(m.name, sparsity), kind=_kind(m),
                schedule=m.resolved_schedule(masks.schedule),
                schedule_options={**masks.schedule_options, **m.schedule_options, **masks.width_options},
                gqa_mode=masks.gqa_mode,
                bias_compensation=m.resolved_bias_compensation(masks.bias_compensation, reconstruct),
                score=m.resolved_score(masks.score),
                weights=masks.general_weights if m.calibration == "general" else {})


def _budget_jobs(c: RunConfig, jobs: list[Job], candidates: Mapping[str, Mapping[str, str]],
                 rows: dict[str, str]) -> str:
    """The accuracy budget's search (:func:`_search_jobs`) and rows: the ``seap-budget`` row on
    the reported items, the uniform row it is compared with and, when searched, the budgeted
    general mask's row (added to ``rows``). Returns the choice's job key."""
    add = jobs.append
    tasks = c.data.task_names
    choice, selected = _search_jobs(c, jobs, candidates)
    job = Job("evaluate", BUDGET_ROW, {"model": "model", "masks": {t: f"budget/{t}" for t in tasks}},
              _evaluation(c, BUDGET_ROW, 0.0, per_task=True), row=BUDGET_ROW)
    add(job)
    rows[BUDGET_ROW] = job.key
    uniform = Job("evaluate", BUDGET_UNIFORM_ROW,  # the comparison at (nearly) equal mean sparsity
                  {"model": "model", "choice": choice.key,
                   **({"search": choice.inputs["search"]} if "search" in choice.inputs else
                      {"candidates": {row: dict(candidates[row]) for row in selected["rows"]}})},
                  _evaluation(c, BUDGET_UNIFORM_ROW, 0.0, per_task=True), row=BUDGET_UNIFORM_ROW)
    add(uniform)
    rows[BUDGET_UNIFORM_ROW] = uniform.key
    if selected["general_rows"]:  # the general mask under the same budget, on the reported items
        job = Job("evaluate", BUDGET_GENERAL_ROW, {"model": "model", "masks": {GENERAL: f"budget/{GENERAL}"}},
                  _evaluation(c, BUDGET_GENERAL_ROW, 0.0), row=BUDGET_GENERAL_ROW)
        add(job)
        rows[BUDGET_GENERAL_ROW] = job.key
    return choice.key


def _fallback_jobs(c: RunConfig, jobs: list[Job], mask_jobs: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The candidates for the budgeted routed row's fallback (the budgeted general mask and
    every general mask of the run's methods) and the dense model, each evaluated on the
    fallback tasks (no calibration saw them): the routed row's inputs that choose it."""
    held_out = list(c.budget.fallback_tasks)
    dense = Job("evaluate-dense", "held-out", {"model": "model"}, _evaluation(c, DENSE, 0.0, tasks=held_out))
    jobs.append(dense)
    candidates = {BUDGET_GENERAL_ROW: f"budget/{GENERAL}"}
    candidates.update({row: group[GENERAL] for row, group in mask_jobs.items()
                       if GENERAL in group and row.split("@")[0] in c.masks.methods})
    rows = {}
    for name, mask in candidates.items():
        method, _, at = name.partition("@")
        job = Job("evaluate", f"held-out/{name}", {"model": "model", "masks": {GENERAL: mask}},
                  _evaluation(c, method, float(at or 0.0), tasks=held_out))
        jobs.append(job)
        rows[name] = job.key
    return {"fallbacks": candidates, "held_out": rows, "held_out_dense": dense.key}


def _evaluation(c: RunConfig, method: str, sparsity: float, tasks: list[str] | None = None,
                **extra: Any) -> EvaluationParams:
    """The parameters of one evaluated row."""
    e = c.evaluate
    return EvaluationParams(tasks=list(c.data.tasks) if tasks is None else tasks, data_dir=c.data.data_dir,
                            limit=e.limit, num_fewshot=e.num_fewshot, metric=e.metric, batch_size=e.eval_batch_size,
                            method=method, sparsity=sparsity, **extra)


def _report(c: RunConfig) -> ReportParams:
    e = c.evaluate
    return ReportParams(metric=e.metric, tasks=list(c.data.tasks), data_dir=c.data.data_dir, limit=e.limit,
                        num_fewshot=e.num_fewshot, config=recorded_config(c))


def recorded_config(config: RunConfig) -> dict[str, Any]:
    """The configuration as results record it (credentials in the tracking URI hidden)."""
    from seap.io import redact_uri

    return {k: redact_uri(v) if k == "tracking_uri" and v else v for k, v in config.to_dict().items()}


def _kind(m: Method) -> str:
    return "expert" if m.calibration == "task" else GENERAL


def _mask_inputs(m: Method, c: RunConfig, tasks: list[str], score_keys: Mapping[tuple[str, str], str],
                 per_task: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(mask name, inputs) of each mask a method builds at one sparsity (``per_task``: a pooled
    method's one mask, built once per task to be refitted on that task's statistics)."""
    score = m.resolved_score(c.masks.score)
    compensate = m.resolved_bias_compensation(c.masks.bias_compensation,
                                              m.resolved_reconstruct(c.reconstruction.reconstruct))
    if m.calibration == "task":
        return [(t, {"scores": [score_keys[(score, t)]],
                     **({"bias_statistics": "statistics/tasks"} if compensate else {})}) for t in tasks]
    if m.calibration == "general":
        return [(GENERAL, {"scores": [score_keys[(score, t)] for t in tasks],
                           **({"bias_statistics": "statistics/pooled"} if compensate else {})})]
    pooled = {"scores": [score_keys[(score, POOLED)]], **({"bias_statistics": "statistics/pooled"} if compensate else {})}
    return [(t, pooled) for t in tasks] if per_task else [(GENERAL, pooled)]


def make_evaluation_plan(config: RunConfig, masks: Mapping[str, Mapping[str, Any]]) -> Plan:
    """Evaluate existing masks: the dense row, one row per mask, and the report.

    ``masks`` maps a row key to ``{"method", "sparsity", "mask": name, "tasks": [...]}``; each
    mask's output is supplied from outside under the key ``masks/<row>/<name>`` (an expert is
    evaluated on its own task only)."""
    c = config
    c.validate(check_data=False)
    jobs = [_model_job(c.model),
            Job("evaluate-dense", DENSE, {"model": "model"}, _evaluation(c, DENSE, 0.0), row=DENSE)]
    rows = {DENSE: f"evaluate-dense/{DENSE}"}
    given = set()
    for row, spec in masks.items():
        key = f"masks/{row}/{spec['mask']}"
        given.add(key)
        job = Job("evaluate", row, {"model": "model", "masks": {spec["mask"]: key}},
                  _evaluation(c, spec["method"], spec["sparsity"], tasks=list(spec["tasks"]),
                              per_task=spec["mask"] != GENERAL), row=row)
        jobs.append(job)
        rows[row] = job.key
    jobs.append(Job("report", "", {"rows": rows, "router": None, "bench": None, "perplexity": []}, _report(c)))
    plan = Plan(c, jobs, frozenset(given))
    check_plan(plan)
    return plan


def check_plan(plan: Plan) -> None:
    """Keys unique, inputs planned before their readers, and every input from an upstream stage."""
    seen: dict[str, Job] = {k: Job(k.split("/")[0], k.partition("/")[2]) for k in plan.given}
    for job in plan.jobs:
        if job.stage not in STAGES:
            raise SeapError(f"plan: unknown stage {job.stage!r}", "add it to seap.run.plan.STAGES")
        if job.key in seen:
            raise SeapError(f"plan: job {job.key} planned twice", "give each job a unique name")
        for key in job.input_keys():
            if key not in seen:
                raise SeapError(f"plan: {job.key} reads {key}, which is not planned before it", "reorder the plan")
            upstream = seen[key].stage
            if upstream != job.stage and upstream not in STAGES[job.stage].upstream:
                raise SeapError(f"plan: {job.key} reads {key} of stage {upstream}, not upstream of {job.stage}",
                                f"add {upstream} to STAGES[{job.stage!r}].upstream")
        seen[job.key] = job


__all__ = ["GENERAL", "Job", "METHODS", "PIPELINE_STAGES", "POOLED", "Plan", "STAGES", "Stage", "check_plan", "make_evaluation_plan",
           "make_plan", "make_prune_plan", "mask_chain"]
