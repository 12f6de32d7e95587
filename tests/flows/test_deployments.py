"""prefect.yaml against a real Prefect server (the session's) and a process worker that picks the run up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_flows import tiny_project

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]  # a Prefect server and a worker that runs the pipeline


@pytest.fixture(scope="module")
def prefect_server(prefect_env):
    """The environment of the `prefect` commands and the worker: the session's Prefect server
    (a real server process, tests/conftest.py), its state in tmp."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # an earlier module's server (mlflow.set_tracking_uri exports it) is gone
    return env


def prefect(env: dict, *args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


def test_deployments_are_scheduled_and_a_process_worker_runs_the_pipeline(prefect_server, tmp_path) -> None:
    env = prefect_server
    prefect(env, "work-pool", "create", "seap-process", "--type", "process", "--overwrite")
    prefect(env, "--no-prompt", "deploy", "--all")

    listing = prefect(env, "deployment", "ls")
    for name in ("seap-pipeline/weekly", "seap-evaluate/evaluate", "seap-router/router"):
        assert name in listing
    details = prefect(env, "deployment", "inspect", "seap-pipeline/weekly", "--output", "json")
    weekly = json.loads(details[details.index("{"):details.rindex("}") + 1])
    assert weekly["work_pool_name"] == "seap-process"
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 3 * * 1"]

    base, data = tiny_project(tmp_path)
    # what is tested is the deployment and its worker: the smallest complete pipeline (the flow's stages,
    # routing and tracking are tested in tests/flows/test_pipeline.py)
    params = {"model": str(base), "tasks": ["geo", "life"], "data_dir": str(data), "sparsities": [0.2],
              "methods": ["seap-expert"], "limit": 4, "samples": 20, "schedule": "uniform", "bench": False,
              "mlflow": False,
              "workdir": str(tmp_path / "work"), "out": str(tmp_path / "out"), "registry_dir": str(tmp_path / "reg")}
    run = prefect(env, "deployment", "run", "seap-pipeline/weekly", "--params", json.dumps(params))
    flow_run_id = run.split("/runs/flow-run/")[1].split()[0]
    prefect(env, "worker", "start", "--pool", "seap-process", "--run-once", timeout=900)

    assert (tmp_path / "out" / "results.md").is_file()
    assert "| seap-expert |" in (tmp_path / "out" / "results.md").read_text()
    state = prefect(env, "flow-run", "inspect", flow_run_id, "--output", "json")
    assert json.loads(state[state.index("{"):state.rindex("}") + 1])["state"]["type"] == "COMPLETED"
