"""The repository's dvc.yaml on the real DVC, in a temporary git repository with a tiny model:
a full ``dvc repro``, a second one that runs nothing, the same rows as ``seap eval`` and the
Prefect flow with the same parameters, a sparsity change that re-runs only the masks and what
follows; the committed dvc.yaml is the one the stage table generates; and the data pushed to
and pulled from an S3 remote (moto's server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers_dvc import (
    copy_pipeline,
    dvc,
    dvc_env,
    init_repo,
    stages_in,
    tiny_params,
    tree_bytes,
    write_params,
)
from tests.helpers_flows import tiny_project
from tests.helpers_tasks import make_task_dir

ALL_STAGES = {"model", "selection", "corpus", "statistics", "scores", "masks", "refits", "evaluate-dense", "evaluate",
              "select", "search", "candidate-speed", "budget", "router", "evaluate-routed", "perplexity", "bench", "report",
              "register"}
UPSTREAM_OF_MASKS = {"model", "selection", "corpus", "statistics", "scores", "evaluate-dense", "router"}
MASKS_AND_DOWNSTREAM = {"masks", "refits", "evaluate", "select", "candidate-speed", "budget", "evaluate-routed", "perplexity", "bench",
                        "report", "register"}
ROOT = Path(__file__).resolve().parents[2]
VOLATILE = {"seconds", "router_seconds", "router_overhead"}  # timings differ from run to run


def comparable(results_file: Path) -> list[dict]:
    rows = json.loads(results_file.read_text())["rows"]
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows),
                  key=lambda r: (r["method"], r["sparsity"]))


def test_committed_dvc_yaml_is_generated_from_the_stage_table() -> None:
    from seap.run.dvc import dvc_yaml
    from seap.run.plan import PIPELINE_STAGES, STAGES

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "regenerate it: python -m seap.run.dvc > dvc.yaml"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(PIPELINE_STAGES)  # (checkpoint: seap prune's own stage, not a DVC one)
    for name in PIPELINE_STAGES:  # the same module list as the Prefect cache keys
        stage, deps = STAGES[name], set(stages[name]["deps"])
        for module in stage.modules:
            assert any(d.startswith(module.replace(".", "/")) for d in deps), (name, module)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A DVC project (the real dvc.yaml) with a tiny model, two tasks in data/ tracked by
    data.dvc, and one complete ``dvc repro``; returns (repo, env, output of the repro)."""
    tmp = tmp_path_factory.mktemp("dvc")
    env = dvc_env(pycache=tmp / "pycache")
    model, data = tiny_project(tmp)
    repo = init_repo(tmp / "repo", env)
    copy_pipeline(repo)
    shutil.copytree(data, repo / "data")
    write_params(repo, tiny_params(model, ["geo", "life"], [0.2]))
    dvc(repo, env, "add", "data")
    return repo, env, dvc(repo, env, "repro")


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_the_outputs(project) -> None:
    repo, _, output = project
    assert stages_in(output)["ran"] == ALL_STAGES, output[-3000:]
    assert (repo / "dvc.lock").is_file()
    model = json.loads((repo / "work" / "model" / "output" / "model.json").read_text())
    assert len(model["digest"]) == 64 and model["kind"] == "local"
    for name in ("results.md", "results.json", "metrics.json", "accuracy.csv", "accuracy_vs_sparsity.png"):
        assert (repo / "results" / name).is_file(), name
    table = (repo / "results" / "results.md").read_text()
    for method in ("dense", "seap-expert", "seap-general", "seap-routed", "wanda-sp", "flap"):
        assert f"| {method} |" in table
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert {"dense", "seap-expert@0.2", "seap-general@0.2", "seap-routed@0.2", "wanda-sp@0.2", "flap@0.2"} <= set(metrics)
    assert metrics["seap-general@0.2"]["prefill_speedup"] > 0
    groups = sorted(p.name for p in (repo / "work" / "masks").iterdir())
    assert groups == ["flap@0.2", "seap-expert@0.2", "seap-general@0.2", "wanda-sp@0.2"]
    assert (repo / "work" / "masks" / "seap-expert@0.2" / "geo" / "mask.json").is_file()
    # every mask refitted (the default) in one walk, each refitted mask an output of its own
    refits = sorted(p.name for p in (repo / "work" / "refits").iterdir())
    assert refits == ["flap@0.2", "seap-expert@0.2", "seap-general@0.2", "walk", "wanda-sp@0.2"]
    assert (repo / "work" / "refits" / "seap-expert@0.2" / "geo" / "mask.json").is_file()
    records = sorted(p.parent.parent.name for p in (repo / "registry").glob("*/*/record.json"))
    assert len(records) == 4 and any(name.endswith("-routed") for name in records)
    assert (repo / "results" / "accuracy.csv").read_text().startswith("method,sparsity,average")
    # the register stage also tracked the run and registered the 4 versions in the local MLflow store
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'runs' / 'mlflow' / 'mlflow.db'}"
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("tags.sparsity = '0.2'")
    assert len(versions) == 4 and "MLflow run" in output


