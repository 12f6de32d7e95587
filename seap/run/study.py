"""The quality study behind ``docs/results.md``: one command, every figure, settings chosen on
held-out calibration-side items.

    seap study --data-dir ../shared/benchmarks --out docs

It walks ordinary run plans (:func:`seap.run.plan.make_plan`, executed by
:func:`seap.run.execute.execute`) in one shared, content-addressed work folder, so a study
that is stopped resumes where it stopped and a second run only re-does what changed. Each
finished run of the study (one configuration: a selection candidate, or one compensation at
one sparsity) is also written to a *ledger* (``<out>/results/study-runs/``, one small JSON
file per run: its configuration, results, per-item correctness and KL, the code digest and
commit it was measured with), so a study resumes on another machine, where the work folder
is gone, from the runs a previous machine finished; ``--fresh`` measures everything again.
The steps:

1. **selection** (:func:`selection_data`): each task's *train* split is cut in two (seeded);
   the masks are calibrated on the first part, and every candidate setting of the refit (and
   no refit, and bias compensation) is scored on the second part. The chosen refit is the one
   with the best mean accuracy over the SEAP expert and both logistic-schedule baselines at
   the selection sparsities. No reported item is ever looked at;
2. **rows**: dense; SEAP expert, general and routed; Wanda-sp and FLAP with their own
   allocation and with the logistic schedule; each with no compensation, bias compensation,
   and the chosen least-squares refit; at every study sparsity; on the starter suite (every
   item) and PIQA (every validation item), calibrated on the train splits;
3. **calibration size**: the SEAP expert with 50, 200 and 1,000 records per task (at the
   rows' own size, the rows' SEAP-expert runs are the answer and are not measured again);
4. **analysis** (pure functions of :mod:`seap.evaluation.significance`): 95% intervals,
   paired differences of the SEAP expert against each baseline on the same items, retention
   of the margin over chance, WikiText-2 perplexity of each general mask, and the mean KL
   divergence from dense on held-out text of each task (:mod:`seap.evaluation.divergence`).

Outputs: ``<out>/results/study.json`` (every number), ``<out>/results/study.md`` (the tables)
and ``<out>/results/study-retention.png`` (retention against sparsity with 95% bands).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_json, atomic_write_text, read_json
from seap.run.config import DEFAULT_TASKS, RunConfig
from seap.run.methods import DENSE, METHODS, row_key

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


DEFAULT_REFIT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)  # the regulariser strengths the selection sweeps
DEFAULT_GENERIC = ("boolq",)  # generic text for the refit (BoolQ's train passages: Wikipedia paragraphs)


def refit_candidates(alphas: Sequence[float] = DEFAULT_REFIT_ALPHAS,
                     generic: Sequence[str] = DEFAULT_GENERIC, sequential: bool = False) -> list[Compensation]:
    """The least-squares settings the selection step tries, one factor at a time around the
    refit's defaults (:class:`seap.maths.reconstruction.RefitOptions`: alpha 0.01, a bias, the
    slice prior, one-shot; each SEAP expert on its own task's corpus): the defaults, every
    other ``alpha``, no bias, the pooled corpus, the ridge prior (zero), generic text added to
    every refit corpus (``generic`` tasks' train text; none when empty) and, when asked, the
    layer-sequential fit (``sequential``: about 40x the refit time on a CPU)."""
    from seap.maths.reconstruction import RefitOptions

    d = RefitOptions()

    def candidate(alpha: float = d.alpha, bias: bool = d.bias, corpus: str = "own", prior: str = d.prior,
                  extra: Sequence[str] = (), sequential: bool = False) -> Compensation:
        name = f"ls-a{alpha:g}{'-bias' if bias else ''}-{corpus}" + ("-zero" if prior == "zero" else "") + \
            (f"-{'+'.join(extra)}" if extra else "") + ("-sequential" if sequential else "")
        label = (f"least squares (alpha {alpha:g}, {'bias, ' if bias else ''}{corpus} corpus"
                 + (", zero prior" if prior == "zero" else "") + (f", + {'+'.join(extra)} text" if extra else "")
                 + (", sequential" if sequential else "") + ")")
        return Compensation(name, label, {"reconstruct": True, "refit_alpha": alpha, "refit_bias": bias,
                                          "refit_corpus": corpus, "refit_prior": prior,
                                          **({"refit_generic": list(extra)} if extra else {}),
                                          **({"refit_sequential": True} if sequential else {})})

    out = [candidate()]
    out += [candidate(alpha=a) for a in alphas if a != d.alpha]
    out += [candidate(bias=not d.bias), candidate(corpus="pooled"), candidate(prior="zero")]
    if generic:
        out.append(candidate(extra=generic))
    if sequential:
        out.append(candidate(sequential=True))
    return out


@dataclass
class StudyOptions:
    """What the study runs. ``quick`` shrinks every axis (a smoke run, or CI on a tiny model)."""

    model: str = "smollm2-135m"
    data_dir: str = "../shared/benchmarks"
    tasks: Sequence[str] = (*DEFAULT_TASKS, "piqa")
    sparsities: Sequence[float] = (0.2, 0.3, 0.4, 0.5)
    selection_sparsities: Sequence[float] = (0.3, 0.5)
    selection_items: int = 100  # per task, cut from the train split (at most half of it)
    calibration_sizes: Sequence[int] = (50, 200, 1000)
    calibration_size_sparsities: Sequence[float] = (0.2, 0.5)
    samples: int = 200
    limit: int | None = None
    kl_texts: int = 100  # held-out texts per task
    perplexity: bool = True
    perplexity_windows: int = 20  # WikiText-2 windows of 512 tokens (10k tokens)
    workdir: str = "runs/study/work"
    out: str = "docs"
    seed: int = 42
    # the study's masks keep free widths (as its first runs did); §5.2 of docs/results.md measures the
    # product's default (64): within +-0.8 points
    channel_multiple: int = 1
    candidates: Sequence[Compensation] = field(default_factory=refit_candidates)
    base: Mapping[str, Any] = field(default_factory=dict)  # any other RunConfig fields (tests: a tiny model)
    ledger: str | None = None  # finished runs, reusable on any machine (None: <out>/results/study-runs)
    fresh: bool = False  # measure every run again (ledger entries are replaced)

    @property
    def ledger_dir(self) -> Path:
        return Path(self.ledger) if self.ledger else Path(self.out) / "results" / "study-runs"

    def config(self, **changes: Any) -> RunConfig:
        values = dict(model=self.model, data_dir=self.data_dir, tasks=list(self.tasks), samples=self.samples,
                      seed=self.seed, limit=self.limit, bench=False, mlflow=False, workdir=self.workdir,
                      perplexity_windows=self.perplexity_windows, channel_multiple=self.channel_multiple)
        values.update(self.base)
        values.update(changes)
        return RunConfig(**values)


# -- 1. selection on calibration-side items ------------------------------------------------


def selection_data(config: RunConfig, folder: str | Path, items: int, seed: int,
                   generic: Sequence[str] = ()) -> list[str]:
    """Write a data folder where each task's train split is cut in two: ``train.jsonl`` (what
    calibrates) and ``validation.jsonl`` (``items`` records, at most half, what selects); the
    ``generic`` tasks (refit text, never evaluated) are copied as they are. Returns the task
    names as the selection run spells them."""
    import shutil
    from seap.data.catalogue import STANDARD_TASKS, TaskCatalogue
    from seap.data.corpus import read_records

    folder = Path(folder)
    specs = TaskCatalogue(config.data_dir, Path(config.workdir) / "task-files").resolve(config.tasks)
    names = []
    for spec in specs:
        records = spec.calibration_records() if spec.train_file is None else read_records(spec.train_file)
        if len(records) < 4:
            raise SeapError(f"task {spec.name!r} has {len(records)} train records, too few to hold some out",
                            "give it more train records, or leave it out of the study")
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        held = min(items, len(records) // 2)
        heldout = [records[i] for i in sorted(order[:held])]
        train = [records[i] for i in sorted(order[held:])]
        for split, rows in (("train", train), ("validation", heldout)):
            text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
            path = folder / spec.name / f"{split}.jsonl"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                atomic_write_text(path, text)
        if spec.name in STANDARD_TASKS:
            test = folder / spec.name / "test.jsonl"  # lm-eval's definitions may list a test split too
            if not test.is_file():
                atomic_write_text(test, "".join(json.dumps(r, sort_keys=True) + "\n" for r in heldout))
        names.append(spec.name if spec.name in STANDARD_TASKS else f"jsonl:{spec.name}")
    for task in generic:
        source, target = Path(config.data_dir or ".") / task, folder / task
        if not target.is_dir():
            if not source.is_dir():
                raise SeapError(f"generic refit text {task!r}: no folder {source}",
                                "put the task under the study's --data-dir, or pass --generic with another task")
            shutil.copytree(source, target.with_name(f".{task}.partial"), dirs_exist_ok=True)
            target.with_name(f".{task}.partial").rename(target)
    return names


def _rows(results_dir: Path) -> dict[str, dict[str, Any]]:
    results = read_json(results_dir / "results.json", "results file")
    return {row_key(r["method"], r["sparsity"]): r for r in results["rows"]}


def _selection_folder(options: StudyOptions) -> Path:
    return Path(options.workdir).parent / "selection-data"


def _selection_config(options: StudyOptions, tasks: Sequence[str], changes: Mapping[str, Any]) -> RunConfig:
    """A run on the held-out train items: the selection methods at the selection sparsities."""
    return options.config(tasks=list(tasks), data_dir=str(_selection_folder(options)), methods=list(SELECTION_METHODS),
                          sparsities=list(options.selection_sparsities), limit=None, **changes)


def select_refit(options: StudyOptions, run: Callable[[str, RunConfig], StudyRun], say: Callable[[str], None]
                 ) -> tuple[Compensation, dict[str, Any]]:
    """Score every candidate on the held-out train items; the best mean accuracy wins."""
    folder = _selection_folder(options)
    generic = sorted({t for c in options.candidates for t in c.changes.get("refit_generic", [])})
    tasks = selection_data(options.config(), folder, options.selection_items, options.seed, generic)
    scores: dict[str, Any] = {}
    for candidate in (NO_COMPENSATION, BIAS_COMPENSATION, *options.candidates):
        done = run(f"selection-{candidate.name}", _selection_config(options, tasks, candidate.changes))
        rows = done.rows
        values = {key: row["average"]["table"] for key, row in rows.items() if key != DENSE}
        scores[candidate.name] = {"label": candidate.label, "rows": values,
                                  "mean": sum(values.values()) / len(values), "dense": rows[DENSE]["average"]["table"]}
        say(f"selection {candidate.name}: mean {scores[candidate.name]['mean'] * 100:.2f}")
    best = max(options.candidates, key=lambda c: scores[c.name]["mean"])
    return best, {"tasks": tasks, "items_per_task": options.selection_items, "scores": scores, "chosen": best.name}


def selection_control(options: StudyOptions, best: Compensation, tasks: Sequence[str],
                      run: Callable[[str, RunConfig], StudyRun]) -> list[dict[str, Any]]:
    """On the held-out train items: the SEAP expert minus each same-schedule baseline under the
    chosen refit, with the baselines refitted on the pooled corpora (the chosen setting) and on
    each task's own corpus (the control), paired. Empty when the chosen setting does not refit."""
    from seap.evaluation.significance import paired_difference, verdict

    if not best.changes.get("reconstruct"):
        return []
    out = []
    for corpus in ("own", "per-task"):
        config = _selection_config(options, tasks, {**best.changes, "refit_corpus": corpus})
        done = run(f"selection-{best.name}" if corpus == "own" else f"selection-{best.name}-{corpus}", config)
        rows, items = done.rows, done.items
        for sparsity in options.selection_sparsities:
            expert = row_key("seap-expert", sparsity)
            for baseline in SAME_SCHEDULE:
                other = row_key(baseline, sparsity)
                diff = paired_difference(items[expert], items[other])
                out.append({"baselines_refit": "pooled" if corpus == "own" else "per-task", "sparsity": sparsity,
                            "baseline": baseline, "expert": rows[expert]["average"]["table"],
                            "baseline_accuracy": rows[other]["average"]["table"], **diff, "verdict": verdict(diff)})
    return out


