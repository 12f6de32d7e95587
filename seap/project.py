"""The DVC side of the pipeline: ``params.yaml`` and one function per ``dvc.yaml`` stage.

``seap stage NAME`` (and :func:`run_stage`) reads a ``params.yaml`` with grouped sections,
validates all of it before any model is loaded, and runs one stage of the pipeline with the
same library stage functions (:mod:`seap.pipeline`) as the CLI and the Prefect flow
(``flows/pipeline.py``), chained the same way::

    model -> corpus -> statistics -> scores -> masks -> evaluate ----------\\
         \\-> evaluate-dense --------------------------------------------> report -> register
         \\-> router -> evaluate-routed (with masks) ----------------------/
                                             bench (with masks) --------/

Sections of ``params.yaml`` (every key optional here; :data:`DEFAULT_PARAMS` has the defaults,
but ``dvc.yaml`` names the keys it tracks, so DVC wants them present):

* ``model``: ``name`` (hub id, local HF folder, ``.gguf`` file or ``smollm2-135m``), ``device``,
  ``dtype`` (``auto``: float32 on CPU, bfloat16 on GPU).
* ``data``: ``dir`` (the DVC-tracked folder of tasks), ``tasks`` (names of ``DIR/<task>/``
  folders, used as ``jsonl:<task>``; a name with a source prefix such as ``local:piqa`` is
  used as it is), ``samples`` (calibration records per task, ``null``: all), ``seed``,
  ``max_tokens``.
* ``statistics``: ``batch_size``.
* ``scores``: ``score`` (SEAP's score, ``seap-sf``).
* ``masks``: ``sparsities``, ``schedule`` (of the SEAP experts and general mask), ``gqa_mode``,
  ``baselines`` (any of wanda-sp, wanda-sp+logistic, flap, flap+logistic; calibrated on the
  pooled statistics of all tasks, each with its own score, schedule and bias compensation).
* ``evaluate``: ``limit`` (items per task, ``null``: all), ``metric`` (acc, acc_norm, paper),
  ``batch_size``.
* ``router``: ``enabled``, ``prompts_per_task``, ``feature_layer``, ``threshold``.
* ``bench``: ``enabled``, ``repeats``.
* ``register``: ``dir`` (the local registry folder), ``mlflow`` (also track the run and register
  the experts in MLflow), ``tracking_uri`` (``null``: ``$MLFLOW_TRACKING_URI``, else a local
  sqlite store in ``mlflow_dir``), ``experiment``.

Every stage writes its outputs atomically (a temporary sibling renamed into place), so an
interrupted stage leaves nothing half-written, and replaces the outputs of an earlier run.
A disabled router or benchmark still writes an explicit "disabled" output, so the DAG is
the same whatever the parameters.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SeapError
from .io import atomic_directory, atomic_write_json, read_json

PARAMS_FILE = Path("params.yaml")
DEFAULT_TASKS = ["capitals", "antonyms", "arithmetic", "sentiment", "categories"]

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "model": {"name": "smollm2-135m", "device": "auto", "dtype": "auto"},
    "data": {"dir": "data", "tasks": DEFAULT_TASKS, "samples": 200, "seed": 42, "max_tokens": 512},
    "statistics": {"batch_size": 8},
    "scores": {"score": "seap-sf"},
    "masks": {"sparsities": [0.2, 0.5], "schedule": "logistic", "gqa_mode": "kv-groups",
              "baselines": ["wanda-sp", "flap"]},
    "evaluate": {"limit": None, "metric": "acc", "batch_size": 16},
    "router": {"enabled": True, "prompts_per_task": 500, "feature_layer": 0, "threshold": 0.5},
    "bench": {"enabled": True, "repeats": 3},
    "register": {"dir": "registry", "mlflow": True, "tracking_uri": None, "mlflow_dir": "runs/mlflow",
                 "experiment": "seap"},
}

# what each key must be: "str", "bool", "int>=0", "int>=1", "int>=1|null", "number", "str-list", "number-list"
KINDS: dict[str, dict[str, str]] = {
    "model": {"name": "str", "device": "str", "dtype": "str"},
    "data": {"dir": "str", "tasks": "str-list", "samples": "int>=1|null", "seed": "int>=0", "max_tokens": "int>=1"},
    "statistics": {"batch_size": "int>=1"},
    "scores": {"score": "str"},
    "masks": {"sparsities": "number-list", "schedule": "str", "gqa_mode": "str", "baselines": "str-list"},
    "evaluate": {"limit": "int>=1|null", "metric": "str", "batch_size": "int>=1"},
    "router": {"enabled": "bool", "prompts_per_task": "int>=1", "feature_layer": "int>=0", "threshold": "number"},
    "bench": {"enabled": "bool", "repeats": "int>=1"},
    "register": {"dir": "str", "mlflow": "bool", "tracking_uri": "str|null", "mlflow_dir": "str", "experiment": "str"},
}

# output locations, relative to the project root; dvc.yaml names the same paths
WORK = Path("work")
MODEL_JSON = WORK / "model.json"
CORPUS = WORK / "corpus.jsonl"
STATISTICS = WORK / "statistics"  # <task>/
POOLED_STATISTICS = WORK / "statistics-pooled"  # pooled/ (all tasks merged, for the baselines)
SCORES = WORK / "scores"  # <task>/ (SEAP score)
POOLED_SCORES = WORK / "scores-pooled"  # <score>/ (baseline scores of the pooled statistics)
MASKS = WORK / "masks"  # <method>/<sparsity>/<name>/ and index.json
EVAL_DENSE = WORK / "eval-dense.json"
EVAL_MASKS = WORK / "eval-masks"  # one row per mask group and index.json
ROUTER = WORK / "router"
EVAL_ROUTED = WORK / "eval-routed"  # one row per sparsity and index.json
BENCH = WORK / "bench.json"
RESULTS = Path("results")
TASK_FILES = WORK / "task-files"  # lm-eval task YAMLs (regenerated by every stage that evaluates; not an output)
INDEX = "index.json"
DISABLED = "disabled.json"
POOLED = "pooled"
RESULT_FILES = ("results.json", "results.md", "accuracy_vs_sparsity.png", "metrics.json", "accuracy.csv")


# ---------------------------------------------------------------------------------------
# parameters


def _bad(name: str, problem: str, fix: str | None) -> SeapError:
    return SeapError(f"parameter {name}: {problem}", fix)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not (isinstance(value, float) and math.isnan(value))


def check_kind(name: str, value: Any, kind: str) -> None:
    """Raise a :class:`SeapError` naming ``name`` when ``value`` is not of ``kind`` (see :data:`KINDS`)."""
    if kind.endswith("|null") and value is None:
        return
    base = kind.removesuffix("|null")
    ok = {
        "str": lambda v: isinstance(v, str) and v.strip() != "",
        "bool": lambda v: isinstance(v, bool),
        "int>=0": lambda v: _is_int(v) and v >= 0,
        "int>=1": lambda v: _is_int(v) and v >= 1,
        "number": _is_number,
        "str-list": lambda v: isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v),
        "number-list": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
    }[base](value)
    if not ok:
        wanted = {"str": "a non-empty string", "bool": "true or false", "int>=0": "a whole number >= 0",
                  "int>=1": "a whole number >= 1", "number": "a number", "str-list": "a list of names",
                  "number-list": "a list of numbers"}[base]
        if kind.endswith("|null"):
            wanted += " or null"
        raise _bad(name, f"must be {wanted}, got {value!r}", f"set {name} to {wanted} in params.yaml")


def merge_defaults(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``raw`` over :data:`DEFAULT_PARAMS`; unknown sections and keys are errors naming them."""
    if not isinstance(raw, Mapping):
        raise SeapError("params must be a mapping of sections", f"sections: {', '.join(DEFAULT_PARAMS)}")
    merged = copy.deepcopy(DEFAULT_PARAMS)
    for section, values in raw.items():
        if section not in DEFAULT_PARAMS:
            raise _bad(str(section), "unknown section", f"sections are: {', '.join(DEFAULT_PARAMS)}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise _bad(str(section), f"must be a mapping of keys, got {values!r}",
                       f"keys of {section}: {', '.join(DEFAULT_PARAMS[section])}")
        for key, value in values.items():
            if key not in DEFAULT_PARAMS[section]:
                raise _bad(f"{section}.{key}", "unknown key",
                           f"keys of {section}: {', '.join(DEFAULT_PARAMS[section])}")
            merged[section][key] = value
    return merged


