"""A bounded load test of a registered SEAP model served over HTTP on loopback.

Starts ``mlflow models serve`` for the model (``127.0.0.1`` only, unless ``--host`` says
otherwise), waits for it, sends ``--requests`` requests from ``--clients`` concurrent clients
(mixed starter-suite prompts, greedy, ``--max-new-tokens``), then the malformed requests a
server must refuse with a 4xx and a message; stops the server and exits by itself. Reports
throughput, p50/p99 latency, the status codes, and the server's resident memory (the whole
process tree) after the warm-up, halfway and at the end.

    PYTHONPATH=. .venv/bin/python scripts/load_test_serving.py \\
        --model-uri models:/seap-smollm2-135m-routed/1 --tracking-uri sqlite:///runs/mlflow/mlflow.db \\
        --requests 200 --clients 4 --out runs/load-test.json

Exit code 0 when no request got a 5xx, every malformed request got a 4xx with a message, and the
server's memory did not grow by more than ``--max-growth`` between halfway and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MALFORMED: dict[str, Any] = {  # name -> request body (a str is sent as it is, not as JSON)
    "not JSON": "{this is not json",
    "no inputs field": {"prompts": ["The capital of France is"]},
    "no prompts": {"inputs": []},
    "an empty prompt": {"inputs": [""]},
    "an over-long prompt": {"inputs": ["word " * 20000], "params": {"max_new_tokens": 4}},
    "an unknown task": {"inputs": ["The capital of France is"], "params": {"task": "astrology"}},
    "max_new_tokens not a number": {"inputs": ["The capital of France is"], "params": {"max_new_tokens": "many"}},
    "max_new_tokens of zero": {"inputs": ["The capital of France is"], "params": {"max_new_tokens": 0}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (the server's workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def mixed_prompts(n: int) -> list[str]:
    from seap.data.starter import STARTER_TASKS, starter_records

    per_task = [[r["question"] for r in starter_records(t, "evaluation")] for t in STARTER_TASKS]
    return [per_task[i % len(per_task)][i // len(per_task) % len(per_task[0])] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import requests

    port = args.port or free_port()
    url = f"http://{args.host}:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")  # (this environment's: mlflow and uvicorn beside python)
    env = {**os.environ, "MLFLOW_TRACKING_URI": args.tracking_uri, "MLFLOW_REGISTRY_URI": args.tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = Path(args.log or tempfile.mkstemp(prefix="seap-serve-", suffix=".log")[1])
    with open(log, "w") as handle:
        server = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                                   "-h", args.host, "-p", str(port), "--workers", "1"], env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the model server exited with {server.returncode}; its log: {log}")
            try:
                if requests.get(url + "/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the model server did not answer /ping in {args.start_timeout} s; its log: {log}")
            time.sleep(1)
        prompts = mixed_prompts(args.requests)
        params = {"max_new_tokens": args.max_new_tokens}

        def one(prompt: str) -> tuple[int, float]:
            start = time.perf_counter()
            response = requests.post(url + "/invocations", json={"inputs": [prompt], "params": params}, timeout=600)
            return response.status_code, time.perf_counter() - start

        for prompt in prompts[:2]:  # warm-up: every expert the first prompts reach is materialised
            one(prompt)
        memory = {"after_warmup": tree_rss(server.pid)}
        results: list[tuple[int, float]] = []
        started = time.perf_counter()
        half = len(prompts) // 2
        with ThreadPoolExecutor(args.clients) as pool:
            results += list(pool.map(one, prompts[:half]))
            memory["halfway"] = tree_rss(server.pid)
            results += list(pool.map(one, prompts[half:]))
        wall = time.perf_counter() - started
        memory["end"] = tree_rss(server.pid)
        latencies = [seconds for _, seconds in results]
        codes: dict[str, int] = {}
        for code, _ in results:
            codes[str(code)] = codes.get(str(code), 0) + 1
        malformed = {}
        for name, body in MALFORMED.items():
            data = body if isinstance(body, str) else json.dumps(body)
            response = requests.post(url + "/invocations", data=data, timeout=120,
                                     headers={"Content-Type": "application/json"})
            malformed[name] = {"status": response.status_code, "message": response.text[:300]}
        alive = server.poll() is None
    finally:
        _stop(server)
    growth = (memory["end"] - memory["halfway"]) / max(memory["halfway"], 1)
    return {"model": args.model_uri, "host": args.host, "requests": len(results), "clients": args.clients,
            "max_new_tokens": args.max_new_tokens, "wall_s": wall, "throughput_rps": len(results) / wall,
            "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                          "max": max(latencies)},
            "status": codes, "server_5xx": sum(n for c, n in codes.items() if c.startswith("5")),
            "memory_bytes": memory, "memory_growth_second_half": growth, "malformed": malformed,
            "server_alive_after": alive, "log": str(log)}


def _stop(server: subprocess.Popen[bytes]) -> None:
    """The server and its workers, stopped (killed when they do not stop in 30 s)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def verdict(report: dict[str, Any], max_growth: float) -> list[str]:
    """What failed, in words (empty: the run passed)."""
    problems = []
    if report["server_5xx"]:
        problems.append(f"{report['server_5xx']} requests got a 5xx")
    if report["status"].get("200", 0) != report["requests"]:
        problems.append(f"not every request succeeded: {report['status']}")
    for name, answer in report["malformed"].items():
        if not 400 <= answer["status"] < 500 or not answer["message"].strip():
            problems.append(f"{name}: HTTP {answer['status']} {answer['message'][:80]!r}")
    if report["memory_growth_second_half"] > max_growth:
        problems.append(f"the server's memory grew by {report['memory_growth_second_half']:.1%} in the second half")
    if not report["server_alive_after"]:
        problems.append("the server died")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", required=True, help="e.g. models:/seap-smollm2-135m-routed/1")
    p.add_argument("--tracking-uri", default="sqlite:///runs/mlflow/mlflow.db")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--host", default="127.0.0.1", help="where the server listens (default: loopback only)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed memory growth in the second half")
    p.add_argument("--log", default=None, help="the server's log file (default: a temporary file)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.requests < 2 or args.clients < 1:
        p.error("--requests must be at least 2 and --clients at least 1")
    report = run(args)
    problems = verdict(report, args.max_growth)
    report["problems"] = problems
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    lat = report["latency_s"]
    print(f"{report['requests']} requests, {args.clients} clients: {report['throughput_rps']:.2f} req/s, "
          f"p50 {lat['p50'] * 1000:.0f} ms, p99 {lat['p99'] * 1000:.0f} ms; status {report['status']}; "
          f"server RSS {report['memory_bytes']['halfway'] / 2**30:.2f} -> {report['memory_bytes']['end'] / 2**30:.2f} GiB")
    for name, answer in report["malformed"].items():
        print(f"  {name}: HTTP {answer['status']}")
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