# -- 2./3. the reported rows, and the ledger of finished runs ------------------------------


@dataclass
class StudyRun:
    """One finished run of the study (measured now, or read from the ledger): its configuration,
    its results (``results.json``), each row's per-item correctness and each mask row's KL."""

    name: str
    config: RunConfig
    results: dict[str, Any]
    items: dict[str, dict[str, dict[int, float]]]  # row -> task -> item -> correctness
    kl: dict[str, Any] = field(default_factory=dict)  # row -> {"tasks": ..., "mean": ...}
    measured: dict[str, Any] = field(default_factory=dict)  # code digest, commit, seconds, date
    reused: bool = False  # read from the ledger

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return {row_key(r["method"], r["sparsity"]): r for r in self.results["rows"]}


JOB_EVENTS: list[Callable[[Any], None]] = []  # where finished jobs are announced (the CLI's one-line view)
LEDGER_FORMAT = "seap-study-run/1"
# RunConfig fields that do not change a run's numbers (where outputs go, what is registered, speed)
_LEDGER_IGNORES = ("workdir", "out", "registry_dir", "mlflow", "tracking_uri", "mlflow_dir", "experiment", "bench",
                   "bench_repeats", "bench_llama_cpp", "dask_workers", "dask_address", "stats_shards")
# options added after the ledger began, at the value that computes what the code did before they
# existed: left out of the material, so an entry measured before them still matches (a run at
# another value, such as the product's default widths, does not)
_LEDGER_NEUTRAL: dict[str, Any] = {"unit": "auto", "router_kind": "features", "allow_k_reduction": False,
                                   "expert_score": "tcess", "channel_multiple": 1, "same_width": False}


