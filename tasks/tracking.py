"""Prefect task that tracks a pipeline run in MLflow and registers its experts.

A thin wrapper over ``mlflow/seap_registry.py`` (loaded by path, see
:mod:`seap.registry.mlflow_code`), the same code ``seap register`` and the DVC ``register`` stage run.
It runs after the local registry records are written, so an unreachable tracking server
fails this task (after the registry's own retries) without losing any result: register them
later with ``seap register --results OUT --registry DIR``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task


@task(name="mlflow-register")
def register_in_mlflow(results_dir: str, record_dirs: Sequence[str], params: Mapping[str, Any],
                       tracking_uri: str | None, local_dir: str, experiment: str,
                       flow_run_id: str | None = None) -> dict[str, Any]:
    """One MLflow run with the pipeline's parameters, metrics and report; one model version per
    record (a record registered before is not registered again)."""
    from seap.registry.mlflow_code import mlflow_registry
    from seap.registry.records import read_local_record

    records = [read_local_record(path) for path in record_dirs]
    tags = {"prefect_flow_run_id": flow_run_id} if flow_run_id else {}
    return mlflow_registry().register_results(results_dir, records, tracking_uri=tracking_uri, local_dir=local_dir,
                                              experiment=experiment, params=params, tags=tags, progress=False)


__all__ = ["register_in_mlflow"]
