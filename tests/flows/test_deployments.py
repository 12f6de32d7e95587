"""prefect.yaml against a real `prefect server` and a process worker that picks the run up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers_flows import tiny_project

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]  # a prefect server and a worker that runs the pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, its database in tmp."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
           "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # an earlier module's server (mlflow.set_tracking_uri exports it) is gone
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, (home / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "prefect server did not start"
        time.sleep(1)
    yield env
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


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
    params = {"model": str(base), "tasks": ["geo", "life"], "data_dir": str(data), "sparsities": [0.2],
              "methods": ["seap-expert", "seap-general", "seap-routed"], "limit": 4, "samples": 20, "schedule": "uniform",
              "bench": False,  # what is tested is the deployment and its worker; the flow's stages are tested elsewhere
              "workdir": str(tmp_path / "work"), "out": str(tmp_path / "out"), "registry_dir": str(tmp_path / "reg")}
    run = prefect(env, "deployment", "run", "seap-pipeline/weekly", "--params", json.dumps(params))
    flow_run_id = run.split("/runs/flow-run/")[1].split()[0]
    prefect(env, "worker", "start", "--pool", "seap-process", "--run-once", timeout=900)

    assert (tmp_path / "out" / "results.md").is_file()
    assert "| seap-routed |" in (tmp_path / "out" / "results.md").read_text()
    state = prefect(env, "flow-run", "inspect", flow_run_id, "--output", "json")
    assert json.loads(state[state.index("{"):state.rindex("}") + 1])["state"]["type"] == "COMPLETED"
