"""Real servers on loopback for registry tests: moto's S3 server and `mlflow server`
started through the product's own mlflow/server/serve.sh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-0xS3CRET",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}: "
                               f"{log.read_text()[-3000:] if log else ''}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s: {log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, children included."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def serving(cmd: list[str], env: dict[str, str], port: int, health: str, timeout: float, log: Path) -> Iterator[str]:
    """Run a server in its own session, wait for ``health`` to answer, yield its URL, stop it."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + health, timeout, proc, log)
        yield url
    finally:
        stop(proc)


@contextmanager
def moto_s3(bucket: str = "seap-mlflow") -> Iterator[str]:
    """moto's S3 server on loopback with ``bucket`` created; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}


def s3_objects(endpoint: str, bucket: str = "seap-mlflow") -> dict[str, int]:
    """Key -> size of every object in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_keys())
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@contextmanager
def mlflow_server(state: Path, s3_endpoint: str, bucket: str = "seap-mlflow") -> Iterator[str]:
    """`mlflow server` (sqlite backend, artifacts in S3 through the server) via serve.sh."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "SEAP_INFRA_DIR": str(state),
           "MLFLOW_PORT": str(port), "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
           "MLFLOW_BIN": str(BIN / "mlflow"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with serving(["bash", str(ROOT / "mlflow" / "server" / "serve.sh")], env, port, "/health", 120,
                 state / "server.log") as url:
        yield url


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` of a registered model in the current environment."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port)]
    with serving(cmd, env, port, "/ping", 180, log) as url:
        yield url
