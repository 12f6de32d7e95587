"""The run configuration: the one home of every default and every validation rule.

:class:`RunConfig` is what the planner reads: one dataclass per ``params.yaml`` section
(:class:`ModelSection`, :class:`DataSection`, ... :class:`RegisterSection`; and
:class:`OutputSection`, the locations params.yaml leaves to the DVC stages), read as
``config.<section>.<field>`` (``config.masks.sparsities``). Every front door builds one and
nothing else holds a default. Each spells an option by its field's name, unique across sections:

* the CLI (``seap eval``, ``python -m flows.pipeline``): option ``--<name>`` with ``-`` for ``_``
  (booleans: ``--<name>`` / ``--no-<name>``), see :func:`add_arguments`;
* ``params.yaml`` (the DVC stages): ``<section>.<key>``, the field's :class:`Option`;
* the Prefect flow: parameter ``<name>``, the field's own name.

Unknown or misspelt keys are errors that name the key, and every error names the option the
way its front door spells it (``--sparsities``, ``masks.sparsities`` or ``sparsities``).
This module imports neither torch nor any model code, so reading a configuration is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from seap.errors import SeapError
from seap.maths.expert_units import CHANNEL_SCORE, DEFAULT_EXPERT_SCORE, EXPERT_SCORES
from seap.maths.geometry import DEFAULT_GQA_MODE, GQA_MODES
from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
from seap.run.methods import (DEFAULT_METHODS, METHODS, MOE_DEFAULT_METHODS, UNITS, REFIT_CORPORA, ROUTED_EXPERTS, SEAP_SCHEDULE, SEAP_SCORE,
                              check_compensation)

Front = Literal["cli", "params", "flow", "python"]
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TASKS = ("capitals", "antonyms", "arithmetic", "sentiment", "categories")  # the built-in starter suite
DEFAULT_SPARSITIES = (0.2, 0.5)
REPORT_METRICS = ("acc", "acc_norm", "paper")  # "paper": acc_norm where the paper reports it
OFFLOADS = ("disk", "cpu")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass(frozen=True)
class Option:
    """Where a configuration field lives in ``params.yaml`` and how it is checked."""

    section: str | None  # params.yaml section (the RunConfig section holding it); None: not in params.yaml
    key: str  # its key there (not in params.yaml: the field's name)
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None


def _opt(default: Any, key: str | None, help: str, **checks: Any) -> Any:
    """A section's field: its default, its key in the section's ``params.yaml`` section (None:
    not in params.yaml, where a DVC stage fixes it), its help and its checks (:class:`Option`)."""
    meta = {"key": key, "help": help, "checks": checks}
    if isinstance(default, (dict, list, tuple)):  # a fresh copy per configuration
        copy = dict if isinstance(default, dict) else list
        return field(default_factory=lambda: copy(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- the sections: one per params.yaml section, each field named as its front doors spell it ------


@dataclass
class ModelSection:
    """``model``: the base model and where it runs."""

    model: str = _opt(DEFAULT_MODEL, "name",
                      "hub id (org/name), local HF folder, .gguf file, or the alias smollm2-135m")
    device: str = _opt("auto", "device", "auto (every visible GPU, else the CPU), cpu, cuda, cuda:1, a list cuda:0,cuda:1 ...")
    dtype: str = _opt("auto", "dtype", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16",
                      choices=DTYPES)
    offload: str = _opt("disk", "offload", "where the dense model's layers and the calibration hidden states "
                        "wait between layers: disk (each layer read from the checkpoint when visited, hidden "
                        "states on disk; bounded memory, a killed job resumes) or cpu (the model held whole in "
                        "memory, hidden states too)", choices=OFFLOADS)


@dataclass
class DataSection:
    """``data``: the tasks and their calibration sample."""

    tasks: list[str] = _opt(DEFAULT_TASKS, "tasks", "task names, optionally with a source prefix (hub:, local:, "
                            "jsonl:, starter:); default: the built-in starter suite")
    data_dir: str | None = _opt(None, "dir", "folder of local tasks (DIR/<task>/train.jsonl ...)")
    samples: int | None = _opt(DEFAULT_SAMPLES_PER_TASK, "samples", "calibration records per task (null: all)",
                               minimum=1)
    seed: int = _opt(DEFAULT_SEED, "seed", "seed of the calibration sample and the router", minimum=0)
    max_tokens: int = _opt(DEFAULT_MAX_TOKENS, "max_tokens", "token cap per calibration text", minimum=1)

    @property
    def task_names(self) -> list[str]:
        """Tasks as rows and masks name them (``jsonl:geo`` -> ``geo``)."""
        return [task_name(t) for t in self.tasks]


@dataclass
class StatisticsSection:
    """``statistics``: how the activation statistics are collected (where the shards run is not in
    ``params.yaml``: a DVC stage runs them in its own process)."""

    stats_batch_size: int = _opt(8, "batch_size", "texts per forward pass", minimum=1)
    stats_shards: int = _opt(1, "shards", "split each corpus into this many shards, merged exactly", minimum=1)
    dask_workers: int = _opt(0, None, "run statistics shards on a local Dask cluster of this size", minimum=0)
    dask_address: str | None = _opt(None, None, "run statistics shards on this Dask scheduler")


@dataclass
class MaskSection:
    """``masks``: the methods and sparsities, and how each mask is scored and allocated."""

    methods: list[str] = _opt(DEFAULT_METHODS, "methods",
                              f"rows to build and evaluate: any of {', '.join(METHODS)} (left at the default with "
                              f"a mixture-of-experts model: {', '.join(MOE_DEFAULT_METHODS)}, less moe-frequency with unit neurons)",
                              choices=tuple(METHODS))
    sparsities: list[float] = _opt(DEFAULT_SPARSITIES, "sparsities", "target fractions of prunable weights removed",
                                   minimum=0, maximum=0.99)
    score: str = _opt(SEAP_SCORE, "score", "SEAP's score (the baselines keep their own)")
    schedule: str = _opt(SEAP_SCHEDULE, "schedule", "SEAP's schedule: logistic, uniform or flap-adaptive")
    schedule_k: float | None = _opt(None, "schedule_k", "logistic steepness (null: 1.0)", minimum=0)
    schedule_x0: float | None = _opt(None, "schedule_x0", "logistic inflection point (null: 0.3)", minimum=0, maximum=1)
    protect_first: int | None = _opt(None, "protect_first", "logistic: first layers kept dense (null: 2)", minimum=0)
    protect_last: int | None = _opt(None, "protect_last", "logistic: last layers kept dense (null: 2)", minimum=0)
    channel_multiple: int | None = _opt(None, "channel_multiple",
                                        "every pruned layer keeps a multiple of this many MLP channels, for fast "
                                        "matrix kernels (llama.cpp above all; 1: any width) (null: 64)", minimum=1)
    same_width: bool = _opt(False, "same_width",
                            "every layer keeps the same widths (the uniform allocation, whatever the schedule), so "
                            "that stock transformers loads the pruned model (`seap export --format hf`)")
    gqa_mode: str = _opt(DEFAULT_GQA_MODE, "gqa_mode", "GQA pruning unit: kv-groups or query-heads", choices=GQA_MODES)
    unit: str = _opt("auto", "unit", "what is pruned: neurons (heads and MLP channels; of a mixture-of-experts "
                     "model, the channels inside every expert), experts (whole experts of an MoE model), both "
                     "(experts, and channels inside the kept ones), or auto (experts for an MoE model, else neurons)",
                     choices=("auto", *UNITS))
    expert_score: str = _opt(DEFAULT_EXPERT_SCORE, "expert_score",
                             "unit experts: how SEAP scores a task's experts: tcess (PreMoe), frequency or reap",
                             choices=EXPERT_SCORES)
    allow_k_reduction: bool = _opt(False, "allow_k_reduction",
                                   "unit experts: allow keeping fewer experts than the router's top-k (top-k is "
                                   "clamped to the experts kept)")
    bias_compensation: bool | None = _opt(None, "bias_compensation",
                                          "FLAP's bias compensation for every method (null: as each method says: "
                                          "FLAP on, the others off)")
    general_weights: dict[str, float] = _opt({}, "general_weights",
                                             "weight of each task's scores in the SEAP general mask, TASK=W "
                                             "(tasks left out: wikitext 3, others 2)", minimum=0)

    @property
    def schedule_options(self) -> dict[str, Any]:
        """Options of the logistic schedule that differ from its defaults."""
        opts = {"k": self.schedule_k, "x0": self.schedule_x0, "protect_first": self.protect_first,
                "protect_last": self.protect_last}
        return {k: v for k, v in opts.items() if v is not None}

    @property
    def width_options(self) -> dict[str, Any]:
        """Options that shape every neuron mask's widths for the hardware (:func:`seap.maths.schedules.allocate`)."""
        opts: dict[str, Any] = {"same_width": True} if self.same_width else {}
        if self.channel_multiple is not None:
            opts["channel_multiple"] = self.channel_multiple
        return opts


