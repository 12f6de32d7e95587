"""The study's driver (steps 1 to 3 of :mod:`seap.run.study`): its options, the refit
candidates the selection tries, the selection on held-out train items, each run (read from the
ledger or executed in the shared work folder) and :func:`run_study`, which walks them all and
writes the report after every phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_json, read_json
from seap.run.config import DEFAULT_TASKS, RunConfig
from seap.run.methods import DENSE, row_key
from seap.run.study.analysis import analyse, measure_kl, perplexity_by_run, row_correctness
from seap.run.study.design import (BIAS_COMPENSATION, CONTROL, CONTROL_METHODS, NO_COMPENSATION, SAME_SCHEDULE,
                                   SELECTION_METHODS, STUDY_METHODS, Compensation)
from seap.run.study.ledger import StudyRun, ledger_material, ledger_path, measurement_stamp, read_entry, write_entry
from seap.run.study.study_tables import write_study

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
        """The folder of the ledger of finished runs."""
        return Path(self.ledger) if self.ledger else Path(self.out) / "results" / "study-runs"

    def config(self, **changes: Any) -> RunConfig:
        """The run configuration of the study's settings, ``base`` and then ``changes`` applied."""
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
    names as the selection run spells them (:func:`seap.data.selection.write_selection_data`)."""
    from seap.data.catalogue import TaskCatalogue
    from seap.data.selection import write_selection_data

    specs = TaskCatalogue(config.data.data_dir, Path(config.outputs.workdir) / "task-files").resolve(config.data.tasks)
    return write_selection_data(specs, folder, items, seed, generic, config.data.data_dir)


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


# -- 2./3. the reported rows, each read from the ledger or measured ---------------------


JOB_EVENTS: list[Callable[[Any], None]] = []  # where finished jobs are announced (the CLI's one-line view)


def execute_config(config: RunConfig, progress: bool) -> tuple[dict[str, str], Path]:
    """Run one configuration's plan up to its report in the study's work folder (finished jobs
    are reused; nothing is registered)."""
    from seap.run.execute import execute
    from seap.run.plan import make_plan
    from seap.run.stages import StageContext

    config.validate()
    plan = make_plan(config).upstream_of(["report"])  # a study registers nothing (its masks are not deployed)
    ctx = StageContext(Path(config.outputs.workdir) / "task-files", progress=progress, say=lambda _: None)
    done = execute(plan, ctx, on_event=lambda e: [f(e) for f in JOB_EVENTS])
    outputs = {key: str(done.path(key)) for key in done.outputs}
    return outputs, done.path("report")


def study_run(options: StudyOptions, name: str, config: RunConfig, say: Callable[[str], None], progress: bool = False,
              kl: bool = False) -> StudyRun:
    """Run ``config`` (or read it from the ledger, when an entry with the same name and the same
    :func:`~seap.run.study.ledger.ledger_material` is there and ``options.fresh`` is off); a run
    measured now is written to the ledger at once."""
    started = time.perf_counter()
    material = ledger_material(config, options.kl_texts if kl else 0)
    path = ledger_path(options.ledger_dir, name, material)
    found = None if options.fresh else read_entry(path, name, config, material)
    if found is not None:
        say(f"{name}: from the ledger (measured {found.measured.get('date', '?')}, "
            f"{found.measured.get('commit', 'code ' + found.measured.get('code', '?'))})")
        return found
    from seap.run.plan import make_plan

    outputs, report = execute_config(config, progress)
    plan_rows = {j.row: j.key for j in make_plan(config).jobs if j.row}
    items = row_correctness(outputs, plan_rows, config.evaluate.metric)
    results = read_json(report / "results.json", "results file")
    kl_values = measure_kl(config, outputs, options.kl_texts, lambda text: say(f"{name}: {text}")) if kl else {}
    done = StudyRun(name, config, results, items, kl_values, measurement_stamp(started))
    write_entry(path, done, material)
    return done


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
        metric = runs[0].config.evaluate.metric
        record.update({
            "metric": metric, "compensations": list(dict.fromkeys(r.name for r in runs)), **analyse(runs, metric),
            "perplexity": perplexity_by_run(runs),
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
    by_sparsity = {s: r for r in runs for s in r.config.masks.sparsities}
    if not runs or any(s not in by_sparsity for s in sparsities):
        return None
    keys = [DENSE, *(row_key("seap-expert", s) for s in sparsities)]
    source = {key: runs[0] if key == DENSE else by_sparsity[s] for key, s in zip(keys, [None, *sparsities])}
    if any(key not in r.items for key, r in source.items()):
        return None
    first = runs[0]
    return StudyRun(name, first.config.replace(methods=["seap-expert"], sparsities=list(sparsities)),
                    {**first.results, "rows": [r.rows[key] for key, r in source.items()]},
                    {key: r.items[key] for key, r in source.items()}, measured=dict(first.measured), reused=True)


__all__ = ["DEFAULT_GENERIC", "DEFAULT_REFIT_ALPHAS", "JOB_EVENTS", "StudyOptions", "execute_config", "expert_rows",
           "refit_candidates", "run_study", "select_refit", "selection_control", "selection_data", "study_run"]