def _check_semantics(p: dict[str, dict[str, Any]]) -> None:
    """The checks beyond types: known names, ranges, consistency (shared with the Prefect flow)."""
    from .pipeline import check_pipeline_options

    if p["model"]["dtype"] not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise _bad("model.dtype", f"unknown dtype {p['model']['dtype']!r}", "use auto, float32, bfloat16 or float16")
    m = p["masks"]
    check_pipeline_options(PARAMETER_NAMES, tasks=p["data"]["tasks"], sparsities=m["sparsities"],
                           score=p["scores"]["score"], schedule=m["schedule"], gqa_mode=m["gqa_mode"],
                           baselines=m["baselines"], metric=p["evaluate"]["metric"], router=p["router"]["enabled"],
                           router_threshold=p["router"]["threshold"])


# the flow's option names -> where they are in params.yaml
PARAMETER_NAMES = {"tasks": "data.tasks", "sparsities": "masks.sparsities", "score": "scores.score",
                   "schedule": "masks.schedule", "gqa_mode": "masks.gqa_mode", "baselines": "masks.baselines",
                   "metric": "evaluate.metric", "router": "router.enabled", "router_threshold": "router.threshold"}


def validate_params(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Complete ``raw`` with the defaults and check every parameter; returns the full params.

    Raises a :class:`SeapError` whose message names the first bad parameter (``section.key``).
    Loads no model and reads no data.
    """
    params = merge_defaults(raw)
    for section, kinds in KINDS.items():
        for key, kind in kinds.items():
            check_kind(f"{section}.{key}", params[section][key], kind)
    _check_semantics(params)
    return params


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, dict[str, Any]]:
    """Read and validate a ``params.yaml``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SeapError(f"parameters file {p} not found", "create it (see params.yaml in the repository)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SeapError(f"{p} is not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from exc
    try:
        return validate_params(raw)
    except SeapError as exc:
        raise SeapError(f"{p}: {exc.problem}", exc.fix) from None


def task_name(task: str) -> str:
    """``jsonl:capitals`` / ``capitals`` -> ``capitals`` (the name rows and masks use)."""
    return task.rpartition(":")[2]


def task_spec(task: str) -> str:
    """A ``data.tasks`` entry as a registry task: ``capitals`` -> ``jsonl:capitals``; prefixed names as they are."""
    return task if ":" in task else f"jsonl:{task}"


# ---------------------------------------------------------------------------------------
# the project: parameters, paths and shared helpers of the stages


@dataclass
class Project:
    """Validated parameters and the project root every stage path is relative to."""

    params: dict[str, dict[str, Any]]
    root: Path = Path(".")
    progress: bool = False

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    @property
    def data_dir(self) -> Path:
        """The data folder, absolute (lm-eval task files point into it)."""
        return (self.root / self.params["data"]["dir"]).resolve()

    @property
    def tasks(self) -> list[str]:
        """Registry task names (``jsonl:<task>`` for plain names)."""
        return [task_spec(t) for t in self.params["data"]["tasks"]]

    @property
    def task_names(self) -> list[str]:
        return [task_name(t) for t in self.params["data"]["tasks"]]

    @property
    def task_files(self) -> Path:
        return self.path(TASK_FILES)

    def check_tasks(self) -> list[Any]:
        """Resolve the tasks in the data folder (files present, records well-formed) before a model loads."""
        from .tasks import TaskRegistry

        if not self.data_dir.is_dir():
            raise _bad("data.dir", f"{self.data_dir} is not a folder",
                       "run `dvc pull data.dvc` (or `seap export-starter --out data`), or fix data.dir")
        try:
            return TaskRegistry(self.data_dir, self.task_files).resolve(self.tasks)
        except SeapError as exc:
            raise _bad("data.tasks", exc.problem, exc.fix) from None

    def require(self, relative: Path) -> Path:
        """An input of the stage, which an upstream stage must have written."""
        path = self.path(relative)
        if not path.exists():
            raise SeapError(f"input {path} is missing", "run the upstream stages first: `dvc repro`")
        return path

    def load_base(self) -> Any:
        """The base model of ``work/model.json``, checked against the fingerprint recorded there."""
        from .models import load_model

        info = read_json(self.require(MODEL_JSON), "model record")
        loaded = load_model(info["name"], device=info["device"], dtype=info["dtype"])
        if loaded.fingerprint != info["fingerprint"]:
            raise SeapError(
                f"model {info['name']!r} is not the one the `model` stage recorded "
                f"({loaded.fingerprint[:19]} != {info['fingerprint'][:19]})",
                "re-run the model stage and everything after it: `dvc repro -f -s model && dvc repro`",
            )
        return loaded

    def mask_index(self) -> list[dict[str, Any]]:
        """The mask groups of the masks stage, in table order."""
        return read_json(self.require(MASKS) / INDEX, "mask index")["groups"]

    def mask_dirs(self, group: Mapping[str, Any]) -> dict[str, Path]:
        return {name: self.path(MASKS) / rel for name, rel in group["masks"].items()}

    def router_dir(self) -> Path | None:
        """The trained router, or ``None`` when the router stage was disabled."""
        path = self.require(ROUTER)
        return None if (path / DISABLED).is_file() else path


def group_key(method: str, sparsity: float) -> str:
    """``"<method>@<sparsity:g>"``, the key the flow, the bench and the registry use."""
    return f"{method}@{sparsity:g}"


def _say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------
# stages


def stage_model(p: Project) -> None:
    """Resolve (fetch/convert once) and load the base model; record its source and fingerprint."""
    from .models import load_model, resolve_model_path

    m = p.params["model"]
    _, kind = resolve_model_path(m["name"])
    loaded = load_model(m["name"], device=m["device"], dtype=m["dtype"])
    geometry = loaded.adapter.geometry(loaded.model)
    info = {"name": m["name"], "kind": kind, "source": loaded.source, "device": m["device"], "dtype": m["dtype"],
            "loaded_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": loaded.fingerprint, "architecture": loaded.adapter.name, "layers": geometry.num_layers,
            "prunable_params": geometry.total_params()}
    atomic_write_json(p.path(MODEL_JSON), info)
    _say(f"model {m['name']} ({kind}, {loaded.adapter.name}): fingerprint {loaded.fingerprint[:19]} -> {MODEL_JSON}")


def stage_corpus(p: Project) -> None:
    """Calibration corpora of the tasks' train splits, in one corpus file."""
    from .pipeline import task_corpus_stage

    p.check_tasks()
    d = p.params["data"]
    corpora = task_corpus_stage(p.tasks, p.path(CORPUS), p.data_dir, d["samples"], d["seed"], d["max_tokens"],
                                p.task_files)
    for task, corpus in corpora.items():
        _say(f"{task}: {len(corpus)} texts")


def stage_statistics(p: Project) -> None:
    """Activation statistics per task, and their pooled merge (what the baselines calibrate on)."""
    from .pipeline import merge_stats_stage, stats_stage

    corpus = p.require(CORPUS)
    loaded = p.load_base()
    with atomic_directory(p.path(STATISTICS), overwrite=True) as tmp:
        written = stats_stage(loaded, corpus, tmp, batch_size=p.params["statistics"]["batch_size"],
                              progress=p.progress)
    tasks = list(written)
    with atomic_directory(p.path(POOLED_STATISTICS), overwrite=True) as tmp:
        merge_stats_stage([p.path(STATISTICS) / t for t in tasks], tmp / POOLED, POOLED)
    _say(f"statistics of {', '.join(tasks)} -> {STATISTICS}; pooled -> {POOLED_STATISTICS}")


def stage_scores(p: Project) -> None:
    """SEAP scores per task; the baselines' scores of the pooled statistics."""
    from .experiment import BASELINES, VARIANTS
    from .pipeline import scores_stage

    stats = p.require(STATISTICS)
    pooled = p.require(POOLED_STATISTICS) / POOLED
    score = p.params["scores"]["score"]
    with atomic_directory(p.path(SCORES), overwrite=True) as tmp:
        for task in p.task_names:
            scores_stage(stats / task, tmp / task, score)
    baseline_scores = sorted({VARIANTS[b].score for b in BASELINES})
    with atomic_directory(p.path(POOLED_SCORES), overwrite=True) as tmp:
        for name in baseline_scores:
            scores_stage(pooled, tmp / name, name)
    _say(f"{score} scores of {', '.join(p.task_names)} -> {SCORES}; pooled {', '.join(baseline_scores)} "
         f"-> {POOLED_SCORES}")


def mask_groups(p: Project) -> list[dict[str, Any]]:
    """What the masks stage builds, in the flow's order: per sparsity the SEAP experts, the
    general mask, then each baseline (relative folders under ``work/masks``)."""
    from .experiment import VARIANTS

    m = p.params["masks"]
    groups = []
    for sparsity in m["sparsities"]:
        s = f"{sparsity:g}"
        groups.append({"key": group_key("seap-expert", sparsity), "method": "seap-expert", "sparsity": sparsity,
                       "schedule": m["schedule"], "score": p.params["scores"]["score"], "bias_compensation": False,
                       "masks": {t: f"seap-expert/{s}/{t}" for t in p.task_names}})
        groups.append({"key": group_key("seap-general", sparsity), "method": "seap-general", "sparsity": sparsity,
                       "schedule": m["schedule"], "score": p.params["scores"]["score"], "bias_compensation": False,
                       "masks": {"general": f"seap-general/{s}/general"}})
        for method in m["baselines"]:
            v = VARIANTS[method]
            groups.append({"key": group_key(method, sparsity), "method": method, "sparsity": sparsity,
                           "schedule": v.schedule, "score": v.score, "bias_compensation": v.bias_compensation,
                           "masks": {"general": f"{method}/{s}/general"}})
    return groups


def stage_masks(p: Project) -> None:
    """Expert masks per task and the general mask (SEAP) plus the baselines' masks, per sparsity."""
    from .pipeline import mask_stage

    scores, pooled_scores = p.require(SCORES), p.require(POOLED_SCORES)
    pooled_stats = p.require(POOLED_STATISTICS) / POOLED
    gqa = p.params["masks"]["gqa_mode"]
    groups = mask_groups(p)
    with atomic_directory(p.path(MASKS), overwrite=True) as tmp:
        for g in groups:
            s = g["sparsity"]
            if g["method"] == "seap-expert":
                for task, rel in g["masks"].items():
                    mask_stage([scores / task], tmp / rel, s, g["schedule"], False, gqa_mode=gqa)
            elif g["method"] == "seap-general":
                mask_stage([scores / t for t in p.task_names], tmp / g["masks"]["general"], s, g["schedule"], True,
                           gqa_mode=gqa)
            else:
                mask_stage([pooled_scores / g["score"]], tmp / g["masks"]["general"], s, g["schedule"], False,
                           gqa_mode=gqa, bias_stats_dir=pooled_stats if g["bias_compensation"] else None)
            _say(f"{g['key']}: {', '.join(g['masks'])}")
        atomic_write_json(tmp / INDEX, {"groups": groups})


def _evaluate_options(p: Project) -> dict[str, Any]:
    e = p.params["evaluate"]
    return {"data_dir": p.data_dir, "limit": e["limit"], "batch_size": e["batch_size"], "metric": e["metric"],
            "work_dir": p.task_files}


def _average(row: Mapping[str, Any]) -> str:
    return f"{row['average']['table'] * 100:.2f}"


def stage_evaluate_dense(p: Project) -> None:
    """The dense row (no masks: a sparsity change never re-runs it)."""
    from .pipeline import evaluate_stage

    p.check_tasks()
    loaded = p.load_base()
    row = evaluate_stage(loaded, p.tasks, p.path(EVAL_DENSE), "dense", 0.0, {}, False, **_evaluate_options(p))
    _say(f"dense: average {_average(row)} -> {EVAL_DENSE}")


def _row_file(key: str) -> str:
    return f"{key}.json"


def stage_evaluate(p: Project) -> None:
    """One row per mask group: experts (each task with its own expert), general mask, baselines."""
    from .pipeline import evaluate_stage

    p.check_tasks()
    groups = p.mask_index()
    loaded = p.load_base()
    with atomic_directory(p.path(EVAL_MASKS), overwrite=True) as tmp:
        for g in groups:
            row = evaluate_stage(loaded, p.tasks, tmp / _row_file(g["key"]), g["method"], g["sparsity"],
                                 p.mask_dirs(g), g["bias_compensation"], **_evaluate_options(p))
            _say(f"{g['key']}: average {_average(row)}")
        atomic_write_json(tmp / INDEX, {"rows": [_row_file(g["key"]) for g in groups]})


def stage_router(p: Project) -> None:
    """The task router, or an explicit "disabled" output."""
    from .pipeline import router_stage

    r = p.params["router"]
    out = p.path(ROUTER)
    if not r["enabled"]:
        with atomic_directory(out, overwrite=True) as tmp:
            atomic_write_json(tmp / DISABLED, {"enabled": False, "reason": "router.enabled is false"})
        _say(f"router disabled -> {out / DISABLED}")
        return
    p.check_tasks()
    loaded = p.load_base()
    router = router_stage(loaded, p.tasks, out, p.data_dir, r["prompts_per_task"], r["feature_layer"],
                          p.params["data"]["seed"], r["threshold"], p.task_files, overwrite=True)
    _say(f"router: held-out accuracy {router.meta['heldout_accuracy']:.3f} -> {out}")


def stage_evaluate_routed(p: Project) -> None:
    """The ``seap-routed`` row per sparsity (router + experts + general fallback), or none when disabled."""
    from .pipeline import routed_evaluate_stage

    groups = {g["key"]: g for g in p.mask_index()}
    router = p.router_dir()
    sparsities = [g["sparsity"] for g in groups.values() if g["method"] == "seap-expert"]
    with atomic_directory(p.path(EVAL_ROUTED), overwrite=True) as tmp:
        rows = []
        if router is not None:
            p.check_tasks()
            loaded = p.load_base()
            for s in sparsities:
                experts = p.mask_dirs(groups[group_key("seap-expert", s)])
                general = p.mask_dirs(groups[group_key("seap-general", s)])["general"]
                name = _row_file(group_key("seap-routed", s))
                row = routed_evaluate_stage(loaded, p.tasks, tmp / name, s, experts, general, router,
                                            **_evaluate_options(p))
                rows.append(name)
                _say(f"{group_key('seap-routed', s)}: average {_average(row)}")
        else:
            _say("router disabled: no routed rows")
        atomic_write_json(tmp / INDEX, {"enabled": router is not None, "rows": rows})


def stage_bench(p: Project) -> None:
    """Dense against every mask's hard-pruned model (``"<method>@<sparsity>:<mask>"``), or "disabled"."""
    from .pipeline import bench_stage

    b = p.params["bench"]
    out = p.path(BENCH)
    if not b["enabled"]:
        atomic_write_json(out, {"enabled": False, "reason": "bench.enabled is false"})
        _say(f"speed benchmark disabled -> {out}")
        return
    groups = p.mask_index()
    flat = {f"{g['key']}:{name}": path for g in groups for name, path in p.mask_dirs(g).items()}
    bias = {f"{g['key']}:{name}": g["bias_compensation"] for g in groups for name in g["masks"]}
    loaded = p.load_base()
    result = bench_stage(loaded, flat, out, bias, b["repeats"])
    measured = [k for k, v in result["models"].items() if "same_shapes_as" not in v]
    _say(f"speed of dense and {len(measured) - 1} distinct pruned shapes ({len(flat)} masks) -> {out}")


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    return [read_json(folder / name, "result row") for name in read_json(folder / INDEX, "row index")["rows"]]


def run_config(p: Project) -> dict[str, Any]:
    """The run's configuration as results.json records it (the flow's parameter names)."""
    d, m, r, b = p.params["data"], p.params["masks"], p.params["router"], p.params["bench"]
    return {"runner": "dvc", "model": p.params["model"]["name"], "tasks": p.task_names,
            "sparsities": m["sparsities"], "score": p.params["scores"]["score"], "schedule": m["schedule"],
            "baselines": m["baselines"], "router": r["enabled"], "bench": b["enabled"], "bench_repeats": b["repeats"],
            "eval_limit": p.params["evaluate"]["limit"], "data_dir": d["dir"], "samples": d["samples"],
            "seed": d["seed"], "max_tokens": d["max_tokens"], "metric": p.params["evaluate"]["metric"],
            "gqa_mode": m["gqa_mode"], "router_prompts": r["prompts_per_task"], "router_layer": r["feature_layer"],
            "router_threshold": r["threshold"], "stats_batch_size": p.params["statistics"]["batch_size"]}


def stage_report(p: Project) -> None:
    """Table 1, results.json, metrics.json, accuracy.csv and the plot, from the evaluated rows."""
    from .pipeline import summary_stage

    p.check_tasks()
    rows = [read_json(p.require(EVAL_DENSE), "dense row")]
    rows += _read_rows(p.require(EVAL_MASKS)) + _read_rows(p.require(EVAL_ROUTED))
    speed = read_json(p.require(BENCH), "speed benchmark")
    if speed.get("enabled") is False:
        speed = None
    e = p.params["evaluate"]
    out = p.path(RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".results-", dir=out) as tmp:  # all files first, then renamed in
        summary_stage(rows, tmp, run_config(p), p.tasks, p.data_dir, e["limit"], e["metric"], router=p.router_dir(),
                      speed=speed, work_dir=p.task_files)
        for name in RESULT_FILES:
            os.replace(Path(tmp) / name, out / name)
    _say((out / "results.md").read_text(encoding="utf-8"))
    _say(f"results: {', '.join(str(out / n) for n in RESULT_FILES)}")


def stage_register(p: Project) -> None:
    """Register the SEAP experts, general masks and routed bundles in the local registry folder."""
    from .pipeline import register_stage

    masks = {g["key"]: {name: str(path) for name, path in p.mask_dirs(g).items()} for g in p.mask_index()}
    router = p.router_dir()
    registry = p.path(p.params["register"]["dir"])
    written = register_stage(p.require(RESULTS / "results.json"), masks, registry, str(router) if router else None,
                             p.params["scores"]["score"], p.params["masks"]["schedule"])
    for record in written:
        _say(f"{record['name']} {record['version']}: {record['tags']['kind']} {record['tags']['task']} "
             f"@{record['tags']['sparsity']}")
    _say(f"{len(written)} expert versions in {registry}")
    cfg = p.params["register"]
    if cfg["mlflow"]:
        from .extensions import mlflow_registry
        from .registry import read_local_record

        params = {f"{section}.{key}": value for section, values in p.params.items() if isinstance(values, dict)
                  for key, value in values.items()}
        tracked = mlflow_registry().register_results(
            p.path(RESULTS), [read_local_record(r["path"]) for r in written], tracking_uri=cfg["tracking_uri"],
            local_dir=p.path(cfg["mlflow_dir"]), experiment=cfg["experiment"], params=params, progress=False)
        created = sum(v["created"] for v in tracked["versions"])
        _say(f"MLflow run {tracked['run_id']} ({tracked['tracking_uri']}): {len(tracked['versions'])} versions, "
             f"{created} new")


STAGES: dict[str, Callable[[Project], None]] = {
    "model": stage_model,
    "corpus": stage_corpus,
    "statistics": stage_statistics,
    "scores": stage_scores,
    "masks": stage_masks,
    "evaluate-dense": stage_evaluate_dense,
    "evaluate": stage_evaluate,
    "router": stage_router,
    "evaluate-routed": stage_evaluate_routed,
    "bench": stage_bench,
    "report": stage_report,
    "register": stage_register,
}


def run_stage(name: str, params_file: str | Path = PARAMS_FILE, root: str | Path = Path("."),
              progress: bool = False) -> None:
    """Run one stage of ``dvc.yaml``: validate all of ``params_file`` first, then the stage.

    Paths (data, work, results, registry) are relative to ``root``, where ``dvc.yaml`` is.
    """
    if name not in STAGES:
        raise SeapError(f"unknown stage {name!r}", f"stages: {', '.join(STAGES)}")
    params = load_params(params_file)
    STAGES[name](Project(params, Path(root), progress))


# ---------------------------------------------------------------------------------------
# the starter suite as a data folder


def export_starter(out: str | Path, seed: int = 0, tasks: Sequence[str] | None = None,
                   overwrite: bool = False) -> dict[str, int]:
    """Write the built-in starter suite as a ``jsonl`` task folder (``OUT/<task>/train.jsonl`` and
    ``validation.jsonl``, records ``{"question", "choices", "answer"}``), atomically and
    deterministically; returns the record count per file."""
    from .starter import starter_files

    files = starter_files(seed, tasks)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return {rel: text.count("\n") for rel, text in files.items()}


__all__ = ["DEFAULT_PARAMS", "STAGES", "Project", "export_starter", "load_params", "run_stage",
           "validate_params"]