def _without_neutral(material: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in material.items() if not (k in _LEDGER_NEUTRAL and v == _LEDGER_NEUTRAL[k])}


def execute_config(config: RunConfig, progress: bool) -> tuple[dict[str, str], Path]:
    """Run one configuration's plan up to its report in the study's work folder (finished jobs
    are reused; nothing is registered)."""
    from seap.run.execute import execute
    from seap.run.plan import make_plan
    from seap.run.stages import StageContext

    config.validate()
    plan = make_plan(config).upstream_of(["report"])  # a study registers nothing (its masks are not deployed)
    ctx = StageContext(Path(config.workdir) / "task-files", progress=progress, say=lambda _: None)
    done = execute(plan, ctx, on_event=lambda e: [f(e) for f in JOB_EVENTS])
    outputs = {key: str(done.path(key)) for key in done.outputs}
    return outputs, done.path("report")


def ledger_material(config: RunConfig, kl_texts: int) -> dict[str, Any]:
    """What a run's numbers depend on, as the ledger matches it: every configuration field but
    output locations and registration, the data folder by its content, and the KL texts."""
    from seap.contenthash import tree_digest

    values = {k: v for k, v in config.to_dict().items() if k not in _LEDGER_IGNORES}
    if values.get("data_dir"):
        values["data_dir"] = {"digest": tree_digest(values["data_dir"])}
    values["kl_texts"] = kl_texts
    return _without_neutral(json.loads(json.dumps(values, sort_keys=True, default=str)))


