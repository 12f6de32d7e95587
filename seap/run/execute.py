"""Running a plan: content-addressed, cached job outputs under a work folder.

A job's output lives in ``<workdir>/<stage>/<key>/``, where the key hashes the stage, the
job's parameters (a data folder by its content), the content of every input and the source
of the modules the stage runs (:data:`seap.run.plan.STAGES`). Equal keys mean equal
outputs, so a finished output is reused by any later run, in any process, and a run
killed half-way resumes from the jobs it finished. Outputs are built in a temporary
sibling and renamed into place; a concurrent run with the same inputs agrees on one result.
Stages that must always run (``model``: its digest is what later keys depend on;
``register``: idempotent) store their output under the digest of what they wrote.

:func:`execute` walks a whole plan in one process (``seap eval``); the Prefect flow calls
:func:`run_cached` once per job inside a task, with the same keys and folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.contenthash import stage_key, tree_digest
from seap.io import build_once, remove_stale_temporaries
from seap.run.cache_entries import RunLog, check_entry, check_space, discard_entry, enforce_cap, human, parse_size, write_record
from seap.run.config import RunConfig
from seap.run.job_params import params_to_dict
from seap.run.plan import STAGES, Job, Plan, map_inputs
from seap.run.stages import StageContext, run_job

log = logging.getLogger(__name__)
Ref = dict[str, str]  # {"path": ..., "digest": ...}: where an output is and the hash of its content


def ref(path: str | Path) -> Ref:
    """The reference of an existing output folder (or file)."""
    return {"path": str(path), "digest": tree_digest(path)}


def resolve_inputs(job: Job, refs: Mapping[str, Ref]) -> dict[str, Any]:
    """``job.inputs`` with every job key replaced by that job's output reference."""

    return {role: map_inputs(value, refs.__getitem__) for role, value in job.inputs.items()}


def content_key(job: Job, inputs: Mapping[str, Any], workdir: str | Path) -> str:
    """The cache key of ``job`` with resolved ``inputs`` (references): stage, parameters (a data
    folder by content), input contents, stage code, and the work folder (each work folder has
    its own cache, so a hit never points into another one)."""
    params = params_to_dict(job.params) if job.params is not None else {}
    for name in ("data_dir", "records"):  # data by its content (a records file; "builtin" is code)
        if params.get(name) and Path(params[name]).exists():
            params[name] = {"path": str(params[name]), "digest": tree_digest(params[name])}
    material = {"job": job.key, "params": params, "inputs": {role: map_inputs(v, lambda ref: ref["digest"]) for role, v in inputs.items()},
                "workdir": str(Path(workdir).resolve())}
    return stage_key(job.stage, material, modules=STAGES[job.stage].modules)