@dataclass
class ReconstructionSection:
    """``reconstruction``: the closed-form refit of every mask."""

    reconstruct: bool | None = _opt(None, "reconstruct",
                                    "refit o_proj/down_proj of every mask in closed form on the calibration text's "
                                    "second moments (least squares; replaces bias compensation; false: plain "
                                    "slicing, or each method's own bias compensation) (null: true, unless "
                                    "bias_compensation is true)")
    refit_alpha: float | None = _opt(None, "alpha", "refit regularisation, relative to the mean input energy "
                                     "(null: 0.01)", minimum=0)
    refit_prior: str | None = _opt(None, "prior", "what the regulariser pulls the refitted weights towards: slice "
                                   "(the plain slice W[:, kept]) or zero (ridge) (null: slice)")
    refit_bias: bool | None = _opt(None, "bias", "also fit a bias term (the refit's FLAP-like part) (null: true)")
    refit_sequential: bool | None = _opt(None, "sequential",
                                         "refit layer by layer on the inputs the already refitted layers produce "
                                         "(runs the calibration text through the model per mask) instead of "
                                         "one-shot on the dense model's second moments (null: false)")
    refit_corpus: str = _opt("own", "corpus",
                             "what masks are refitted on: own (each SEAP expert on its task's corpus; general "
                             "mask and baselines on the pooled corpora), pooled (every mask on all tasks' "
                             "corpora) or per-task (the control: the baselines too are refitted on each task's "
                             "corpus, one refitted copy per task)", choices=REFIT_CORPORA)
    refit_generic: list[str] = _opt([], "generic",
                                    "tasks whose train-split text is added to every refit corpus as generic text "
                                    "(e.g. boolq: Wikipedia passages); the masks stay as they are (empty: none)")
    refit_generic_samples: int | None = _opt(None, "generic_samples", "records per generic task (null: the samples "
                                             "option)", minimum=1)

    @property
    def refit_options(self) -> dict[str, Any]:
        """Options of the refit that differ from its defaults (:class:`seap.maths.reconstruction.RefitOptions`)."""
        opts = {"alpha": self.refit_alpha, "prior": self.refit_prior, "bias": self.refit_bias,
                "sequential": self.refit_sequential}
        return {k: v for k, v in opts.items() if v is not None}


DEFAULT_BUDGET_GRID = tuple(round(0.05 * k, 2) for k in range(1, 16))  # 5% .. 75%
BUDGET_SEARCHES = ("grid", "bisect")
SPEEDUP_ENGINES = ("pytorch", "llama.cpp")
DEFAULT_BISECT_STEP = 0.025


