"""The infrastructure scripts on real components, no mocks: moto's S3 server on loopback stands in
for MinIO/AWS; ``infra/create_buckets.py`` creates buckets in it; ``infra/single-machine/start.sh``
starts a real MLflow tracking server (``mlflow/server/serve.sh``, artifacts proxied to the moto
bucket) and a real Prefect server, the MLflow client logs an artifact that lands in the bucket, and
``stop.sh`` stops both. The secret key never appears in any output, log or state file.
``infra/team/compose.yaml`` (no Docker daemon here) is checked structurally."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
ACCESS_KEY = "seap-test-access-key"
SECRET_KEY = f"seap-test-secret-{uuid.uuid4().hex}"  # must never show up anywhere
REGION = "us-east-1"
# Variables of the developer's shell that must not leak into the scripts under test.
_SCRUB = re.compile(r"^(AWS_|MLFLOW_|PREFECT_|SEAP_|MINIO_)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AWS/MLflow/Prefect/SEAP settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repository root with a timeout, capturing stdout and stderr."""
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port for this module; stopped at the end."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # moto keeps its state per process: forget buckets an earlier module's server created
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
        yield endpoint
    finally:
        server.stop()


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    """A clean environment with the test credentials and ``endpoint`` as MLFLOW_S3_ENDPOINT_URL."""
    settings = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_S3_ENDPOINT_URL": endpoint}
    return clean_env(**{**settings, **extra})


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server with the test credentials."""
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


# --- (a) create_buckets.py -------------------------------------------------------------------------

@pytest.mark.services
def test_create_buckets_creates_both_default_buckets_idempotently(s3_endpoint: str) -> None:
    env = s3_env(s3_endpoint)
    first = run([PYTHON, "infra/create_buckets.py", "--wait", "10"], env)
    assert first.returncode == 0, first.stderr
    assert "bucket seap-mlflow: created" in first.stdout and "bucket seap-dvc: created" in first.stdout
    assert s3_endpoint in first.stdout
    names = {b["Name"] for b in s3_client(s3_endpoint).list_buckets()["Buckets"]}
    assert {"seap-mlflow", "seap-dvc"} <= names

    second = run([PYTHON, "infra/create_buckets.py"], env)
    assert second.returncode == 0, second.stderr
    assert "bucket seap-mlflow: exists" in second.stdout and "bucket seap-dvc: exists" in second.stdout
    for result in (first, second):
        assert SECRET_KEY not in result.stdout + result.stderr
        assert ACCESS_KEY not in result.stdout + result.stderr


@pytest.mark.services
def test_create_buckets_honours_names_from_env_and_other_regions(s3_endpoint: str) -> None:
    env = s3_env(s3_endpoint, SEAP_MLFLOW_BUCKET="team-mlflow", SEAP_DVC_BUCKET="team-dvc",
                 AWS_DEFAULT_REGION="eu-central-1")
    result = run([PYTHON, "infra/create_buckets.py", "--wait", "10"], env)
    assert result.returncode == 0, result.stderr
    client = s3_client(s3_endpoint)
    for bucket in ("team-mlflow", "team-dvc"):
        assert client.get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-central-1"


@pytest.mark.services
def test_create_buckets_without_credentials_exits_2_naming_the_variables(s3_endpoint: str) -> None:
    result = run([PYTHON, "infra/create_buckets.py"], clean_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint))
    assert result.returncode == 2
    assert "AWS_ACCESS_KEY_ID" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr

    only_id = run([PYTHON, "infra/create_buckets.py"],
                  clean_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY))
    assert only_id.returncode == 2 and "AWS_SECRET_ACCESS_KEY not set" in only_id.stderr
    assert ACCESS_KEY not in only_id.stdout + only_id.stderr


# --- (b) single machine: start.sh / stop.sh --------------------------------------------------------

@pytest.mark.services
def test_single_machine_start_log_artifact_to_s3_and_stop(s3_endpoint: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "infra"
    mlflow_port, prefect_port = free_port(), free_port()
    env = s3_env(s3_endpoint, SEAP_INFRA_DIR=str(state), MLFLOW_PORT=str(mlflow_port),
                 PREFECT_PORT=str(prefect_port), SEAP_MLFLOW_BUCKET="single-mlflow",
                 SEAP_DVC_BUCKET="single-dvc", SEAP_INFRA_TIMEOUT="150")
    outputs: list[str] = []
    pids: list[int] = []
    try:
        started = run(["bash", "infra/single-machine/start.sh"], env, timeout=200)
        outputs.append(started.stdout + started.stderr)
        assert started.returncode == 0, outputs[-1][-3000:]
        pids = [int((state / f"{name}.pid").read_text()) for name in ("mlflow", "prefect")]
        mlflow_url, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        assert f"export MLFLOW_TRACKING_URI={mlflow_url} PREFECT_API_URL={prefect_api}" in started.stdout
        assert "bucket single-mlflow: created" in started.stdout

        again = run(["bash", "infra/single-machine/start.sh"], env, timeout=60)
        outputs.append(again.stdout + again.stderr)
        assert again.returncode == 0, outputs[-1][-3000:]
        assert "MLflow already running" in again.stdout and "Prefect already running" in again.stdout
        assert [int((state / f"{name}.pid").read_text()) for name in ("mlflow", "prefect")] == pids

        # The client holds no S3 credentials: artifacts go through the server (--serve-artifacts).
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_url)
        experiment_id = client.create_experiment(f"infra-{uuid.uuid4().hex[:8]}")
        run_id = client.create_run(experiment_id).info.run_id
        artifact = tmp_path / "note.txt"
        artifact.write_text("pruned with SEAP\n")
        client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id)
        assert [f.path for f in client.list_artifacts(run_id)] == ["note.txt"]

        listing = s3_client(s3_endpoint).list_objects_v2(Bucket="single-mlflow", Prefix="artifacts/")
        keys = [obj["Key"] for obj in listing.get("Contents", [])]
        assert f"artifacts/{experiment_id}/{run_id}/artifacts/note.txt" in keys, keys

        with urllib.request.urlopen(f"{prefect_api}/health", timeout=10) as response:
            assert response.status == 200 and response.read().strip() == b"true"
    finally:
        stopped = run(["bash", "infra/single-machine/stop.sh"], env, timeout=90)
        outputs.append(stopped.stdout + stopped.stderr)
    assert stopped.returncode == 0, outputs[-1]
    assert "mlflow: stopped" in stopped.stdout and "prefect: stopped" in stopped.stdout

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(pid_running(pid) for pid in pids):
        time.sleep(0.3)
    assert not any(pid_running(pid) for pid in pids)
    assert not port_open(mlflow_port) and not port_open(prefect_port)
    assert not list(state.glob("*.pid"))

    for text in outputs:
        assert SECRET_KEY not in text
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.log" for p in files) and any(p.name == "prefect.log" for p in files)
    leaked = [str(p) for p in files if SECRET_KEY.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.services
def test_single_machine_start_without_credentials_starts_nothing(s3_endpoint: str, tmp_path: Path) -> None:
    state = tmp_path / "infra"
    env = clean_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, SEAP_INFRA_DIR=str(state),
                    MLFLOW_PORT=str(free_port()), PREFECT_PORT=str(free_port()))
    result = run(["bash", "infra/single-machine/start.sh"], env, timeout=60)
    assert result.returncode == 2
    assert "AWS_ACCESS_KEY_ID" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr
    assert not list(state.glob("*.pid"))


# --- (c) team compose file -------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY_ID|USER)")


def test_team_compose_services_dependencies_and_no_literal_secrets() -> None:
    compose = yaml.safe_load((ROOT / "infra" / "team" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow", "prefect-server", "prefect-worker"} <= set(services)

    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    assert services["buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["prefect-worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["prefect-worker"]["build"]["dockerfile"] == "infra/team/worker.Dockerfile"
    assert services["mlflow"]["build"]["context"] == "../../mlflow/server"
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3.8.8-python3.11"

    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "http://minio:9000" in mlflow_env["MLFLOW_S3_ENDPOINT_URL"]
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].endswith("/artifacts")
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    checked = 0
    for name, service in services.items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}.{key} is not a required ${{...}}"
                checked += 1
            if "://" in value and "@" in value:  # credentials inside a URL must be references too
                userinfo = value.split("://", 1)[1].rsplit("@", 1)[0]
                assert re.fullmatch(r"(\$\{[A-Z0-9_]+:\?[^}]+\}:?)+", userinfo), f"{name}.{key} has a literal password"
                checked += 1
    assert checked >= 8

    team = ROOT / "infra" / "team"
    assert ".env" in (team / ".gitignore").read_text().split()
    example = (team / ".env.example").read_text()
    assert "change me" in example.lower()
    assert not (ROOT / "mlflow" / "__init__.py").exists()


# --- (d) serve.sh ----------------------------------------------------------------------------------

def test_serve_sh_refuses_an_s3_destination_without_credentials(tmp_path: Path) -> None:
    env = clean_env(SEAP_INFRA_DIR=str(tmp_path / "infra"), MLFLOW_PORT=str(free_port()),
                    MLFLOW_BIN=str(VENV_BIN / "mlflow"))
    result = run(["bash", "mlflow/server/serve.sh"], env, timeout=30)
    assert result.returncode == 2
    assert "AWS_ACCESS_KEY_ID" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "s3://seap-mlflow/artifacts" in result.stderr

    only_id = run(["bash", "mlflow/server/serve.sh"],
                  clean_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, MLFLOW_ARTIFACTS_DESTINATION="s3://other/root"), timeout=30)
    assert only_id.returncode == 2 and "missing: AWS_SECRET_ACCESS_KEY" in only_id.stderr
    assert ACCESS_KEY not in only_id.stderr
