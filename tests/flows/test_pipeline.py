"""The pipeline flows on the real Prefect engine: one temporary server for the session,
results and work folders in tmp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_flows import dask_cluster, pipeline_kwargs, planned_tasks, stage_of, task_states

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.services  # the session's Prefect server (its test harness)


@pytest.fixture(scope="module")
def first_run(llama_pipeline):
    """One complete pipeline run (router, bench and registration included), shared by tests (and
    by tests/run/test_dvc.py's comparison of the front doors)."""
    return llama_pipeline


@pytest.mark.slow
def test_pipeline_completes_with_table_router_speed_and_registry(first_run) -> None:
    from seap.registry.records import read_local_registry

    tmp, kwargs, state = first_run
    assert state.is_completed()
    table = (tmp / "out" / "results.md").read_text()
    for method in ("dense", "seap-expert", "seap-general", "seap-routed", "wanda-sp", "flap"):
        assert f"| {method} |" in table
    assert "## Router" in table and "## Speed" in table
    from prefect.artifacts import Artifact

    published = Artifact.get("seap-results")
    assert published is not None and "| seap-expert |" in published.data and "data:image/png;base64," in published.data
    assert Artifact.get("seap-metrics") is not None
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert {"dense", "seap-expert@0.2", "seap-general@0.2", "seap-routed@0.2"} <= set(metrics)
    assert metrics["seap-general@0.2"]["prefill_speedup"] > 0
    records = read_local_registry(tmp / "registry")
    kinds = sorted((r.kind, r.task) for r in records)
    assert kinds == [("expert", "geo"), ("expert", "life"), ("general", "general"), ("routed", "routed")]
    for record in records:
        assert record.base_fingerprint and record.tags["sparsity"] == "0.2"
        assert "accuracy" in record.metrics and "prefill_speedup" in record.metrics
        for mask in record.masks.values():
            assert Path(mask).is_dir()
    routed = next(r for r in records if r.kind == "routed")
    assert set(routed.masks) == {"geo", "life", "general"} and Path(routed.router).is_dir()


@pytest.mark.slow
def test_second_run_is_served_from_cache(first_run) -> None:
    from flows.pipeline import seap_pipeline

    tmp, kwargs, _ = first_run
    before = {p.name for p in (tmp / "registry").glob("*/*")}
    states = task_states(seap_pipeline(return_state=True, **kwargs), planned_tasks(kwargs))
    cached = {n: s for n, s in states.items() if stage_of(n) not in ("model", "register", "mlflow-register")}
    assert {stage_of(n) for n in cached} >= {"corpus", "statistics", "scores", "masks", "evaluate-dense", "evaluate",
                                             "router", "evaluate-routed", "bench", "report"}
    assert all(s == "Cached" for s in cached.values()), cached
    assert {p.name for p in (tmp / "registry").glob("*/*")} == before  # registering again adds nothing
    assert states and all(s == "Completed" for n, s in states.items() if stage_of(n) == "register")


@pytest.mark.slow
def test_embedded_mlflow_store_holds_the_run_and_one_version_per_expert(first_run) -> None:
    """No server: the flow tracked its runs in sqlite beside the work folder; the cached second
    run made a second MLflow run but no new version."""
    from mlflow.tracking import MlflowClient

    import mlflow

    tmp, kwargs, state = first_run
    db = tmp / "mlflow" / "mlflow.db"
    assert db.is_file() and (tmp / "mlflow" / "artifacts").is_dir()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    versions = client.search_model_versions("tags.sparsity = '0.2'")
    assert sorted((v.name, int(v.version)) for v in versions) == [
        ("seap-base-general", 1), ("seap-base-geo", 1), ("seap-base-life", 1), ("seap-base-routed", 1)]
    runs = client.search_runs([client.get_experiment_by_name("seap").experiment_id])
    assert len(runs) >= 2 and all(r.info.status == "FINISHED" for r in runs)
    first = state.result()["mlflow"]
    assert first["tracking_uri"] == f"sqlite:///{db}" and all(v["created"] for v in first["versions"])


@pytest.mark.slow
def test_changed_sparsity_reruns_only_masks_and_downstream(first_run) -> None:
    from flows.pipeline import seap_pipeline

    tmp, kwargs, _ = first_run
    changed = {**kwargs, "sparsities": [0.3], "out": str(tmp / "out-0.3"), "registry_dir": str(tmp / "registry-0.3")}
    planned = planned_tasks(changed)
    states = task_states(seap_pipeline(return_state=True, **changed), planned)
    assert len(states) == planned, states  # every job of the plan ran as a task
    by_stage: dict[str, set[str]] = {}
    for name, state in states.items():
        by_stage.setdefault(stage_of(name), set()).add(state)
    reused = ("corpus", "statistics", "scores", "router", "evaluate-dense")  # dense is reused
    rerun = ("masks", "evaluate", "evaluate-routed", "bench")
    assert {stage: by_stage.get(stage) for stage in reused} == {stage: {"Cached"} for stage in reused}, states
    assert {stage: by_stage.get(stage) for stage in rerun} == {stage: {"Completed"} for stage in rerun}, states


def test_invalid_parameters_fail_before_any_work(prefect_env, tmp_path) -> None:
    from flows.pipeline import seap_pipeline
    from seap.errors import SeapError

    kwargs = pipeline_kwargs(tmp_path)
    for override, name in (({"sparsities": [1.5]}, "sparsities"), ({"tasks": ["geo", "nope"]}, "tasks"),
                           ({"schedule": "cosine"}, "schedule"), ({"methods": ["magnitude"]}, "methods"),
                           ({"limit": 0}, "limit"), ({"dask_workers": 2}, "stats_shards")):
        with pytest.raises(SeapError, match=f"parameter {name}"):
            seap_pipeline(**{**kwargs, **override})
    assert not (tmp_path / "work" / "statistics").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluate_and_router_flows(first_run, tmp_path) -> None:
    from flows.evaluate import main as evaluate_main
    from flows.router import router_flow

    tmp, kwargs, state = first_run
    masks = state.result()["masks"]
    # as the docs show it (`python -m flows.evaluate --model ... --masks ...`), with --out
    evaluate_main(["--model", kwargs["model"], "--masks", masks["seap-general@0.2"]["general"],
                   masks["flap@0.2"]["general"], masks["seap-expert@0.2"]["geo"], "--tasks", "geo", "life",
                   "--limit", "4", "--data-dir", kwargs["data_dir"], "--workdir", kwargs["workdir"],
                   "--out", str(tmp_path / "eval")])
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| dense |" in table and "| seap-general |" in table and "| flap |" in table
    assert len(json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]) == 4
    # the same masks give the pipeline's rows: FLAP is evaluated with the bias compensation its mask carries
    evaluated = {(r["method"], r["sparsity"]): r["tasks"] for r in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    pipeline = {(r["method"], r["sparsity"]): r["tasks"] for r in json.loads((tmp / "out" / "results.json").read_text())["rows"]}
    for key in (("dense", 0.0), ("seap-general", 0.2), ("flap", 0.2)):
        assert evaluated[key] == pipeline[key], key
    assert evaluated[("seap-expert", 0.2)]["geo"] == pipeline[("seap-expert", 0.2)]["geo"]
    routed = router_flow(model=kwargs["model"], tasks=["geo", "life"], data_dir=kwargs["data_dir"],
                         workdir=kwargs["workdir"])
    # the two tasks' words are disjoint: the router separates them, on its held-out prompts and on
    # every evaluation question, routed here through the router the flow returns
    assert set(routed["per_task"]) == {"geo", "life"} and routed["heldout_accuracy"] >= 0.9
    from seap.evaluation.router import Router
    from seap.model.loading import load_model

    router, base = Router.load(routed["router"]["path"]), load_model(kwargs["model"], device="cpu")
    for task in ("geo", "life"):
        rows = (Path(kwargs["data_dir"]) / task / "validation.jsonl").read_text().splitlines()
        questions = [json.loads(line)["question"] for line in rows]
        assert [d.task for d in router.route(base, questions, threshold=0.0)] == [task] * len(questions)


def _mask_tensors(path: str) -> list:
    from seap.maths.masks import PruningMask

    mask = PruningMask.load(path)
    return [(m.heads.tolist(), m.kv_heads.tolist(), m.channels.tolist()) for m in mask.layers]


@pytest.mark.slow
def test_sharded_statistics_on_a_local_dask_cluster_give_the_same_masks(first_run, tmp_path, monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import seap_pipeline

    tmp, kwargs, state = first_run
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the Dask worker processes report to the same server
    sharded = seap_pipeline(**{**kwargs, "stats_shards": 2, "dask_workers": 2,
                               "methods": ["seap-expert", "wanda-sp"], "bench": False,  # task and pooled statistics
                               "workdir": str(tmp_path / "work"), "out": str(tmp_path / "out"),
                               "registry_dir": str(tmp_path / "registry")})
    single = state.result()["masks"]
    for group, masks in sharded["masks"].items():
        for name, path in masks.items():
            assert _mask_tensors(path) == _mask_tensors(single[group][name]), (group, name)
    shards = [p for p in (tmp_path / "work" / "statistics").iterdir() if not p.name.startswith(".")]
    assert len(shards) == 2 + 1 + 1  # two shards, their merge, the pooled statistics


@pytest.mark.slow
def test_statistics_on_an_existing_dask_cluster_equal_a_local_run(prefect_env, tmp_path) -> None:
    """``dask_address``: the shards run on a separate ``dask scheduler`` and two ``dask worker``
    processes that see only the installed project (another working folder, no PYTHONPATH), and
    give the same statistics, byte for byte, as the same shards run locally and merged."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import seap_pipeline
    from seap.run.config import RunConfig
    from seap.run.execute import execute
    from seap.run.plan import make_plan

    kwargs = pipeline_kwargs(tmp_path, tasks=["geo"], methods=["seap-expert"], samples=4, limit=1, bench=False,
                             mlflow=False, stats_shards=2)
    plan = make_plan(RunConfig.from_mapping({**kwargs, "workdir": str(tmp_path / "local")}))
    statistics = [j.key for j in plan.of_stage("statistics")]  # two shards and their merge
    local = execute(plan.upstream_of(statistics))  # in this process, no Dask
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the workers report to the same server
    with dask_cluster(tmp_path / "cluster", env) as address:
        seap_pipeline(**kwargs, dask_address=address)
        with Client(address) as client:  # the workers ran the task
            ran = client.run(lambda: "tasks.stages" in __import__("sys").modules)
    assert any(ran.values()), ran
    on_cluster = [p for p in (tmp_path / "work" / "statistics").iterdir() if not p.name.startswith(".")]
    assert sorted(map(_statistics_content, on_cluster)) == sorted(_statistics_content(local.path(k)) for k in statistics)


def _statistics_content(folder: Path) -> str:
    """A statistics output's files, tensors by their bytes, without the collection's timing."""
    from seap.contenthash import sha256_file

    content = {}
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        if file.name == "stats.json":
            meta = json.loads(file.read_text())
            content[str(file.relative_to(folder))] = {k: v for k, v in meta.items() if k not in ("seconds", "meta_sha256")}
        else:
            content[str(file.relative_to(folder))] = sha256_file(file)
    return json.dumps(content, sort_keys=True)


def _cli_args(kwargs: dict) -> list[str]:
    args = [sys.executable, "-m", "flows.pipeline", "--model", kwargs["model"], "--tasks", *kwargs["tasks"],
            "--sparsities", *map(str, kwargs["sparsities"]), "--methods", *kwargs["methods"],
            "--limit", str(kwargs["limit"]), "--data-dir", kwargs["data_dir"], "--samples",
            str(kwargs["samples"]), "--schedule", kwargs["schedule"], "--bench-repeats", str(kwargs["bench_repeats"]),
            "--workdir", kwargs["workdir"], "--out", kwargs["out"], "--registry-dir", kwargs["registry_dir"]]
    args += [a for name in ("device", "dtype") if name in kwargs for a in (f"--{name}", kwargs[name])]
    return args + (["--no-bench"] if kwargs.get("bench") is False else [])


def _subprocess_env() -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}


# the runs that test resuming and concurrency: the SEAP rows (task and pooled statistics, experts,
# the general mask, routing, registration), no baselines, no speed benchmark
SEAP_ONLY = {"methods": ["seap-expert", "seap-general", "seap-routed"], "bench": False}


def _rows(out: Path, methods: tuple[str, ...] | None = None) -> list:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return sorted((r["method"], r["sparsity"], json.dumps(r["tasks"], sort_keys=True)) for r in rows
                  if methods is None or r["method"] in methods)


@pytest.mark.slow
def test_killed_run_resumes_from_completed_steps(first_run, tmp_path) -> None:
    from flows.pipeline import seap_pipeline

    tmp, kwargs, _ = first_run
    kwargs = {**kwargs, **SEAP_ONLY, "workdir": str(tmp_path / "work"), "out": str(tmp_path / "out"),
              "registry_dir": str(tmp_path / "registry")}
    proc = subprocess.Popen(_cli_args(kwargs), cwd=ROOT, env=_subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    statistics = tmp_path / "work" / "statistics"
    deadline = time.monotonic() + 300
    while not (statistics.is_dir() and any(statistics.iterdir())) and proc.poll() is None:  # a temporary appears
        assert time.monotonic() < deadline, "the statistics stage never started"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # killed in the middle of (or right after) the statistics
    proc.wait()
    assert not (tmp_path / "out" / "results.json").exists()
    for stage_dir in (tmp_path / "work").iterdir():  # every finished output is complete
        if stage_dir.name.startswith("."):  # (.runs: the run records)
            continue
        for out in stage_dir.iterdir():
            if not out.name.startswith("."):
                assert any(out.iterdir()), out

    states = task_states(seap_pipeline(return_state=True, **kwargs), planned_tasks(kwargs))
    assert states[next(n for n in states if stage_of(n) == "corpus")] == "Cached"  # finished before the kill
    resumed = _rows(tmp_path / "out")  # the rows of the uninterrupted run
    assert resumed == _rows(tmp / "out", ("dense", *SEAP_ONLY["methods"])) and len(resumed) == 4
    assert not [p for p in (tmp_path / "work").rglob(".*.tmp-*")]  # the killed run's temporaries are gone


@pytest.mark.slow
def test_two_concurrent_runs_on_one_workspace(prefect_env, tmp_path) -> None:
    kwargs = pipeline_kwargs(tmp_path, **SEAP_ONLY)
    procs = []
    for i in range(2):
        args = _cli_args({**kwargs, "out": str(tmp_path / f"out{i}")})
        procs.append(subprocess.Popen(args, cwd=ROOT, env=_subprocess_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    assert _rows(tmp_path / "out0") == _rows(tmp_path / "out1")
    from seap.registry.records import read_local_registry

    records = read_local_registry(tmp_path / "registry")
    assert len(records) == 4  # both runs registered the same four versions, once
    assert not [p for p in (tmp_path / "work").rglob(".*.tmp-*")]


@pytest.mark.slow
def test_a_flow_under_a_size_cap_and_after_a_prune_rebuilds_what_is_gone(prefect_env, tmp_path) -> None:
    """The flow keeps the work folder under ``cache_max_size`` as the executor does, and a job
    whose cached folder was pruned (Prefect still holds its result) is built again, not failed."""
    from flows.pipeline import seap_pipeline
    from seap.cli import main
    from seap.run.cache_entries import entries

    kwargs = pipeline_kwargs(tmp_path, methods=["seap-expert"], bench=False, mlflow=False, sparsities=[0.3])
    assert seap_pipeline(return_state=True, **kwargs).is_completed()
    work = Path(kwargs["workdir"])
    full = sum(e.bytes for e in entries(work))
    assert main(["cache", "prune", "--workdir", str(work), "--max-size", "1", "--include-newest"]) == 0
    assert sum(e.bytes for e in entries(work)) < full
    cap = int(full * 0.9)
    state = seap_pipeline(return_state=True, **{**kwargs, "cache_max_size": str(cap)})
    assert state.is_completed()
    assert sum(e.bytes for e in entries(work)) <= cap
    assert (tmp_path / "out" / "results.md").is_file()