@dataclass
class BudgetSection:
    """``budget``: each task's expert as sparse as an accuracy budget allows (the ``seap-budget``
    row): the largest sparsity of the grid whose expert keeps the task's accuracy on held-out
    train items within the budget of the dense model's."""

    max_drop: float | None = _opt(None, "max_drop", "accuracy points each task's expert may lose on its selection "
                                  "items (null: no budget row)", minimum=0, maximum=100)
    max_drop_rel: float | None = _opt(None, "max_drop_rel", "or: the share of the dense model's margin over chance "
                                      "each task's expert may lose (null: no budget row)", minimum=0, maximum=1)
    budget_grid: list[float] = _opt(DEFAULT_BUDGET_GRID, "grid", "the sparsities the search tries for each task "
                                    "(bisect: its largest is the search's ceiling)", minimum=0.001, maximum=0.99)
    budget_confidence: float = _opt(0.0, "confidence", "standard errors of each candidate's paired drop on the "
                                    "selection items added before it is held against the budget (0: the measured "
                                    "drop; 1: about 84% one-sided confidence that the drop is within it)",
                                    minimum=0, maximum=5)
    budget_search: str = _opt("grid", "search", "grid: every sparsity of the grid, refitted in one walk; bisect: each "
                              "task's sparsity bisected between 0 and the grid's largest, to a step of budget_step "
                              "(rounds of one walk each, fewer candidates)", choices=BUDGET_SEARCHES)
    budget_step: float | None = _opt(None, "step", f"the step bisect stops at (null: {DEFAULT_BISECT_STEP:g})",
                                     minimum=0.001, maximum=0.5)
    selection_items: int = _opt(100, "selection_items", "train records per task held out to select each sparsity "
                                "(at most half of its train split; the rest calibrates)", minimum=1)
    min_speedup: float | None = _opt(None, "min_speedup",
                                     "prefill speed-up over dense (PyTorch, measured like the bench) each task's "
                                     "expert must reach: the smallest grid sparsity that reaches it (null: none)",
                                     minimum=1.0)
    speedup_engine: str = _opt("pytorch", "speedup_engine",
                               "where the speed target is timed: pytorch (prefill, batch 4 x 128 tokens, as the "
                               "bench) or llama.cpp (float16 GGUF, llama-bench's 128-token prompt processing; needs "
                               "the build of scripts/build_llama_cpp.sh, or bench_llama_cpp naming one)",
                               choices=SPEEDUP_ENGINES)
    fallback_tasks: list[str] = _opt([], "fallback_tasks",
                                     "tasks no calibration sees, on which the routed row's fallback is chosen under "
                                     "the budget: dense, the budgeted general mask or a baseline's general mask "
                                     "(empty: the budgeted general mask)")

    @property
    def resolved_step(self) -> float:
        """The bisection's step (:data:`DEFAULT_BISECT_STEP` unless given)."""
        return self.budget_step if self.budget_step is not None else DEFAULT_BISECT_STEP

    @property
    def enabled(self) -> bool:
        """Whether the run sizes each task's expert (an accuracy budget, a speed target or both)."""
        return self.max_drop is not None or self.max_drop_rel is not None or self.min_speedup is not None


@dataclass
class EvaluationSection:
    """``evaluate``: how every row is evaluated."""

    limit: int | None = _opt(None, "limit", "evaluation items per task (null: all)", minimum=1)
    num_fewshot: int = _opt(0, "num_fewshot", "few-shot examples per item", minimum=0)
    metric: str = _opt("acc", "metric", "metric of the table: acc, acc_norm, or paper (acc_norm where the paper "
                       "reports it)", choices=REPORT_METRICS)
    eval_batch_size: int = _opt(64, "batch_size",
                                "evaluation batch: packed rows of 256 tokens (lm-eval sequences where not packed)",
                                minimum=1)
    perplexity: bool = _opt(False, "perplexity",
                            "also WikiText-2 perplexity of dense and each general mask (needs data_dir with wikitext/)")
    perplexity_windows: int | None = _opt(40, "perplexity_windows", "windows of 512 tokens (null: all)", minimum=1)


@dataclass
class RouterSection:
    """``router``: what picks the routed row's expert per input."""

    router_prompts: int = _opt(500, "prompts_per_task", "router training prompts per task", minimum=1)
    router_layer: int = _opt(0, "feature_layer", "0: input embeddings; k: hidden state after layer k", minimum=0)
    router_threshold: float = _opt(0.5, "threshold", "below this confidence the general mask is used",
                                   minimum=0, maximum=1)
    router_kind: str = _opt("features", "kind",
                            "what picks the routed row's expert: features (the trained task router) or patterns "
                            "(MoE, PreMoe's TAER: the nearest stored routing pattern of the prompt's prefix; "
                            "confidence 1 - d1/d2)", choices=("features", "patterns"))


@dataclass
class BenchSection:
    """``bench``: the speed of dense and each pruned shape."""

    bench: bool = _opt(True, "enabled", "measure prefill and decode speed of dense and each pruned shape")
    bench_repeats: int = _opt(3, "repeats", "timed repeats (the median is reported)", minimum=1)
    bench_llama_cpp: str = _opt("auto", "llama_cpp",
                                "also time dense and each pruned shape in llama.cpp (float16 GGUF, llama-bench): "
                                "auto (when scripts/build_llama_cpp.sh has built it), off, or a build folder")


@dataclass
class OutputSection:
    """Where a run writes (not in ``params.yaml``: the DVC stages fix their own locations)."""

    workdir: str = _opt("runs/work", None, "stage outputs (content-addressed, cached)")
    out: str = _opt("runs/pipeline", None, "results table, JSON, metrics, plot")
    cache_max_size: str | None = _opt(None, None, "the most the work folder may hold, e.g. 20G: after each job the "
                                      "least recently used outputs that the rest of the run does not read are "
                                      "evicted (null: no cap; `seap cache` shows and prunes it)")


@dataclass
class RegisterSection:
    """``register``: the local expert registry and MLflow."""

    registry_dir: str | None = _opt(None, "dir", "the local expert registry (null: beside workdir)")
    mlflow: bool = _opt(True, "mlflow", "also track the run and register the experts in MLflow")
    tracking_uri: str | None = _opt(None, "tracking_uri",
                                    "MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite in mlflow_dir)")
    mlflow_dir: str | None = _opt(None, "mlflow_dir", "local MLflow store (null: beside workdir)")
    experiment: str = _opt("seap", "experiment", "MLflow experiment of the pipeline runs")