def _code_version() -> dict[str, Any]:
    """The digest of every stage's source and, in a git checkout, the commit."""
    import subprocess
    from seap.contenthash import code_digest
    from seap.run.plan import STAGES

    version: dict[str, Any] = {"code": code_digest(m for s in STAGES.values() for m in s.modules)[:16]}
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=Path(__file__).parent.parent,
                               capture_output=True, text=True, timeout=10)
        if found.returncode == 0:
            version["commit"] = found.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def encode_correctness(values: Mapping[int, float]) -> dict[str, Any]:
    """Per-item correctness, compact: a string of 0/1 digits in item order (a list when a
    value is fractional), with the item ids unless they are 0..n-1."""
    ids = sorted(values)
    scores = [values[i] for i in ids]
    out: dict[str, Any] = {"values": "".join(str(int(v)) for v in scores) if all(v in (0.0, 1.0) for v in scores)
                           else scores}
    if ids != list(range(len(ids))):
        out["ids"] = ids
    return out


def decode_correctness(data: Mapping[str, Any]) -> dict[int, float]:
    """The inverse of :func:`encode_correctness`."""
    raw = data["values"]
    scores = [float(c) for c in raw] if isinstance(raw, str) else [float(v) for v in raw]
    ids = data.get("ids", range(len(scores)))
    if len(ids) != len(scores):
        raise SeapError("a study ledger entry has per-item values that do not match its item ids",
                        "delete that entry (it will be measured again)")
    return dict(zip(ids, scores))


