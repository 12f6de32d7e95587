"""The DVC front door: ``params.yaml`` in, one ``dvc.yaml`` stage per entry of the stage table.

``seap stage NAME`` reads and validates the whole ``params.yaml`` (:func:`seap.run.config.load_params`)
before any model is loaded, makes the same plan as every other front door
(:func:`seap.run.plan.make_plan`) and runs that plan's jobs of stage ``NAME`` with the same
stage functions (:mod:`seap.run.stages`). Outputs have fixed paths, as DVC wants:
``work/<stage>/<job name>/`` (the report: ``results/``); a stage writes its whole folder
atomically, so an interrupted stage leaves nothing half-written. A stage with no jobs under
the parameters (router without ``seap-routed``, bench or perplexity turned off) writes an
explicit ``disabled.json``, so the DAG is the same whatever the parameters.

``dvc.yaml`` itself is generated from the stage table (:func:`dvc_yaml`; a test checks the
committed file), so its dependencies are the same module list the Prefect cache keys use:
``python -m seap.run.dvc > dvc.yaml`` rewrites it.
"""

from __future__ import annotations

import dataclasses
import shutil
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.evaluation.report import RESULT_FILES
from seap.io import atomic_directory, atomic_write_json
from seap.run.config import RunConfig, load_params, options
from seap.run.plan import PIPELINE_STAGES, STAGES, Job, Plan, make_plan, map_inputs, recorded_config

PARAMS_FILE = Path("params.yaml")
WORK = Path("work")
RESULTS = Path("results")
DISABLED = "disabled.json"
PARTIAL = ".partial"  # work/.partial/<stage>/<job>: a killed job's finished layers (not a DVC output)
UNNAMED = "output"  # the folder of a stage's single unnamed job (work/router/output)


def project_config(params_file: str | Path = PARAMS_FILE, root: str | Path = ".") -> RunConfig:
    """The run configuration of a DVC project: ``params.yaml`` plus the fixed DVC locations
    (paths in it are relative to ``root``, where ``dvc.yaml`` is)."""
    root = Path(root)
    config = load_params(params_file)
    data_dir = str((root / config.data.data_dir).resolve()) if config.data.data_dir else None
    return config.replace(workdir=str(root / WORK), out=str(root / RESULTS), data_dir=data_dir,
                          registry_dir=str(root / (config.register.registry_dir or "registry")),
                          mlflow_dir=str(root / (config.register.mlflow_dir or "runs/mlflow")))


def job_path(job_or_key: Job | str, root: Path) -> Path:
    """Where DVC keeps a job's output: ``work/<stage>/<name>`` (the report: ``results``)."""
    stage, _, name = (job_or_key.key if isinstance(job_or_key, Job) else job_or_key).partition("/")
    if stage == "report":
        return root / RESULTS
    return root / WORK / stage / (name or UNNAMED)


def _resolve(job: Job, root: Path, building: Path, stage: str) -> dict[str, Any]:
    def one(key: str) -> Path:
        key_stage, _, name = key.partition("/")
        if key_stage == stage:  # built earlier in this stage run
            return building / (name or UNNAMED)
        path = job_path(key, root)
        if not path.exists():
            raise SeapError(f"input {path} is missing", "run the upstream stages first: `dvc repro`")
        return path

    return {role: map_inputs(value, one) for role, value in job.inputs.items()}


def run_stage(name: str, params_file: str | Path = PARAMS_FILE, root: str | Path = ".", progress: bool = False) -> None:
    """Run the jobs of stage ``name`` of the plan of ``params_file`` (validated first)."""
    from seap.run.stages import StageContext, run_job, verify_model_record

    if name not in PIPELINE_STAGES:
        raise SeapError(f"unknown stage {name!r}", f"stages: {', '.join(PIPELINE_STAGES)}")
    root = Path(root)
    config = project_config(params_file, root)
    plan = make_plan(config)
    jobs = plan.of_stage(name)
    if jobs and any(o in STAGES[name].options for o in ("tasks", "data_dir")):
        try:
            config.check_tasks(root / WORK / "task-files")
        except SeapError as exc:
            raise SeapError(f"{params_file}: {exc.problem}", exc.fix) from None
    ctx = StageContext(root / WORK / "task-files", progress=progress, say=_say)
    if jobs:  # (the disk's floor, and the stage's share of the estimate, before it starts)
        from seap.run.cache_entries import check_space

        check_space(jobs, root / WORK, config.model.model, config.model.dtype, _say)
    if jobs and "model" in STAGES[name].upstream:
        verify_model_record(job_path("model", root))
    if name == "register":
        jobs = [_with_run_params(j, config) for j in jobs]
    if name == "report":
        _run_report(jobs[0], root, ctx)
        return
    target = root / WORK / name
    with atomic_directory(target, overwrite=True, replace_foreign=True) as tmp:
        if not jobs:
            atomic_write_json(tmp / DISABLED, {"enabled": False, "reason": f"no {name} jobs under these parameters"})
            _say(f"{name}: disabled under these parameters -> {target / DISABLED}")
        for job in jobs:  # (each job's resumable progress beside the stage's outputs, kept until it is done)
            work = root / WORK / PARTIAL / name / (job.name or UNNAMED)
            run_job(job, _resolve(job, root, tmp, name), tmp / (job.name or UNNAMED), dataclasses.replace(ctx, work=work))
            shutil.rmtree(work, ignore_errors=True)