@dataclass(init=False)
class RunConfig:
    """Every parameter of a pipeline run, one section per ``params.yaml`` section (each attribute
    named as its section; ``outputs``: what params.yaml leaves to the DVC stages), e.g.
    ``config.masks.sparsities``. Build it from flat field names (``RunConfig(sparsities=[0.3])``,
    each name given to its section), :meth:`from_mapping`, :meth:`from_params` or
    :meth:`from_cli`; :meth:`validate` checks all of it before any model is loaded."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    statistics: StatisticsSection = field(default_factory=StatisticsSection)
    masks: MaskSection = field(default_factory=MaskSection)
    reconstruction: ReconstructionSection = field(default_factory=ReconstructionSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    evaluate: EvaluationSection = field(default_factory=EvaluationSection)
    router: RouterSection = field(default_factory=RouterSection)
    bench: BenchSection = field(default_factory=BenchSection)
    outputs: OutputSection = field(default_factory=OutputSection)
    register: RegisterSection = field(default_factory=RegisterSection)

    def __init__(self, **fields: Any) -> None:
        by_section: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        for name, value in fields.items():
            if name not in _FIELDS:
                raise TypeError(f"RunConfig() got an unexpected keyword argument {name!r}")
            by_section[_FIELDS[name].section][name] = value
        for section, cls in _SECTIONS.items():
            setattr(self, section, cls(**by_section[section]))
        # the one rule for reconstruction's default: on, unless FLAP's bias compensation (which
        # it replaces) is asked for
        if self.reconstruction.reconstruct is None:
            self.reconstruction.reconstruct = not self.masks.bias_compensation

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], front: Front = "python") -> RunConfig:
        """A configuration from field names (flow parameters, Python). Names left out keep their
        defaults; an unknown name is an error that names it."""
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise SeapError(f"unknown parameter(s) {unknown}", f"parameters are: {', '.join(sorted(_FIELDS))}")
        config = cls(**dict(values))
        config._front = front  # type: ignore[attr-defined]
        return config

    @classmethod
    def from_params(cls, raw: Any, source: str = "params.yaml") -> RunConfig:
        """A configuration from a ``params.yaml`` mapping of sections; unknown sections and keys
        are errors naming them."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SeapError(f"{source} must be a mapping of sections", f"sections: {', '.join(param_sections())}")
        by_key = {(o.section, o.key): name for name, o in options().items() if o.section}
        sections = param_sections()
        values: dict[str, Any] = {}
        for section, content in raw.items():
            if section not in sections:
                raise SeapError(f"parameter {section}: unknown section", f"sections are: {', '.join(sections)}")
            if content is None:
                continue
            if not isinstance(content, Mapping):
                raise SeapError(f"parameter {section}: must be a mapping of keys, got {content!r}",
                                f"keys of {section}: {', '.join(sections[section])}")
            for key, value in content.items():
                if (section, key) not in by_key:
                    raise SeapError(f"parameter {section}.{key}: unknown key",
                                    f"keys of {section}: {', '.join(sections[section])}")
                values[by_key[(section, key)]] = value
        config = cls(**values)
        config._front = "params"  # type: ignore[attr-defined]
        return config

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> RunConfig:
        """A configuration from options added by :func:`add_arguments` (unset options keep defaults)."""
        config = cls(**given_arguments(args))
        config._front = "cli"  # type: ignore[attr-defined]
        return config

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (field names) applied, from the same front door."""
        new = RunConfig(**{**self.to_dict(), **changes})
        new._front = self.front  # type: ignore[attr-defined]
        return new

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value, flat; what results.json records as the run's configuration."""
        return {name: getattr(getattr(self, f.section), name) for name, f in _FIELDS.items()}

    # -- naming ---------------------------------------------------------------------------
    @property
    def front(self) -> Front:
        """The front door this configuration came from (its errors spell options that door's way)."""
        return getattr(self, "_front", "python")

    def spell(self, name: str) -> str:
        """How this configuration's front door spells option ``name``."""
        return option_name(name, self.front)

    def bad(self, name: str, problem: str, fix: str | None) -> SeapError:
        """An error about option ``name``, spelled as this configuration's front door spells it."""
        return SeapError(f"parameter {self.spell(name)}: {problem}", fix)

    # -- derived --------------------------------------------------------------------------
    @property
    def registry(self) -> str:
        """The local expert registry (``registry_dir``, else beside the work folder)."""
        return self.register.registry_dir or str(Path(self.outputs.workdir).parent / "registry")

    @property
    def mlflow_store(self) -> str:
        """The local MLflow store (``mlflow_dir``, else beside the work folder)."""
        return self.register.mlflow_dir or str(Path(self.outputs.workdir).parent / "mlflow")

    @property
    def routed(self) -> bool:
        """Whether the run evaluates the routed row (and so trains a router)."""
        return "seap-routed" in self.masks.methods

    @property
    def resolved_unit(self) -> str:
        """``neurons``, ``experts`` or ``both``: ``auto`` is experts for a mixture-of-experts model
        (a local folder or GGUF file whose type an MoE adapter serves), neurons otherwise."""
        if self.masks.unit != "auto":
            return self.masks.unit
        return "experts" if self.moe else "neurons"

    @property
    def moe(self) -> bool:
        """Whether the run prunes a mixture-of-experts model (through router statistics and
        expert masks): unit experts or both, or a model whose type an MoE adapter serves (where
        unit neurons prunes the channels inside every expert)."""
        if self.masks.unit in ("experts", "both"):
            return True
        from seap.model.loading import peek_model_type

        return peek_model_type(self.model.model) in _moe_types()

    # -- validation -----------------------------------------------------------------------
    def validate(self, check_data: bool = True) -> RunConfig:
        """Check every option (types, ranges, names, consistency) and, with ``check_data``, that
        the tasks resolve in the data folder; loads no model. Returns ``self``."""
        for name, value in self.to_dict().items():
            _check_type(self, name, value, str(_FIELDS[name].field.type), _FIELDS[name].option)
        model, data, masks, rec = self.model, self.data, self.masks, self.reconstruction
        if not model.model.strip():
            raise self.bad("model", "is empty", "pass a hub id, a local folder, a .gguf file or smollm2-135m")
        if not data.tasks:
            raise self.bad("tasks", "no tasks given", "list at least one task")
        from seap.model.loaded import resolve_device

        try:
            resolve_device(model.device)
        except SeapError as exc:
            raise self.bad("device", exc.problem, exc.fix or "") from None
        names = data.task_names
        if len(set(names)) != len(names):
            raise self.bad("tasks", f"a task is named twice: {list(data.tasks)}", "list each task once")
        if not masks.sparsities:
            raise self.bad("sparsities", "no sparsity given", "e.g. [0.2, 0.5]")
        if any(s == 0 for s in masks.sparsities):
            raise self.bad("sparsities", "0 is the dense model, which is always evaluated", "drop 0")
        if len({f"{s:g}" for s in masks.sparsities}) != len(masks.sparsities):
            raise self.bad("sparsities", f"a sparsity is listed twice: {list(masks.sparsities)}",
                           "list each sparsity once")
        if not masks.methods:
            raise self.bad("methods", "no method given", f"e.g. {' '.join(DEFAULT_METHODS)}")
        self._check_unit()
        if len(set(masks.methods)) != len(masks.methods):
            raise self.bad("methods", f"a method is listed twice: {list(masks.methods)}", "list each method once")
        if self.routed and len(data.tasks) < 2:
            raise self.bad("methods", "seap-routed needs at least two tasks to route between",
                           "add tasks, or drop seap-routed")
        stats = self.statistics
        if (stats.dask_workers or stats.dask_address) and stats.stats_shards < 2:
            raise self.bad("stats_shards", "a Dask cluster needs the statistics split into shards",
                           "set stats_shards >= 2 (e.g. the number of workers)")
        uri = self.register.tracking_uri
        if uri is not None and "://" not in uri:
            raise self.bad("tracking_uri", f"{uri!r} is not a URI",
                           "e.g. http://mlflow.internal:5000 or sqlite:///runs/mlflow/mlflow.db")
        if self.evaluate.perplexity and not data.data_dir:
            raise self.bad("perplexity", "WikiText-2 perplexity needs a data folder with wikitext/",
                           f"set {self.spell('data_dir')} (e.g. ../shared/benchmarks), or turn perplexity off")
        try:
            off = {"cli": "--no-reconstruct", "params": f"{self.spell('reconstruct')}: false"}.get(
                self.front, "reconstruct=False")
            check_compensation(rec.reconstruct, masks.bias_compensation, self.spell("bias_compensation"), off)
        except SeapError as e:
            raise self.bad("bias_compensation", e.problem, e.fix) from None
        self._check_budget()
        if self.outputs.cache_max_size is not None:
            from seap.run.cache_entries import parse_size

            try:
                parse_size(self.outputs.cache_max_size)
            except SeapError as e:
                raise self.bad("cache_max_size", e.problem, e.fix) from None
        overlap = sorted({task_name(t) for t in rec.refit_generic} & set(names))
        if overlap:
            raise self.bad("refit_generic", f"{', '.join(overlap)} is also a task of the run",
                           "generic text comes from tasks that are not pruned for: drop it from one of the lists")
        self._check_names()
        self._check_paths()
        if check_data:
            self.check_tasks()
        return self

    def _check_paths(self) -> None:
        """Every folder the run writes, before any work: the work, results, registry and MLflow
        folders are folders (or can be made) where the user may write; the results folder is new,
        empty, or an earlier run's results. (The data folder is checked with the tasks.)"""
        import os

        from seap.evaluation.report import OPTIONAL_RESULT_FILES, RESULT_FILES

        folders = {"workdir": self.outputs.workdir, "out": self.outputs.out, "registry_dir": self.register.registry_dir,
                   "mlflow_dir": self.register.mlflow_dir}
        for name, folder in folders.items():
            if not folder:
                continue
            path = Path(folder).expanduser()
            if path.exists() and not path.is_dir():
                raise self.bad(name, f"{folder} is a file, and the run writes a folder there", "pass a folder path")
            existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise self.bad(name, f"{folder} is not writable ({existing} is read-only for this user)",
                               "pass a folder you may write to")
        out = Path(self.outputs.out).expanduser()
        if out.is_dir():
            ours = {*RESULT_FILES, *OPTIONAL_RESULT_FILES}
            foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in ours)
            if foreign:
                raise self.bad("out", f"{self.outputs.out} holds other files ({', '.join(foreign[:3])}"
                               f"{' ...' if len(foreign) > 3 else ''}), and the run's results would be mixed with them",
                               "pass a new or empty folder, or the results folder of an earlier run")

    def _check_unit(self) -> None:
        """With an MoE model, the default methods become the MoE ones, and a method that cannot
        prune the run's unit (or an MoE model at all) is refused, naming what to use."""
        masks, unit, moe = self.masks, self.resolved_unit, self.moe
        if unit != "neurons" and masks.unit != "auto":
            from seap.model.loading import peek_model_type

            model_type = peek_model_type(self.model.model)
            if model_type is not None and model_type not in _moe_types():
                raise self.bad("unit", f"{unit} needs a mixture-of-experts model; {self.model.model} is a {model_type} "
                               f"model", f"prune its heads and channels ({self.spell('unit')} neurons or auto)")
        if moe and list(masks.methods) == list(DEFAULT_METHODS):
            masks.methods = [m for m in MOE_DEFAULT_METHODS if unit in METHODS[m].units]  # (the user left the default)
        wrong = [m for m in masks.methods if unit not in METHODS[m].units or (moe and not METHODS[m].moe)]
        if wrong:
            fitting = [n for n, m in METHODS.items() if unit in m.units and (m.moe or not moe)]
            what = f"the {unit} of a mixture-of-experts model" if moe and unit == "neurons" else unit
            raise self.bad("methods", f"{', '.join(wrong)} cannot prune {what}"
                           + (" (the model is a mixture of experts)" if masks.unit == "auto" and moe else ""),
                           f"with {self.spell('unit')} {unit} use any of: {', '.join(fitting)}"
                           + ("; or prune neurons" if unit != "neurons" else ""))
        if moe and masks.schedule not in ("logistic", "uniform"):
            raise self.bad("schedule", f"{masks.schedule} allocates heads and channels of a dense model, not the "
                           "parts of a mixture-of-experts model", "on an MoE model use logistic or uniform")
        if moe and unit != "experts" and masks.score != CHANNEL_SCORE:
            raise self.bad("score", f"channels inside experts are scored with {CHANNEL_SCORE} only, not {masks.score}",
                           f"leave {self.spell('score')} at {CHANNEL_SCORE}")
        if moe and masks.channel_multiple not in (None, 8):
            raise self.bad("channel_multiple", "channels inside experts keep a multiple of 8 (what the fused expert "
                           f"tensors' grouped matmul needs), not {masks.channel_multiple}",
                           f"leave {self.spell('channel_multiple')} unset with a mixture-of-experts model")
        if self.router.router_kind == "patterns" and not moe:
            raise self.bad("router_kind", "routing patterns are what an MoE model's routers do",
                           f"use {self.spell('router_kind')} features, or prune experts of an MoE model")
        if moe and self.statistics.stats_shards > 1:
            raise self.bad("stats_shards", "router statistics are collected in one pass",
                           "set stats_shards to 1 with a mixture-of-experts model")
        rec = self.reconstruction
        refit_given = [name for name in ("refit_alpha", "refit_prior", "refit_bias", "refit_sequential",
                                         "refit_generic") if getattr(rec, name) not in (None, [])]
        if rec.reconstruct is False and refit_given:
            raise self.bad(refit_given[0], "refit options are given, and the refit is switched off",
                           f"drop {', '.join(self.spell(n) for n in refit_given)}, or switch the refit on")

    def _check_budget(self) -> None:
        """An accuracy budget: one form of it, a grid of distinct sparsities, a dense model (the
        search prunes heads and channels) and more than one task's worth of options."""
        budget = self.budget
        if budget.speedup_engine != "pytorch":
            if budget.min_speedup is None:
                raise self.bad("speedup_engine", f"an engine ({budget.speedup_engine}) is given for the speed target, "
                               "and no speed target", f"add {self.spell('min_speedup')} S, or drop "
                               f"{self.spell('speedup_engine')}")
            from seap.evaluation.llama_cpp_runtime import BUILD_COMMAND, find_llama_cpp

            where = None if self.bench.bench_llama_cpp in ("auto", "off") else self.bench.bench_llama_cpp
            if find_llama_cpp(where) is None:
                raise self.bad("speedup_engine", "the speed target is timed in llama.cpp, and no llama.cpp build "
                               f"was found{f' at {where}' if where else ''}",
                               f"build the pinned release once with `{BUILD_COMMAND}` (about 10 minutes), point "
                               f"{self.spell('bench_llama_cpp')} or SEAP_LLAMA_CPP at a build, or time it in pytorch")
        if budget.budget_confidence and budget.max_drop is None and budget.max_drop_rel is None:
            raise self.bad("budget_confidence", "a confidence is asked of the accuracy budget, and none is given",
                           f"add {self.spell('max_drop')} D (or {self.spell('max_drop_rel')}), or drop "
                           f"{self.spell('budget_confidence')}")
        if not budget.enabled:
            if budget.budget_search != "grid" or budget.budget_step is not None:
                name = "budget_step" if budget.budget_step is not None else "budget_search"
                raise self.bad(name, "a way to search is given, and no budget to search for",
                               f"add {self.spell('max_drop')} D (or {self.spell('max_drop_rel')}), or drop "
                               f"{self.spell(name)}")
            return
        if budget.max_drop is not None and budget.max_drop_rel is not None:
            raise self.bad("max_drop_rel", "a budget is given twice (in points and as a share of the margin)",
                           f"give {self.spell('max_drop')} or {self.spell('max_drop_rel')}, not both")
        if not budget.budget_grid:
            raise self.bad("budget_grid", "no sparsity to try", "e.g. [0.1, 0.2, 0.3, 0.4, 0.5]")
        if budget.min_speedup is not None:
            from seap.maths.budget import ideal_speedup

            ceiling = ideal_speedup(max(budget.budget_grid))
            if budget.min_speedup <= 1.0:
                raise self.bad("min_speedup", f"{budget.min_speedup:g} is no speed-up over dense",
                               "give a target above 1, e.g. 1.3")
            if budget.min_speedup > ceiling:
                raise self.bad("min_speedup", f"a prefill speed-up of {budget.min_speedup:g} is beyond what the "
                               f"search can measure: its largest sparsity, {max(budget.budget_grid):g}, removes at "
                               f"most that share of the prunable weights, at best {ceiling:.2f}x",
                               f"lower the target, or add larger sparsities to {self.spell('budget_grid')}")
        if budget.budget_step is not None and budget.budget_search != "bisect":
            raise self.bad("budget_step", "a bisection step is given, and the search is the grid",
                           f"add {self.spell('budget_search')} bisect, or drop {self.spell('budget_step')}")
        if budget.budget_search == "bisect":
            step = budget.resolved_step
            if step >= max(budget.budget_grid):
                raise self.bad("budget_step", f"the step {step:g} leaves nothing to bisect below the ceiling "
                               f"{max(budget.budget_grid):g} (the grid's largest sparsity)",
                               f"give a smaller {self.spell('budget_step')}, e.g. {DEFAULT_BISECT_STEP:g}")
            if budget.min_speedup is not None:
                raise self.bad("min_speedup", "the speed target is read off the grid's timed candidate shapes, and "
                               "the bisection measures none", f"drop {self.spell('min_speedup')}, or search the "
                               f"grid ({self.spell('budget_search')} grid)")
        if len({f"{s:g}" for s in budget.budget_grid}) != len(budget.budget_grid):
            raise self.bad("budget_grid", f"a sparsity is listed twice: {list(budget.budget_grid)}",
                           "list each sparsity once")
        if self.moe:
            raise self.bad("max_drop" if budget.max_drop is not None else "max_drop_rel",
                           "the budget search prunes heads and channels of a dense model",
                           "drop the budget with a mixture-of-experts model")
        if budget.fallback_tasks:
            if budget.max_drop is None and budget.max_drop_rel is None:
                raise self.bad("fallback_tasks", "the fallback is chosen under an accuracy budget, and none is given",
                               f"give {self.spell('max_drop')} (or {self.spell('max_drop_rel')}), or drop them")
            if not self.routed:
                raise self.bad("fallback_tasks", "the fallback tasks choose the routed row's fallback, and the run "
                               "has no routed row", f"add seap-routed to {self.spell('methods')}, or drop them")
            overlap = sorted({task_name(t) for t in budget.fallback_tasks} & set(self.data.task_names))
            if overlap:
                raise self.bad("fallback_tasks", f"{', '.join(overlap)} is also a task of the run (calibrated on)",
                               "fallback tasks are tasks no calibration sees: drop it from one of the lists")

    def _check_names(self) -> None:
        """Names the engine owns (scores, schedules): checked against its tables."""
        from seap.maths.schedules import check_schedule
        from seap.maths.scores import get_score

        for name, value, check in (("score", self.masks.score, get_score),
                                   ("schedule", self.masks.schedule, check_schedule)):
            try:
                check(value)
            except SeapError as exc:
                raise self.bad(name, exc.problem, exc.fix) from None
        prior = self.reconstruction.refit_prior
        if prior is not None:
            from seap.maths.reconstruction import PRIORS

            if prior not in PRIORS:
                raise self.bad("refit_prior", f"unknown value {prior!r}", f"use one of: {', '.join(PRIORS)}")

    def _check_metric(self, metrics: Mapping[str, Sequence[str]]) -> None:
        """Every task (name -> the metrics it reports) must report the table's metric."""
        if self.evaluate.metric == "paper":
            return
        lacking = {t: m for t, m in metrics.items() if self.evaluate.metric not in m}
        if lacking:
            have = "; ".join(f"{task_name(t)}: {', '.join(m)}" for t, m in lacking.items())
            raise self.bad("metric", f"task(s) {', '.join(task_name(t) for t in lacking)} report no "
                           f"{self.evaluate.metric} ({have})",
                           "use the metric acc, or paper (acc_norm where a task reports it, acc elsewhere)")

    def check_tasks(self, work_dir: str | Path | None = None) -> list[Any]:
        """Resolve the tasks (files present, records well-formed, the table's metric reported)
        before any model loads. The task definitions it writes go to ``work_dir``, or without one
        to a temporary folder removed afterwards (a refused run leaves nothing behind)."""
        if work_dir is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="seap-tasks-") as scratch:
                return self.check_tasks(scratch)
        from seap.data.catalogue import STANDARD_TASKS, TaskCatalogue

        data = self.data
        known = {t: STANDARD_TASKS[task_name(t)].metrics for t in [*data.tasks, *self.budget.fallback_tasks]
                 if t.split(":", 1)[0] in ("local", "hub", t) and task_name(t) in STANDARD_TASKS}
        self._check_metric(known)  # (standard tasks first, from the table: no lm-eval import for this one)
        if data.data_dir is not None and not Path(data.data_dir).is_dir():
            fix = ("run `dvc pull data.dvc` (or `seap export-starter --out data`), or fix data.dir"
                   if self.front == "params" else "pass a folder of task data")
            raise self.bad("data_dir", f"{data.data_dir} is not a folder", fix)
        catalogue = TaskCatalogue(data.data_dir, work_dir)
        try:
            specs = catalogue.resolve(data.tasks)
        except SeapError as exc:
            raise self.bad("tasks", exc.problem, exc.fix) from None
        held_out = []
        if self.budget.enabled and self.budget.fallback_tasks:
            try:
                held_out = catalogue.resolve(self.budget.fallback_tasks)
            except SeapError as exc:
                raise self.bad("fallback_tasks", exc.problem, exc.fix) from None
        generic = self.reconstruction.refit_generic
        if generic:
            try:
                catalogue.resolve(generic)
            except SeapError as exc:
                raise self.bad("refit_generic", exc.problem, exc.fix) from None
        not_mc = [s.name for s in [*specs, *held_out] if s.kind != "multiple_choice"]
        if not_mc:
            raise self.bad("tasks", f"task(s) {not_mc} are not multiple-choice tasks",
                           "use multiple-choice tasks; WikiText-2 perplexity is the `perplexity` option")
        self._check_metric({s.name: s.metrics for s in [*specs, *held_out]})
        if self.budget.enabled:  # selection items come out of each train split
            from seap.data.selection import MIN_TRAIN_RECORDS

            for spec in specs:
                if spec.train_file is None:
                    continue
                with open(spec.train_file, encoding="utf-8") as handle:
                    count = sum(1 for line in handle if line.strip())
                if count < MIN_TRAIN_RECORDS:
                    raise self.bad("selection_items", f"task {spec.name!r} has {count} train records, too few to "
                                   "hold selection items out of", f"give it at least {MIN_TRAIN_RECORDS} train "
                                   f"records, or drop {self.spell('max_drop')}")
        return specs