def study_run(options: StudyOptions, name: str, config: RunConfig, say: Callable[[str], None], progress: bool = False,
              kl: bool = False) -> StudyRun:
    """Run ``config`` (or read it from the ledger, when an entry with the same name and the same
    :func:`ledger_material` is there and ``options.fresh`` is off); a run measured now is
    written to the ledger at once."""
    started = time.perf_counter()
    material = ledger_material(config, options.kl_texts if kl else 0)
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    path = options.ledger_dir / f"{name}-{digest}.json"
    if path.is_file() and not options.fresh:
        entry = read_json(path, "study ledger entry")
        if entry.get("format") == LEDGER_FORMAT and _without_neutral(entry.get("material") or {}) == material:
            items = {row: {task: decode_correctness(v) for task, v in tasks.items()}
                     for row, tasks in entry["items"].items()}
            say(f"{name}: from the ledger (measured {entry['measured'].get('date', '?')}, "
                f"{entry['measured'].get('commit', 'code ' + entry['measured'].get('code', '?'))})")
            return StudyRun(name, config, entry["results"], items, entry.get("kl", {}), entry["measured"], True)
    from seap.run.plan import make_plan

    outputs, report = execute_config(config, progress)
    plan_rows = {j.row: j.key for j in make_plan(config).jobs if j.row}
    items = row_correctness(outputs, plan_rows, config.metric)
    results = read_json(report / "results.json", "results file")
    kl_values = measure_kl(config, outputs, options.kl_texts, lambda text: say(f"{name}: {text}")) if kl else {}
    measured = {**_code_version(), "seconds": round(time.perf_counter() - started, 1),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_json(path, {"format": LEDGER_FORMAT, "name": name, "material": material, "measured": measured,
                             "results": results, "kl": kl_values,
                             "items": {row: {task: encode_correctness(v) for task, v in tasks.items()}
                                       for row, tasks in items.items()}})
    return StudyRun(name, config, results, items, kl_values, measured)


# -- 4. analysis -------------------------------------------------------------------------


def row_correctness(outputs: Mapping[str, str], plan_rows: Mapping[str, str], metric: str
                    ) -> dict[str, dict[str, dict[int, float]]]:
    """Row key -> per-item correctness, from each row's ``items.json``."""
    from seap.evaluation.metrics import metric_for
    from seap.evaluation.significance import correctness
    from seap.run.stages import ITEMS_FILE

    out = {}
    for row, key in plan_rows.items():
        items = read_json(Path(outputs[key]) / ITEMS_FILE, "row items")
        out[row] = correctness(items, {t: metric_for(t, metric) for t in items})
    return out


def analyse(runs: Sequence[StudyRun], metric: str) -> dict[str, Any]:
    """Every number of the study's tables from the finished runs (pure). Runs that share a name
    (one compensation, one run per sparsity) make one table; the dense row is taken once."""
    from seap.evaluation.metrics import retention
    from seap.evaluation.significance import bootstrap_average, paired_difference, verdict, wilson_interval

    table: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    headline: list[str] | None = None
    excluded: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for run in runs:
        rows, items = run.rows, run.items
        dense = rows[DENSE]
        if headline is None:
            headline = []
            for task, t in dense["tasks"].items():
                value = t[_metric(task, metric)]
                if value - t["chance"] >= CHANCE_MARGIN:
                    headline.append(task)
                else:
                    excluded[task] = {"dense": value, "chance": t["chance"]}
        for key, row in rows.items():
            if (key == DENSE and table) or (run.name, key) in seen:
                continue
            seen.add((run.name, key))
            per_task = {}
            for task, t in row["tasks"].items():
                values = items[key].get(task, {})
                right = sum(values.values())
                per_task[task] = {"accuracy": t[_metric(task, metric)], "items": len(values),
                                  "ci95": wilson_interval(right, len(values)), "chance": t.get("chance")}
            head = {t: items[key][t] for t in headline if t in items[key]}
            low, high = bootstrap_average(head)
            entry = {"run": run.name, "row": key, "method": row["method"], "sparsity": row["sparsity"],
                     "realised": row.get("realised_sparsity"), "tasks": per_task,
                     "headline": sum(per_task[t]["accuracy"] for t in head) / max(len(head), 1),
                     "headline_ci95": (low, high),
                     "starter": _mean([per_task[t]["accuracy"] for t in DEFAULT_TASKS if t in per_task]),
                     "retention": retention(row, dense, metric, list(head)),
                     "kl": run.kl.get(key)}
            table.append(entry)
        for sparsity in run.config.sparsities:
            expert = row_key("seap-expert", sparsity)
            if expert not in items:
                continue
            for baseline in ("wanda-sp", "wanda-sp+logistic", "flap", "flap+logistic", "seap-general"):
                other = row_key(baseline, sparsity)
                if other not in items:
                    continue
                head = lambda rows: {t: v for t, v in rows.items() if t in (headline or [])}  # noqa: E731
                diff = paired_difference(head(items[expert]), head(items[other]))
                paired.append({"run": run.name, "sparsity": sparsity, "baseline": baseline,
                               "same_schedule": baseline in SAME_SCHEDULE, **diff, "verdict": verdict(diff)})
    return {"rows": table, "paired": paired, "headline_tasks": headline, "excluded_tasks": excluded}


def _metric(task: str, metric: str) -> str:
    from seap.evaluation.metrics import metric_for

    return metric_for(task, metric)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure_kl(c: RunConfig, outputs: Mapping[str, str], texts_per_task: int, say: Callable[[str], None]
               ) -> dict[str, Any]:
    """Row -> mean KL from dense on each task's held-out text, for every mask row of the run of
    ``c`` whose job outputs are ``outputs`` (an expert row: each task with its own expert; not
    the routed row, whose mask depends on each input), cached in the work folder by the masks'
    content."""
    from seap.data.catalogue import TaskCatalogue
    from seap.evaluation.divergence import heldout_texts, mean_kl
    from seap.maths.masks import PruningMask
    from seap.model.surgery import apply_mask
    from seap.run.plan import make_plan
    from seap.run.stages import StageContext

    plan = make_plan(c)
    ctx = StageContext(Path(c.workdir) / "task-files")
    specs = TaskCatalogue(c.data_dir, Path(c.workdir) / "task-files").resolve(c.tasks)
    texts = {s.name: heldout_texts(s, texts_per_task, c.seed) for s in specs}
    base = None
    out: dict[str, Any] = {}
    for job in plan.of_stage("evaluate"):
        masks = job.inputs["masks"]
        cache_key = {"masks": sorted(Path(outputs[k]).name for k in masks.values()),
                     "tasks": sorted(texts), "texts": texts_per_task, "seed": c.seed}
        digest = hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode()).hexdigest()[:24]
        cache = Path(c.workdir) / "kl" / f"{job.name.replace('@', '_')}-{digest}.json"
        if cache.is_file() and read_json(cache, "KL cache").get("key") == cache_key:
            out[job.row] = read_json(cache, "KL cache")["kl"]
            continue
        if base is None:
            base = ctx.base(outputs["model"])
        per_task = {}
        pruned: dict[str, Any] = {}  # one model per mask (a general mask serves every task)
        for task, text in texts.items():
            mask_key = masks.get(task) or masks["general"]
            if mask_key not in pruned:
                pruned[mask_key] = apply_mask(base, PruningMask.load(outputs[mask_key]), "hard")
            per_task[task] = mean_kl(base, pruned[mask_key], text)["kl"]
        value = {"tasks": per_task, "mean": sum(per_task.values()) / len(per_task)}
        atomic_write_json(cache, {"key": cache_key, "kl": value})
        out[job.row] = value
        say(f"KL {job.row}: {value['mean']:.3f}")
    return out


__all__ = ["BIAS_COMPENSATION", "NO_COMPENSATION", "STUDY_METHODS", "Compensation", "StudyOptions", "StudyRun",
           "analyse", "decode_correctness", "encode_correctness", "execute_config", "expert_rows", "ledger_material",
           "measure_kl", "refit_candidates", "run_study", "select_refit", "selection_data", "study_markdown", "study_run",
           "targets", "write_study"]


# -- the whole study -----------------------------------------------------------------------