@pytest.mark.slow
def test_second_repro_runs_nothing_and_status_is_clean(project) -> None:
    repo, env, _ = project
    output = dvc(repo, env, "repro")
    stages = stages_in(output)
    assert stages["ran"] == set() and stages["restored"] == set(), output[-3000:]
    assert stages["skipped"] == ALL_STAGES
    assert "up to date" in dvc(repo, env, "status")


@pytest.mark.slow
def test_metrics_and_plots_are_readable_by_dvc(project) -> None:
    repo, env, _ = project
    shown = dvc(repo, env, "metrics", "show", "--json")
    assert "seap-general@0.2" in shown
    out = repo / "plots-html"
    dvc(repo, env, "plots", "show", "--out", str(out))
    assert (out / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.services
def test_seap_eval_and_the_flow_give_the_rows_of_dvc_repro(project, llama_pipeline) -> None:
    """The three front doors walk one plan: the same parameters give identical rows (every metric
    of every task, realised sparsity, mask digests, routing). The flow's run is the session's
    shared one (tests/flows/test_pipeline.py checks the rest of it): the same tiny Llama and data
    (checked here by content) and the same parameters but for locations. Every family runs
    through the plan's executor (tests/run/test_execute.py), which all three doors share."""
    from seap.cli import main
    from seap.contenthash import tree_digest
    from seap.run.config import RunConfig
    from seap.run.dvc import project_config

    repo, _, _ = project
    config = project_config(repo / "params.yaml", repo)
    flow_root, flow_kwargs, flow_state = llama_pipeline
    assert flow_state.is_completed()
    flow = RunConfig.from_mapping(flow_kwargs, front="flow")
    places = ("model", "data_dir", "workdir", "out", "registry_dir", "mlflow_dir", "mlflow", "tracking_uri")
    assert {k: v for k, v in config.to_dict().items() if k not in places} == \
        {k: v for k, v in flow.to_dict().items() if k not in places}
    assert tree_digest(config.model.model) == tree_digest(flow.model.model)
    assert tree_digest(config.data.data_dir) == tree_digest(flow.data.data_dir)
    tmp = repo.parent / "front-doors"
    data = config.data
    args = ["eval", "--model", config.model.model, "--tasks", *data.tasks, "--data-dir", str(data.data_dir),
            "--samples", str(data.samples), "--sparsities", *map(str, config.masks.sparsities),
            "--limit", str(config.evaluate.limit), "--schedule", config.masks.schedule,
            "--bench-repeats", str(config.bench.bench_repeats), "--no-mlflow",
            "--workdir", str(tmp / "eval-work"), "--out", str(tmp / "eval"), "--registry-dir", str(tmp / "eval-reg")]
    assert main(args) == 0
    dvc_rows = comparable(repo / "results" / "results.json")
    assert comparable(flow_root / "out" / "results.json") == dvc_rows
    assert comparable(tmp / "eval" / "results.json") == dvc_rows
    assert len(dvc_rows) == 6


@pytest.mark.slow
def test_changed_sparsity_reruns_only_masks_and_downstream(project) -> None:
    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["masks"]["sparsities"] = [0.3]
    write_params(repo, params)
    output = dvc(repo, env, "repro")
    stages = stages_in(output)
    assert stages["ran"] == MASKS_AND_DOWNSTREAM, output[-3000:]
    assert stages["skipped"] == UPSTREAM_OF_MASKS | {"search"}  # (no bisection: its inputs are unchanged)
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert "seap-general@0.3" in metrics and "seap-general@0.2" not in metrics
    tags = [json.loads(p.read_text())["tags"]["sparsity"] for p in (repo / "registry").glob("*/*/record.json")]
    assert sorted(set(tags)) == ["0.2", "0.3"]  # the registry keeps earlier versions (persist: true)


@pytest.mark.slow
def test_a_killed_repro_resumes_and_ends_clean(project) -> None:
    """kill -9 of ``dvc repro`` (its whole process group) in the middle of a stage, after a
    parameter change: the same ``dvc repro`` then finishes, no temporary of the killed stage
    stays, and a third repro has nothing to do."""
    import os
    import signal
    import subprocess
    import time

    from tests.helpers_dvc import BIN

    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["masks"]["sparsities"] = [0.4]
    write_params(repo, params)
    process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (repo / "work" / "masks" / "seap-expert@0.4").exists():  # the masks stage under way
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    output = dvc(repo, env, "repro")
    assert "seap-general@0.4" in json.loads((repo / "results" / "metrics.json").read_text())
    assert not [p for p in (repo / "work").rglob("*") if ".tmp-" in p.name], "a temporary of the killed run stayed"
    again = dvc(repo, env, "repro")
    assert stages_in(again)["ran"] == set(), (output[-2000:], again[-2000:])


@pytest.mark.services
def test_data_push_and_pull_through_an_s3_remote(tmp_path: Path) -> None:
    """``dvc push`` to an S3 bucket (moto's server on loopback, endpointurl), then ``dvc pull``
    restores data/ byte for byte with an empty cache; credentials only from the environment."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}
        env = dvc_env(**creds)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.pop(key, None)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="seap-data")
        repo = init_repo(tmp_path / "repo", env)
        make_task_dir(repo / "data")
        before = tree_bytes(repo / "data")
        dvc(repo, env, "add", "data")
        dvc(repo, env, "remote", "add", "s3", "s3://seap-data/dvc")
        dvc(repo, env, "remote", "modify", "s3", "endpointurl", endpoint)
        config = (repo / ".dvc" / "config").read_text()
        assert "testing" not in config  # no credentials in the committed config
        dvc(repo, env, "push", "-r", "s3")
        shutil.rmtree(repo / "data")
        shutil.rmtree(repo / ".dvc" / "cache")
        dvc(repo, env, "pull", "-r", "s3")
        assert tree_bytes(repo / "data") == before
        assert "in sync" in dvc(repo, env, "status", "-r", "s3", "--cloud")
    finally:
        server.stop()


@pytest.mark.slow
def test_a_bisected_budget_runs_through_dvc(project) -> None:
    """``budget.search: bisect`` in params.yaml: the search stage runs the bisection and the
    budget stage chooses from it, as ``seap eval`` does."""
    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["budget"].update(max_drop=5.0, search="bisect", step=0.2, grid=[0.6], selection_items=6)
    params["masks"]["sparsities"] = [0.2]
    write_params(repo, params)
    output = dvc(repo, env, "repro")
    assert {"selection", "search", "budget"} <= stages_in(output)["ran"], output[-3000:]
    searched = json.loads((repo / "work" / "search" / "bisect" / "search.json").read_text())
    record = json.loads((repo / "work" / "budget" / "choice" / "budget.json").read_text())
    assert searched["rounds"] and record["search"]["rounds"] == len(searched["rounds"])
    assert set(record["tasks"]) == {"geo", "life"}
    assert "| seap-budget |" in (repo / "results" / "results.md").read_text()