class _Field(NamedTuple):
    """A configuration field: the :class:`RunConfig` section holding it, its dataclass field and
    its :class:`Option`."""

    section: str
    field: dataclasses.Field[Any]
    option: Option


_SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # name -> its class
_FIELDS: dict[str, _Field] = {  # flat field name -> _Field, in declaration order
    f.name: _Field(section, f, Option(section if f.metadata["key"] else None, f.metadata["key"] or f.name,
                                      f.metadata["help"], **f.metadata["checks"]))
    for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


_UNSET = object()


def _moe_types() -> set[str]:
    """The ``model_type`` values a mixture-of-experts adapter serves."""
    from seap.model.adapters import ADAPTERS
    from seap.model.adapters.moe import MoeAdapter

    return {t for cls in ADAPTERS if issubclass(cls, MoeAdapter) for t in cls.model_types}


def task_name(task: str) -> str:
    """``jsonl:capitals`` / ``capitals`` -> ``capitals`` (the name rows and masks use)."""
    return task.rpartition(":")[2]


def options() -> dict[str, Option]:
    """Field name -> :class:`Option`, in declaration order."""
    return {name: f.option for name, f in _FIELDS.items()}


def declared_defaults() -> dict[str, Any]:
    """Field name -> its declared default (``reconstruct``: ``None``, the rule "on unless
    bias_compensation"): what a front door that passes every field on (the flows) defaults to."""
    return {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for name, (_, f, _) in _FIELDS.items()}


def param_sections() -> dict[str, list[str]]:
    """``params.yaml`` section -> its keys, in declaration order."""
    sections: dict[str, list[str]] = {}
    for o in options().values():
        if o.section:
            sections.setdefault(o.section, []).append(o.key)
    return sections


def option_name(name: str, front: Front) -> str:
    """How a front door spells field ``name``: ``--stats-batch-size``, ``statistics.batch_size``
    or ``stats_batch_size``."""
    option = options().get(name)
    if front == "cli":
        return "--" + name.replace("_", "-")
    if front == "params" and option is not None and option.section:
        return f"{option.section}.{option.key}"
    return name


def default_params() -> dict[str, dict[str, Any]]:
    """The defaults as a ``params.yaml`` mapping (what a fresh project starts from)."""
    values = RunConfig().to_dict()
    out: dict[str, dict[str, Any]] = {}
    for name, o in options().items():
        if o.section:
            out.setdefault(o.section, {})[o.key] = values[name]
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not (isinstance(value, float) and math.isnan(value))


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_is_int, "a whole number"),
    "float": (_is_number, "a number"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v), "a list of names"),
    "list[float]": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "dict[str, float]": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.strip() and _is_number(x)
                                                               for k, x in v.items()), "a mapping of TASK: number"),
}


