"""Helpers for flow tests on the real Prefect engine."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir


def planned_tasks(kwargs: dict) -> int:
    """How many task runs the pipeline flow makes for ``kwargs``: one per job of its plan."""
    from seap.run.config import RunConfig
    from seap.run.plan import make_plan

    return len(make_plan(RunConfig.from_mapping(kwargs)))


def task_states(flow_state, expected: int) -> dict[str, str]:
    """Task-run name -> final state name of one flow run (subflows included by name). Task runs
    and their states reach the API asynchronously: wait (up to 120 s) until ``expected`` runs
    exist and every one has a final state."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = len(runs) >= expected and all(r.state is not None and r.state.is_final() for r in runs)
            if done or time.monotonic() > deadline:
                return {r.name: r.state.name if r.state is not None else "Unknown" for r in runs}
            time.sleep(0.5)


def stage_of(task_run_name: str) -> str:
    """``masks-3a1`` -> ``masks``; ``evaluate-routed-0f2`` -> ``evaluate-routed``."""
    return task_run_name.rsplit("-", 1)[0]


def tiny_project(root: Path, arch: str = "llama-gqa") -> tuple[Path, Path]:
    """A saved tiny random model (``arch``: one of ``ARCHS`` or ``MOE_ARCHS``) and a two-task data folder."""
    from tests.helpers import MOE_ARCHS, make_tiny_moe

    tiny = make_tiny_moe(arch) if arch in MOE_ARCHS else make_tiny_model(arch)
    tiny.model.save_pretrained(root / "base")
    tiny.tokenizer.save_pretrained(root / "base")
    return root / "base", make_task_dir(root / "data")


def pipeline_kwargs(root: Path, **overrides) -> dict:
    """The pipeline flow's parameters for the tiny Llama project under ``root`` (made when absent):
    every default method at 20%, router, bench and registry, outputs under ``root``; the values
    of :func:`tests.helpers_dvc.tiny_params` (the DVC project of the same model)."""
    base, data = (root / "base", root / "data") if (root / "base").exists() else tiny_project(root)
    kwargs = dict(model=str(base), device="cpu", dtype="float32", tasks=["geo", "life"], sparsities=[0.2],
                  methods=["seap-expert", "seap-general", "seap-routed", "wanda-sp", "flap"],
                  limit=4, data_dir=str(data), samples=20, schedule="uniform", bench_repeats=1,
                  workdir=str(root / "work"), out=str(root / "out"), registry_dir=str(root / "registry"))
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def dask_cluster(folder: Path, env: Mapping[str, str], workers: int = 2, timeout: float = 120) -> Iterator[str]:
    """A real Dask cluster on loopback: ``dask scheduler`` and ``workers`` single-threaded
    ``dask worker`` processes (no nanny) on free ports, started from ``folder`` as their working
    folder with ``env`` (``PYTHONPATH`` removed), so they import only what is installed in the
    environment. Yields the scheduler's address; the processes are stopped on exit (their logs
    are ``folder/*.log``, quoted when the cluster does not come up)."""
    dask = str(Path(sys.executable).with_name("dask"))
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    folder.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(folder / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([dask, *args], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log")))

    scheduler_file = folder / "scheduler.json"
    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(scheduler_file))
        deadline, address = time.monotonic() + timeout, None
        while address is None:
            assert procs[0].poll() is None and time.monotonic() < deadline, f"dask scheduler did not start\n{logs()}"
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):  # not written yet, or half-written
                time.sleep(0.1)
        for i in range(workers):
            start(f"worker-{i}", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                  "--no-dashboard", "--name", f"worker-{i}", "--local-directory", str(folder / f"worker-{i}"))
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            try:
                client.wait_for_workers(workers, timeout=timeout)
            except TimeoutError as exc:
                raise AssertionError(f"{workers} dask workers did not connect\n{logs()}") from exc
        yield address
    finally:  # the workers, then the scheduler (a worker that outlives it waits for it to come back)
        for group in (procs[1:], procs[:1]):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