def run_study(options: StudyOptions, say: Callable[[str], None] = print, progress: bool = False) -> dict[str, Any]:
    """Selection, the rows under each compensation, calibration sizes, KL, analysis; writes
    ``<out>/results/study.{json,md}`` and the retention plot. Returns the study record."""
    started = time.perf_counter()
    every: list[StudyRun] = []

    def run(name: str, config: RunConfig, kl: bool = False) -> StudyRun:
        done = study_run(options, name, config, say, progress, kl)
        every.append(done)
        return done

    best, selection = select_refit(options, run, say)
    say(f"chosen refit: {best.label}")
    selection["control"] = selection_control(options, best, selection["tasks"], run)
    atomic_write_json(Path(options.out) / "results" / "study-selection.json",  # kept if the study stops later
                      {"model": options.model, "tasks": list(options.tasks), "selection": selection})
    runs: list[StudyRun] = []
    sizes: list[StudyRun] = []
    record: dict[str, Any] = {
        "model": options.model, "tasks": list(options.tasks), "sparsities": list(options.sparsities),
        "samples": options.samples, "limit": options.limit, "selection": selection,
        "chosen": {"name": best.name, "label": best.label, "changes": dict(best.changes)},
    }

    def publish(done: str) -> None:  # the tables so far, after every phase (a stopped study keeps them)
        metric = runs[0].config.metric
        perplexity: dict[str, Any] = {}
        for r in runs:
            if r.results.get("perplexity"):
                perplexity.setdefault(r.name, {}).update(r.results["perplexity"])
        record.update({
            "metric": metric, "compensations": list(dict.fromkeys(r.name for r in runs)), **analyse(runs, metric),
            "perplexity": perplexity,
            "calibration_sizes": analyse(sizes, metric)["rows"] if sizes else [],
            "phases_done": done, "seconds": time.perf_counter() - started,
            "measured_seconds": sum(r.measured.get("seconds", 0) for r in every),
            "ledger": {"runs": len(every), "reused": sum(r.reused for r in every),
                       "versions": sorted({r.measured.get("commit") or r.measured.get("code", "?") for r in every})},
        })
        write_study(record, Path(options.out))

    # (name, label, methods, configuration changes): the chosen refit first, then its control;
    # one run per sparsity (what the ledger keeps when a study stops half-way)
    phases = [(best.name, best.label, STUDY_METHODS, best.changes)]
    if best.changes.get("reconstruct"):  # the same-schedule baselines refitted on each task's corpus too
        phases.append((CONTROL, f"{best.label}, baselines refitted per task (control)", CONTROL_METHODS,
                       {**best.changes, "refit_corpus": "per-task"}))
    phases += [(c.name, c.label, STUDY_METHODS, c.changes) for c in (NO_COMPENSATION, BIAS_COMPENSATION)]
    for name, label, methods, changes in phases:
        for sparsity in options.sparsities:
            config = options.config(methods=list(methods), sparsities=[sparsity],
                                    perplexity=options.perplexity and name != CONTROL, **changes)
            runs.append(run(name, config, kl=True))
            publish(f"rows: {', '.join(dict.fromkeys(r.name for r in runs))} (last: {sparsity:g})")
        say(f"rows with {label}: done")
    for samples in options.calibration_sizes:
        for compensation in (NO_COMPENSATION, best):
            name = f"samples-{samples}-{compensation.name}"
            measured = expert_rows(name, [r for r in runs if r.name == compensation.name],
                                   options.calibration_size_sparsities) if samples == options.samples else None
            if measured is not None:  # the same masks and items as the rows: the same numbers
                say(f"{name}: the SEAP-expert rows of {compensation.name}")
                sizes.append(measured)
                continue
            config = options.config(methods=["seap-expert"], sparsities=list(options.calibration_size_sparsities),
                                    samples=samples, **compensation.changes)
            sizes.append(run(name, config))
        say(f"calibration size {samples}: done")
    publish("all")
    return record


def expert_rows(name: str, runs: Sequence[StudyRun], sparsities: Sequence[float]) -> StudyRun | None:
    """The dense and SEAP-expert rows at ``sparsities`` out of finished runs (one compensation, one
    run per sparsity), as one run named ``name``; None unless every sparsity is among them (pure)."""
    by_sparsity = {s: r for r in runs for s in r.config.sparsities}
    if not runs or any(s not in by_sparsity for s in sparsities):
        return None
    keys = [DENSE, *(row_key("seap-expert", s) for s in sparsities)]
    source = {key: runs[0] if key == DENSE else by_sparsity[s] for key, s in zip(keys, [None, *sparsities])}
    if any(key not in r.items for key, r in source.items()):
        return None
    first = runs[0]
    return StudyRun(name, replace(first.config, methods=["seap-expert"], sparsities=list(sparsities)),
                    {**first.results, "rows": [r.rows[key] for key, r in source.items()]},
                    {key: r.items[key] for key, r in source.items()}, measured=dict(first.measured), reused=True)