def _check_type(config: RunConfig, name: str, value: Any, annotation: str, option: Option) -> None:
    nullable = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if nullable:
            return
        raise config.bad(name, "must not be null", f"set it, or leave it out for the default ({option.help})")
    check, wanted = _TYPES[base]
    if not check(value):
        if nullable:
            wanted += " or null"
        raise config.bad(name, f"must be {wanted}, got {value!r}", option.help)
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for item in items:
        if option.minimum is not None and _is_number(item) and item < option.minimum:
            raise config.bad(name, f"must be at least {option.minimum:g}, got {item!r}", option.help)
        if option.maximum is not None and _is_number(item) and item > option.maximum:
            raise config.bad(name, f"must be at most {option.maximum:g}, got {item!r}", option.help)
        if option.choices is not None and isinstance(item, str) and item not in option.choices:
            raise config.bad(name, f"unknown value {item!r}", f"use {'any' if isinstance(value, list) else 'one'} "
                             f"of: {', '.join(option.choices)}")


def given_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields given on a command line parsed with :func:`add_arguments`."""
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, _UNSET) is not _UNSET}


def add_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = (),
                  only: Sequence[str] | None = None, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """One ``--option`` per configuration field (or per field in ``only``; booleans as ``--x`` /
    ``--no-x``; ``aliases``: more spellings of a field's option); options left out keep the
    configuration's default (it is not repeated here)."""
    defaults = RunConfig().to_dict()
    for name, (_, f, o) in _FIELDS.items():
        if name in skip or (only is not None and name not in only):
            continue
        flags = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, ())]
        annotation = str(f.type)
        where = f" [params.yaml: {o.section}.{o.key}]" if o.section else ""
        help_text = f"{o.help} (default: {defaults[name]}){where}".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": _UNSET, "help": help_text}
        if annotation.removesuffix(" | None") == "bool":  # (null, where allowed, is leaving it out)
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        base = annotation.removesuffix(" | None")
        if base == "dict[str, float]":  # TASK=W ..., collected into a mapping
            parser.add_argument(*flags, nargs="+", type=_task_weight, action=_MappingAction, metavar="TASK=W", **kwargs)
            continue
        convert = {"str": str, "int": _int_or_null, "float": _float_or_null, "list[str]": str,
                   "list[float]": float}[base]
        if base.startswith("list["):
            kwargs["nargs"] = "+"
        parser.add_argument(*flags, type=convert, metavar=o.key.upper(), **kwargs)