def _run_report(job: Job, root: Path, ctx: Any) -> None:
    from seap.run.stages import run_job

    out = root / RESULTS
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".results-", dir=out) as tmp:  # all files first, then renamed in
        run_job(job, _resolve(job, root, Path(tmp), "report"), Path(tmp) / "report", ctx)
        for name in RESULT_FILES:
            os.replace(Path(tmp) / "report" / name, out / name)
    _say((out / "results.md").read_text(encoding="utf-8"))


def _with_run_params(job: Job, config: RunConfig) -> Job:
    return dataclasses.replace(job, params=dataclasses.replace(job.params, run_params=recorded_config(config)))


def _say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------
# dvc.yaml, generated from the stage table


def module_path(module: str) -> str:
    """``seap.maths.masks`` -> ``seap/maths/masks.py`` (a package: its folder)."""
    rel = Path(*module.split("."))
    root = Path(__file__).resolve().parents[2]
    return f"{rel}" if (root / rel).is_dir() else f"{rel}.py"


def _outs(stage: str) -> list[Any]:
    if stage == "report":
        return [f"{RESULTS}/results.json", f"{RESULTS}/results.md", f"{RESULTS}/accuracy_vs_sparsity.png"]
    if stage == "register":
        return [f"{WORK}/register", {"${register.dir}": {"persist": True}}]
    return [f"{WORK}/{stage}"]


def dvc_yaml() -> str:
    """The text of ``dvc.yaml``: one stage per :data:`STAGES` entry, its dependencies (upstream
    outputs, the data folder, the source of its modules) and the ``params.yaml`` keys it reads."""
    import yaml

    opts = options()
    stages: dict[str, Any] = {}
    for stage in (STAGES[name] for name in PIPELINE_STAGES):
        deps: list[str] = []
        for up in stage.upstream:
            deps.extend(["results/results.json"] if up == "report" else [f"{WORK}/{up}"])
        if "data_dir" in stage.options or "tasks" in stage.options:
            deps.append("${data.dir}")
        deps.extend(module_path(m) for m in stage.modules)
        if stage.name == "register":
            deps.extend(["mlflow/seap_registry.py", "mlflow/seap_model.py"])
        params = [f"{opts[o].section}.{opts[o].key}" for o in stage.options if opts[o].section]
        entry: dict[str, Any] = {"cmd": f"seap stage {stage.name}", "deps": deps, "params": params,
                                 "outs": _outs(stage.name)}
        if stage.name == "report":
            params.extend(f"{opts[o].section}.{opts[o].key}" for o in opts
                          if opts[o].section and f"{opts[o].section}.{opts[o].key}" not in params)
            entry["metrics"] = [{f"{RESULTS}/metrics.json": {"cache": False}}]
            entry["plots"] = [{f"{RESULTS}/accuracy.csv": {
                "cache": False, "template": "scatter", "x": "sparsity", "y": "average", "x_label": "target sparsity (%)",
                "y_label": "average accuracy (%)", "title": "accuracy vs sparsity (all methods)"}}]
        stages[stage.name] = entry
    header = ("# GENERATED from the stage table (seap/run/plan.py STAGES) by `python -m seap.run.dvc > dvc.yaml`;\n"
              "# do not edit by hand (tests/run/test_dvc_yaml.py checks it). Every stage runs `seap stage NAME`,\n"
              "# which reads params.yaml, makes the same plan as `seap eval` and the Prefect flow, and runs that\n"
              "# plan's jobs of the stage. Outputs: work/<stage>/<job>/ and results/ (docs/dvc.md).\n")
    body = yaml.safe_dump({"stages": stages, "plots": [f"{RESULTS}/accuracy_vs_sparsity.png"]}, sort_keys=False,
                          width=120)
    return header + body


def plan_of_project(params_file: str | Path = PARAMS_FILE, root: str | Path = ".") -> Plan:
    """The plan ``dvc repro`` walks for this project."""
    return make_plan(project_config(params_file, root))


def main(argv: list[str] | None = None) -> int:
    """Print the generated ``dvc.yaml``."""
    sys.stdout.write(dvc_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["dvc_yaml", "job_path", "plan_of_project", "project_config", "run_stage"]