def run_cached(job: Job, inputs: Mapping[str, Any], workdir: str | Path, ctx: StageContext) -> tuple[Ref, bool]:
    """The output of ``job``: reused when its key's folder exists and its content is what was
    written (:func:`seap.run.cache_entries.check_entry`; a corrupt entry is rebuilt), built
    otherwise. Returns the reference and whether it was reused (``True``: cached)."""
    stage_dir = Path(workdir) / job.stage
    paths = {role: map_inputs(value, lambda ref: Path(ref["path"])) for role, value in inputs.items()}
    if not STAGES[job.stage].cached:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=stage_dir, prefix=".unkeyed-") as tmp:
            out = Path(tmp) / "out"
            run_job(job, paths, out, ctx)
            final = stage_dir / f"{job.stage}-{tree_digest(out)[:24]}"
            if not final.exists():
                try:
                    os.rename(out, final)
                except OSError:
                    if not final.exists():
                        raise
        done = ref(final)
        if not check_entry(final, done["digest"], job.key):  # (named by its digest: a changed one is stale)
            write_record(final, done["digest"], job.key)
        return done, False
    out = stage_dir / content_key(job, inputs, workdir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with _partial_folder(stage_dir, out.name) as work:  # (a killed job's finished part, resumed by the same job)
        return _run_keyed(job, paths, out, work, ctx)


@contextlib.contextmanager
def _partial_folder(stage_dir: Path, name: str) -> Iterator[Path]:
    """Where a job keeps its finished part while it runs: ``.<key>.partial``, shared with a later
    run of the same job (a killed one resumes there), held under an exclusive lock; a concurrent
    run of the same job meanwhile works in a folder of its own, removed when it is done."""
    import fcntl

    with open(stage_dir / f".{name}.partial.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process runs this job now: never touch its folder
            private = stage_dir / f".{name}.partial-{os.getpid()}"
            try:
                yield private
            finally:
                shutil.rmtree(private, ignore_errors=True)
            return
        try:
            yield stage_dir / f".{name}.partial"
        finally:
            if (stage_dir / name).exists() or not (stage_dir / f".{name}.partial").exists():
                Path(lock.name).unlink(missing_ok=True)  # (done, or nothing to resume: no lock needed any more)
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _run_keyed(job: Job, paths: Mapping[str, Any], out: Path, work: Path, ctx: StageContext) -> tuple[Ref, bool]:
    if out.exists():
        remove_stale_temporaries(out)  # a run killed right after finishing it leaves its temporary behind
        shutil.rmtree(work, ignore_errors=True)
        found = ref(out)
        if check_entry(out, found["digest"], job.key):
            return found, True
        ctx.say(f"{job.key}: the cached output {out} is corrupt (its content changed after it was written); "
                "rebuilding it")
        discard_entry(out)
    build_once(out, lambda o: run_job(job, paths, o, dataclasses.replace(ctx, work=work)))
    shutil.rmtree(work, ignore_errors=True)
    built = ref(out)
    write_record(out, built["digest"], job.key)
    return built, False


@dataclass
class JobEvent:
    """What a progress view is told about each job."""

    job: Job
    index: int  # 1-based position in the plan
    total: int
    state: str  # "running", "done", "cached"
    seconds: float = 0.0
    output: str | None = None  # the output folder, once done or cached


@dataclass
class Execution:
    """The outputs of a plan run: job key -> reference, and which jobs were cached."""

    plan: Plan
    outputs: dict[str, Ref] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    seconds: dict[str, float] = field(default_factory=dict)

    def path(self, key: str) -> Path:
        return Path(self.outputs[key]["path"])


def execute(plan: Plan, ctx: StageContext | None = None,
            on_event: Callable[[JobEvent], None] | None = None) -> Execution:
    """Run every job of ``plan`` in order in this process, reusing finished outputs."""
    c = plan.config
    workdir = Path(c.outputs.workdir)
    ctx = ctx or StageContext(workdir / "task-files")
    done = Execution(plan)
    total = len(plan.jobs)
    check_space(plan.jobs, workdir, c.model.model, c.model.dtype, ctx.say)  # (before any work)
    run_log = RunLog(workdir)
    cap = parse_size(c.outputs.cache_max_size) if c.outputs.cache_max_size else None
    warned = False
    for index, job in enumerate(plan.jobs, 1):
        if on_event:
            on_event(JobEvent(job, index, total, "running"))
        start = time.perf_counter()
        out, cached = run_cached(job, resolve_inputs(job, done.outputs), workdir, ctx)
        done.outputs[job.key] = out
        run_log.used(out["path"])
        after_job(job, out, c)
        done.seconds[job.key] = time.perf_counter() - start
        if cached:
            done.cached.add(job.key)
        if on_event:
            on_event(JobEvent(job, index, total, "cached" if cached else "done", done.seconds[job.key], out["path"]))
        if cap is not None and evict(plan, done.outputs, index, workdir, cap) > cap and not warned:
            ctx.say(f"warning: the outputs this run still reads take more than the cache cap of {human(cap)}; "
                    "the work folder stays above it until they are no longer needed")
            warned = True
    return done


def evict(plan: Plan, outputs: Mapping[str, Ref], finished: int, workdir: str | Path, cap: int) -> int:
    """Keep the work folder under ``cap`` once the first ``finished`` jobs of ``plan`` are done:
    least recently used outputs go, except those a later job reads, the plan's results (outputs
    no job reads: what its caller reads) and the model's (every later key depends on it).
    Returns the bytes it holds afterwards."""
    read = {key for job in plan.jobs for key in job.input_keys()}
    needed = {key for job in plan.jobs[finished:] for key in job.input_keys()} | {"model"}
    needed |= {job.key for job in plan.jobs if job.key not in read}
    keep = {os.path.relpath(outputs[k]["path"], workdir) for k in needed if k in outputs}
    held, evicted = enforce_cap(workdir, cap, keep)
    if evicted:
        log.debug("evicted %d outputs (%s) to stay under %s", len(evicted), human(sum(e.bytes for e in evicted)),
                  human(cap))
    return held




def after_job(job: Job, out: Ref, config: RunConfig) -> None:
    """What every executor does once a job is finished: the report is published to the run's
    ``out`` at once, so the results are there even if registration fails afterwards."""
    if job.stage == "report" and config.outputs.out:
        publish_results(out["path"], config.outputs.out)


def publish_results(report_dir: str | Path, out: str | Path) -> dict[str, Path]:
    """Copy the report's files (results.json, results.md, the plot, metrics.json, accuracy.csv)
    into ``out``: all of them are written first, then renamed in, so ``out`` never mixes runs."""
    import shutil

    from seap.evaluation.report import OPTIONAL_RESULT_FILES, RESULT_FILES

    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    names = [*RESULT_FILES, *(n for n in OPTIONAL_RESULT_FILES if (Path(report_dir) / n).is_file())]
    with tempfile.TemporaryDirectory(prefix=".results-", dir=target) as tmp:
        for name in names:
            shutil.copy2(Path(report_dir) / name, Path(tmp) / name)
        for name in names:
            os.replace(Path(tmp) / name, target / name)
            paths[name] = target / name
    return paths


__all__ = ["Execution", "JobEvent", "Ref", "after_job", "content_key", "evict", "execute", "publish_results", "ref",
           "resolve_inputs",
           "run_cached"]