def targets(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure reached and whether it is met."""
    rows = {(r["run"], r["row"]): r for r in record["rows"]}
    dense = next((r for r in record["rows"] if r["row"] == DENSE), None)
    out = []
    for comp in (c for c in record["compensations"] if c != CONTROL):  # the control repeats the expert rows
        def get(method: str, sparsity: float) -> Mapping[str, Any] | None:
            return rows.get((comp, row_key(method, sparsity)))

        expert50, expert20 = get("seap-expert", 0.5), get("seap-expert", 0.2)
        if expert50 and expert50.get("starter") is not None:
            out.append({"compensation": comp, "target": "SEAP experts at 50%: starter average >= 65",
                        "value": expert50["starter"] * 100, "met": expert50["starter"] >= 0.65})
        if expert20 and dense:
            gap = (dense["starter"] - expert20["starter"]) * 100
            out.append({"compensation": comp, "target": "SEAP experts at 20%: within 2 points of dense (starter)",
                        "value": -gap, "met": gap <= 2})
            if "piqa" in expert20["tasks"]:
                gap = (dense["tasks"]["piqa"]["accuracy"] - expert20["tasks"]["piqa"]["accuracy"]) * 100
                out.append({"compensation": comp, "target": "SEAP experts at 20%: within 2 points of dense (PIQA)",
                            "value": -gap, "met": gap <= 2})
        ppl = (record.get("perplexity") or {}).get(comp) or {}
        general50 = ppl.get(row_key("seap-general", 0.5))
        if general50 and ppl.get(DENSE):
            ratio = general50["perplexity"] / ppl[DENSE]["perplexity"]
            out.append({"compensation": comp, "target": "general mask at 50%: WikiText-2 perplexity <= 3x dense",
                        "value": ratio, "met": ratio <= 3})
        for sparsity in record["sparsities"]:
            for baseline in SAME_SCHEDULE:
                found = [p for p in record["paired"] if p["run"] == comp and p["sparsity"] == sparsity
                         and p["baseline"] == baseline]
                if found:
                    p = found[0]
                    out.append({"compensation": comp, "target": f"expert ahead of {baseline} at {sparsity:g} "
                                                                "(paired 95% interval above zero)",
                                "value": p["difference"] * 100, "low": p["low"] * 100, "high": p["high"] * 100,
                                "met": p["verdict"] == "ahead"})
    return out


def write_study(record: dict[str, Any], out: Path) -> None:
    """``study.json``, ``study.md`` and ``study-retention.png`` under ``out/results``."""
    folder = out / "results"
    record = {**record, "targets": targets(record)}
    atomic_write_json(folder / "study.json", record)
    atomic_write_text(folder / "study.md", study_markdown(record))
    plot_retention(record, folder / "study-retention.png")


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}"


def _row_order(row: str) -> tuple[float, int, str]:
    """Dense first, then by sparsity and STUDY_METHODS' order (the order of a table does not depend
    on which runs a ledger held)."""
    if row == DENSE:
        return (-1.0, -1, "")
    method, _, sparsity = row.rpartition("@")
    rank = STUDY_METHODS.index(method) if method in STUDY_METHODS else len(STUDY_METHODS)
    return (float(sparsity or 0), rank, row)


def study_markdown(record: Mapping[str, Any]) -> str:
    """The study's tables in Markdown."""
    lines = [f"Model `{record['model']}`; tasks {', '.join(record['tasks'])}; "
             f"{record['samples']} calibration records per task; items per task: "
             f"{'all' if record['limit'] is None else record['limit']}; metric `{record['metric']}`; "
             f"run time {record.get('measured_seconds', record['seconds']) / 60:.0f} min of measuring "
             f"(this pass {record['seconds'] / 60:.0f} min); phases done: {record.get('phases_done', 'all')}.", ""]
    ledger = record.get("ledger")
    if ledger:
        lines[0] += (f" Runs: {ledger['runs']}, {ledger['reused']} of them read from the ledger; measured with "
                     f"{', '.join(ledger['versions'])}.")
    head = record["headline_tasks"]
    lines.append(f"Headline average over: {', '.join(head)}.")
    if record["excluded_tasks"]:
        lines.append("Left out of the headline (dense within 5 points of chance): " + ", ".join(
            f"{t} (dense {v['dense'] * 100:.1f}, chance {v['chance'] * 100:.1f})"
            for t, v in record["excluded_tasks"].items()) + ".")
    sel = record["selection"]
    lines += ["", "### Settings chosen on held-out train items", "",
              f"Each task's train split cut in two (seed); masks calibrated on one part, scored on the other "
              f"({sel['items_per_task']} items per task at most); mean over "
              f"{', '.join(SELECTION_METHODS)} at the selection sparsities.", "",
              "| setting | mean accuracy | " + " | ".join(columns := sorted(
                  next(iter(sel["scores"].values()))["rows"], key=_row_order)) + " |",
              "|---|---:|" + "---:|" * len(columns)]
    for name, s in sorted(sel["scores"].items(), key=lambda kv: -kv[1]["mean"]):  # best first
        mark = " **(chosen)**" if name == sel["chosen"] else ""
        lines.append(f"| {s['label']}{mark} | {_pct(s['mean'], 2)} | " +
                     " | ".join(_pct(s["rows"].get(c)) for c in columns) + " |")
    if sel.get("control"):
        lines += ["", "Control on the same items: SEAP expert minus each same-schedule baseline, the baselines "
                  "refitted on the pooled corpora (chosen setting) or on each task's own corpus (per-task):", "",
                  "| baselines refitted | sparsity | baseline | expert | baseline | difference [95% CI] | McNemar p | verdict |",
                  "|---|---:|---|---:|---:|---|---:|---|"]
        for c in sel["control"]:
            lines.append(f"| {c['baselines_refit']} | {c['sparsity']:g} | {c['baseline']} | {_pct(c['expert'])} | "
                         f"{_pct(c['baseline_accuracy'])} | {c['difference'] * 100:+.1f} [{c['low'] * 100:+.1f}, "
                         f"{c['high'] * 100:+.1f}] | {c['p_mcnemar']:.3g} | {c['verdict']} |")
    tasks = list(next(iter(record["rows"]))["tasks"]) if record["rows"] else []
    for comp in record["compensations"]:
        lines += ["", f"### Rows with compensation: {comp}", "",
                  "| row | headline [95% CI] | " + " | ".join(tasks) + " | margin kept | KL | realised |",
                  "|---|---|" + "---:|" * len(tasks) + "---:|---:|---:|"]
        for r in record["rows"]:
            if r["run"] != comp and r["row"] != DENSE:
                continue
            if r["row"] == DENSE and comp != record["compensations"][0]:
                continue
            lo, hi = r["headline_ci95"]
            kl = (r.get("kl") or {}).get("mean")
            cells = [_pct(r["tasks"][t]["accuracy"]) if t in r["tasks"] else "-" for t in tasks]
            lines.append(f"| {r['row']} | {_pct(r['headline'])} [{_pct(lo)}, {_pct(hi)}] | {' | '.join(cells)} | "
                         f"{_pct(r['retention'].get('margin_retention'))} | {'-' if kl is None else f'{kl:.3f}'} | "
                         f"{_pct(r.get('realised'))} |")
    lines += ["", "### SEAP expert minus each baseline, same items (paired bootstrap 95% CI, McNemar p)", "",
              "| compensation | sparsity | baseline | difference [95% CI] | McNemar p | verdict |",
              "|---|---:|---|---|---:|---|"]
    for p in record["paired"]:
        lines.append(f"| {p['run']} | {p['sparsity']:g} | {p['baseline']} | {p['difference'] * 100:+.1f} "
                     f"[{p['low'] * 100:+.1f}, {p['high'] * 100:+.1f}] | {p['p_mcnemar']:.3g} | {p['verdict']} |")
    ppl = record.get("perplexity") or {}
    if any(ppl.values()):
        lines += ["", "### WikiText-2 perplexity (dense and each general mask)", "", "| compensation | row | perplexity |",
                  "|---|---|---:|"]
        order = list(record.get("compensations", []))
        for comp in sorted(ppl, key=lambda c: order.index(c) if c in order else len(order)):
            for row, e in sorted((ppl[comp] or {}).items(), key=lambda kv: _row_order(kv[0])):
                lines.append(f"| {comp} | {row} | {e['perplexity']:.1f} |")
    if record.get("calibration_sizes"):
        lines += ["", "### Calibration size (SEAP expert)", "", "| run | row | headline [95% CI] |", "|---|---|---|"]
        for r in record["calibration_sizes"]:
            if r["row"] == DENSE:
                continue
            lo, hi = r["headline_ci95"]
            lines.append(f"| {r['run']} | {r['row']} | {_pct(r['headline'])} [{_pct(lo)}, {_pct(hi)}] |")
    lines += ["", "### Targets", "", "| compensation | target | reached | met |", "|---|---|---:|---|"]
    for t in record.get("targets", []):
        value = f"{t['value']:.2f}" + (f" [{t['low']:+.1f}, {t['high']:+.1f}]" if "low" in t else "")
        lines.append(f"| {t['compensation']} | {t['target']} | {value} | {'met' if t['met'] else '**missed**'} |")
    return "\n".join(lines) + "\n"