def _task_weight(text: str) -> tuple[str, float]:
    """``"wikitext=3"`` -> ``("wikitext", 3.0)`` (an argparse type)."""
    task, sep, value = text.partition("=")
    try:
        if not sep or not task.strip():
            raise ValueError
        return task.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"write weights as TASK=NUMBER, e.g. wikitext=3; got {text!r}") from None


class _MappingAction(argparse.Action):
    """Collects ``TASK=W`` pairs (from :func:`_task_weight`) into one mapping."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)  # (given again: the pairs add up)
        setattr(namespace, self.dest, {**(before if isinstance(before, dict) else {}), **dict(values)})


def _or_null(kind: type, what: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, or None for ``null``/``none``."""

    def convert(text: str) -> Any:
        if text.lower() in ("null", "none"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or null, got {text!r}") from None

    return convert


_int_or_null = _or_null(int, "a whole number")
_float_or_null = _or_null(float, "a number")


def load_params(path: str | Path = "params.yaml") -> RunConfig:
    """Read and validate a ``params.yaml`` (the DVC front door)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SeapError(f"parameters file {p} not found", "create it (see params.yaml in the repository)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SeapError(f"{p} is not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from exc
    try:
        return RunConfig.from_params(raw, str(p)).validate(check_data=False)
    except SeapError as exc:
        raise SeapError(f"{p}: {exc.problem}", exc.fix) from None


__all__ = ["BenchSection", "DEFAULT_MODEL", "DEFAULT_TASKS", "DataSection", "EvaluationSection", "MaskSection",
           "ModelSection", "Option", "OutputSection", "REPORT_METRICS", "ROUTED_EXPERTS", "ReconstructionSection",
           "RegisterSection", "RouterSection", "RunConfig", "StatisticsSection", "add_arguments", "declared_defaults",
           "default_params", "load_params", "option_name", "options", "param_sections", "task_name"]