def plot_retention(record: Mapping[str, Any], path: Path) -> None:
    """Margin retention of the headline average against sparsity, per method and compensation,
    with the 95% band of the headline accuracy mapped through the same retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = record["compensations"]
    dense = next((r for r in record["rows"] if r["row"] == DENSE), None)
    if dense is None:
        return
    chosen = record.get("chosen", {})
    titles = {NO_COMPENSATION.name: "no compensation", BIAS_COMPENSATION.name: BIAS_COMPENSATION.label,
              CONTROL: "chosen refit, baselines refitted per task (control)"}
    if chosen.get("name"):
        titles[chosen["name"]] = f"{chosen.get('label', chosen['name'])} (chosen)"
    chance = _mean([dense["tasks"][t]["chance"] or 0 for t in record["headline_tasks"]]) or 0
    span = max(dense["headline"] - chance, 1e-9)
    columns = min(len(comps), 2)
    grid_rows = -(-len(comps) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6.5 * columns, 4.2 * grid_rows), sharey=True, squeeze=False)
    for ax, comp in zip(axes.flat, comps):
        for colour, method in enumerate(STUDY_METHODS):  # one colour per method in every panel
            pts = sorted((r["sparsity"], r) for r in record["rows"] if r["run"] == comp and r["method"] == method)
            if not pts:
                continue
            xs = [0.0] + [s for s, _ in pts]
            ys = [1.0] + [(r["headline"] - chance) / span for _, r in pts]
            lo = [1.0] + [(r["headline_ci95"][0] - chance) / span for _, r in pts]
            hi = [1.0] + [(r["headline_ci95"][1] - chance) / span for _, r in pts]
            routed = method == "seap-routed"  # equals the expert wherever the router is right: drawn over it, dashed
            ax.plot(xs, ys, marker="" if routed else "o", ls="--" if routed else "-", lw=1 if routed else 1.5,
                    color=f"C{colour}", label=method)
            if not routed:
                ax.fill_between(xs, lo, hi, alpha=0.12, color=f"C{colour}")
        ax.set_title(titles.get(comp, comp), fontsize=10)
        ax.set_xlabel("sparsity")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(comps):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("margin over chance kept (dense = 1)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
