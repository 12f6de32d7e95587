"""MLflow side of SEAP: track pipeline runs, register experts, promote, roll back, search.

Loaded by path (``seap.registry.mlflow_code.mlflow_registry()``), since this folder has no
``__init__.py`` and must never shadow the installed ``mlflow`` package. The ``seap``
library itself never imports MLflow; the CLI (``seap register|promote|rollback|models``),
the Prefect task ``mlflow-register`` and the DVC ``register`` stage call the functions here.

* Tracking: each pipeline run is an MLflow run (experiment ``seap`` by default) with the
  pipeline parameters, per-row and per-task metrics (acc, acc_norm, retention against dense),
  speed-ups, realised sparsity, the report (Table 1 Markdown, JSON, CSV, plot) as artifacts,
  and tags for the model fingerprint, data fingerprint and lm-eval version.
* Registry: each expert, general mask and routed bundle (local registry record) becomes a
  version of the registered model ``seap-<model>-<task|general|routed>``: a pyfunc model from
  code (``mlflow/seap_model.py``) whose only artifact is the small bundle (masks, router, a
  reference to the base model with its fingerprint). Tags: task, kind, sparsity, score,
  schedule, fingerprints, every metric (``retention_<task>``, ``prefill_speedup``...).
  Registering the same record twice is a no-op (tag ``version_key``).
* Promotion: aliases ``candidate``, ``staging``, ``production`` are the source of truth; the
  legacy stage (None/Staging/Production/Archived) and a ``stage`` tag mirror them. Staging and
  production pass the gates of ``mlflow/promotion.yaml``; the replaced production version is
  archived and remembered, so ``rollback`` restores it in one command.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from seap.errors import ModelMismatchError, SeapError
from seap.registry.promotion import (
    ARCHIVED,
    LEGACY_STAGES,
    STAGES,
    check_transition,
    gate_failures,
    load_policy,
    metrics_from_tags,
)
from seap.registry.records import resolve_tracking_uri

MODEL_FILE = Path(__file__).resolve().parent / "seap_model.py"
SEAP_PACKAGE = Path(__file__).resolve().parents[1] / "seap"
DEFAULT_EXPERIMENT = "seap"
STAGE_TAG = "stage"
HISTORY_TAG = "seap.production_history"
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "tqdm", "gguf", "mlflow", "pandas")
T = TypeVar("T")


class RegistryUnavailableError(SeapError):
    """The tracking server could not be reached (after retries)."""


class PromotionRefusedError(SeapError):
    """A promotion failed its gate."""


# -- connection -------------------------------------------------------------------------------
def redact(uri: str) -> str:
    """``uri`` without credentials (``postgresql://user:secret@host`` -> ``postgresql://***@host``)."""
    from seap.io import redact_uri

    return redact_uri(uri)




def _local_artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def connect(tracking_uri: str | None = None, local_dir: str | Path | None = None, attempts: int = 3,
            delay: float = 2.0, existing: bool = False) -> str:
    """Point MLflow at the tracking server (or local database) and check that it answers.

    An HTTP server is probed on ``/health`` ``attempts`` times with exponential back-off;
    then :class:`RegistryUnavailableError` says so and how to register later. With
    ``existing`` (commands that read or change what is registered), a local database that does
    not exist is refused instead of created, so a mistyped folder leaves nothing behind.
    """
    uri = resolve_tracking_uri(tracking_uri, local_dir)
    # bound MLflow's own HTTP retries (default 7 with factor 2: minutes) unless the user set them
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith(("http://", "https://")):
        import requests

        reason = "no answer"
        for attempt in range(attempts):
            try:
                response = requests.get(uri.rstrip("/") + "/health", timeout=5)
                if response.ok:
                    break
                reason = f"HTTP {response.status_code} on /health"
            except requests.RequestException as exc:
                reason = type(exc).__name__
            if attempt + 1 < attempts:
                time.sleep(delay * 2**attempt)
        else:
            raise RegistryUnavailableError(
                f"MLflow tracking server {redact(uri)} is unreachable after {attempts} attempts ({reason})",
                "start it (infra/single-machine/start.sh, infra/team) or fix MLFLOW_TRACKING_URI; local results "
                "are kept: register them later with `seap register --results DIR --registry DIR`")
    elif uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        if existing and not database.is_file():
            raise SeapError(f"no MLflow registry at {database}: nothing has been registered there",
                            "point --mlflow-dir (or --tracking-uri, MLFLOW_TRACKING_URI) at the registry that holds "
                            "the model, or register first (`seap eval`, `seap register`)")
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _retry_locked(fn: Callable[[], T], attempts: int = 8) -> T:
    """Run ``fn``, retrying on SQLite's "database is locked" (several writers on one local database)."""
    for attempt in range(attempts):
        try:
            return fn()
        except MlflowException as exc:
            if "database is locked" not in str(exc) or attempt + 1 == attempts:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def experiment_id(name: str = DEFAULT_EXPERIMENT, uri: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (local artifacts beside a local database)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_location(uri or
                                                                                          mlflow.get_tracking_uri()))
    except MlflowException:  # created concurrently
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# -- tracking ---------------------------------------------------------------------------------
def _metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^\w.\- :/]", "_", p) for p in parts)


def run_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics of a pipeline's results: per row (``seap-expert_0.2``) every number of
    :func:`seap.evaluation.metrics.flat_metrics` (average, realised sparsity, retention, speed-ups,
    per task accuracy and margin), plus per task both lm-eval metrics."""
    from seap.evaluation.metrics import LM_EVAL_METRICS, flat_metrics, row_name

    flat = flat_metrics(dict(results))
    out: dict[str, float] = {}
    for row in results["rows"]:
        name = row_name(row).replace("@", "_")
        for key, value in flat.get(row_name(row), {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[_metric_key(name, key)] = float(value)
        for task, values in row["tasks"].items():
            for key in LM_EVAL_METRICS:
                if isinstance(values.get(key), (int, float)):
                    out[_metric_key(name, task, key)] = float(values[key])
    router = results.get("router") or {}
    for key in ("heldout_accuracy", "accuracy"):
        if isinstance(router.get(key), (int, float)):
            out[_metric_key("router", key)] = float(router[key])
    return out


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[key] = redact(str(value))[:6000]
    return out


REPORT_FILES = ("results.md", "results.json", "metrics.json", "accuracy.csv", "accuracy_vs_sparsity.png")


def log_pipeline_run(results_dir: str | Path, params: Mapping[str, Any] | None = None,
                     experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                     tags: Mapping[str, str] | None = None) -> str:
    """One MLflow run for one pipeline run: parameters, metrics, fingerprints and the report."""
    from seap import __version__
    from seap.io import read_json

    folder = Path(results_dir)
    results = read_json(folder / "results.json", "pipeline results")
    config = dict(results.get("config") or {})
    run_tags = {"seap_version": __version__, "model": str(config.get("model", "")),
                "model_fingerprint": str(results.get("model_fingerprint") or ""),
                "data_fingerprint": str(results.get("data_fingerprint") or ""),
                "lm_eval_version": str(results.get("lm_eval_version") or ""), "metric": str(results.get("metric", ""))}
    run_tags.update(tags or {})
    exp = experiment_id(experiment)
    client = MlflowClient()
    run = _retry_locked(lambda: client.create_run(exp, run_name=run_name, tags=run_tags))
    run_id = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in _params(params if params is not None else config).items()]
        ms = [Metric(k, v, now, 0) for k, v in run_metrics(results).items()]
        for i in range(0, max(len(ps), len(ms)), 100):
            _retry_locked(lambda i=i: client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100]))
        for name in REPORT_FILES:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name), "report")
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    return run_id


# -- registration -----------------------------------------------------------------------------
def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(name).split("+")[0]
            out.append(f"{name}=={version}")
    return out


def _signature() -> Any:
    import pandas as pd
    from mlflow.models import infer_signature

    example_out = pd.DataFrame([{"text": "Paris.", "expert": "capitals", "confidence": 1.0}])
    return infer_signature(["The capital of France is"], example_out,
                           params={"max_new_tokens": 32, "batch_size": 16, "task": ""})  # (task "": routed)


def find_version(name: str, version_key: str) -> Any | None:
    """The registered version of ``name`` holding this record (tag ``version_key``), if any."""
    client = MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.version_key = '{version_key}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_record(record: Any, run_id: str | None = None) -> dict[str, Any]:
    """Register one :class:`seap.registry.records.ExpertRecord` as a version of ``record.name``.

    The version's model is ``mlflow/seap_model.py`` with the bundle as its only artifact. A
    record registered before (same ``version_key``) is returned as is.
    """
    from seap.registry.bundle import write_bundle

    key = record.version_key()
    existing = find_version(record.name, key)
    if existing is not None:
        return {"name": record.name, "version": int(existing.version), "created": False}
    client = MlflowClient()
    tags = {**record.tags, "version_key": key, STAGE_TAG: "registered"}
    with tempfile.TemporaryDirectory(prefix="seap-bundle-") as tmp:
        bundle = write_bundle(record, Path(tmp) / "bundle")
        logged_name = re.sub(r"[^\w-]", "-", f"{record.name}-{record.sparsity * 100:g}pct")
        active = mlflow.active_run()
        resume = run_id is not None and (active is None or active.info.run_id != run_id)
        with warnings.catch_warnings(), (mlflow.start_run(run_id=run_id) if resume else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            info = _retry_locked(lambda: mlflow.pyfunc.log_model(
                name=logged_name, python_model=str(MODEL_FILE), artifacts={"bundle": str(bundle)},
                code_paths=[str(SEAP_PACKAGE)], pip_requirements=_requirements(), signature=_signature(),
                tags=tags))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mv = _retry_locked(lambda: mlflow.register_model(info.model_uri, record.name, tags=tags))
    description = (f"SEAP {record.kind} for {record.task} at {record.sparsity:.0%} sparsity "
                   f"({record.score}, {record.schedule}) of {record.base_model}")
    with contextlib.suppress(MlflowException):
        _retry_locked(lambda: client.update_model_version(record.name, mv.version, description=description))
        _retry_locked(lambda: client.set_registered_model_tag(record.name, "base_model", record.base_model))
    return {"name": record.name, "version": int(mv.version), "created": True, "model_uri": info.model_uri}


def register_results(results_dir: str | Path, records: Sequence[Any] | None = None,
                     registry_dir: str | Path | None = None, tracking_uri: str | None = None,
                     local_dir: str | Path | None = None, experiment: str = DEFAULT_EXPERIMENT,
                     params: Mapping[str, Any] | None = None, run_name: str | None = None,
                     tags: Mapping[str, str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Track one pipeline run and register its experts: the one call the flow, the DVC stage
    and ``seap register`` make. ``records`` (or every record in ``registry_dir``) are registered."""
    from seap.registry.records import check_registration

    # everything checked before a run is created: a failed registration leaves nothing behind
    checked = check_registration(results_dir, registry_dir if records is None else None)
    records = checked if records is None else records
    uri = connect(tracking_uri, local_dir)
    run_id = log_pipeline_run(results_dir, params, experiment, run_name, tags)
    versions = []
    try:
        iterator: Any = records
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(records, desc="registering in MLflow", unit="version")
        with mlflow.start_run(run_id=run_id):
            for record in iterator:
                versions.append(register_record(record, run_id))
        for v in versions:
            _retry_locked(lambda v=v: MlflowClient().set_tag(run_id, f"registered.{v['name']}", str(v["version"])))
    except BaseException:
        with contextlib.suppress(Exception):
            MlflowClient().set_terminated(run_id, "FAILED")
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")
    return {"tracking_uri": redact(uri), "run_id": run_id, "experiment": experiment, "versions": versions}


# -- versions, aliases, stages ----------------------------------------------------------------
def get_version(name: str, version: int | str) -> Any:
    """The model version, or a clear error listing the versions that exist."""
    client = MlflowClient()
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and "not found" not in str(exc).lower():
            raise
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        versions = []
    if not versions:
        raise SeapError(f"registered model {name!r} does not exist",
                        "list the registered experts with `seap models`")
    raise SeapError(f"{name} has no version {version}",
                    f"versions: {', '.join(map(str, versions))} (`seap models --name {name}`)")


def stage_of(mv: Any) -> str | None:
    """The stage alias a version holds (highest first), ``None`` if it holds none."""
    aliases = set(getattr(mv, "aliases", []) or [])
    for stage in reversed(STAGES):
        if stage in aliases:
            return stage
    return None


def _holder(name: str, alias: str) -> Any | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _set_stage(name: str, version: str, stage: str) -> None:
    """Mirror ``stage`` in the version's ``stage`` tag and its legacy (deprecated) stage."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, STAGE_TAG, stage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client.transition_model_version_stage(name, version, LEGACY_STAGES[stage], archive_existing_versions=False)


def _history(name: str) -> list[str]:
    tags = MlflowClient().get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


@contextlib.contextmanager
def _downloaded_bundle(mv: Any) -> Iterator[Path]:
    """Only the small bundle of a version (not the model's code), in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="seap-promote-") as tmp:
        location = None
        with contextlib.suppress(Exception):
            location = MlflowClient().get_logged_model(mv.model_id).artifact_location
        if location:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/artifacts/bundle",
                                                       dst_path=tmp)
            yield Path(path)
        else:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp)
            yield Path(path) / "artifacts" / "bundle"


def verify_version(name: str, version: int | str, verify_base: bool = True) -> dict[str, Any]:
    """Check that a version's bundle, its tags and (optionally) its base model agree on the
    base-model fingerprint; raise :class:`ModelMismatchError` otherwise."""
    return _verify(get_version(name, version), verify_base)


def _verify(mv: Any, verify_base: bool) -> dict[str, Any]:
    from seap.registry.bundle import load_base, read_bundle
    from seap.io import short_hash

    name = mv.name
    with _downloaded_bundle(mv) as path:
        bundle = read_bundle(path)
        tagged = (mv.tags or {}).get("base_fingerprint")
        if tagged and tagged != bundle.base_fingerprint:
            raise ModelMismatchError(
                f"{name} v{mv.version}: its tag base_fingerprint {short_hash(tagged)} does not match the "
                f"bundle's base {short_hash(bundle.base_fingerprint)}",
                "re-register the expert from the pipeline's results (`seap register`)")
        if verify_base:
            load_base(bundle, device="cpu")
    return {"name": name, "version": int(mv.version), "fingerprint": bundle.base_fingerprint}


def promote(name: str, version: int | str, stage: str, policy: str | Path | None = None,
            verify_base: bool = True) -> dict[str, Any]:
    """Move ``name`` version ``version`` to ``stage`` (candidate, staging, production).

    Staging and production pass the policy's gate (refused with every failed rule named) and a
    fingerprint check of the bundle against its base model. The alias moves; the version that
    held it goes back to ``registered`` (or, for production, is archived and remembered for
    :func:`rollback`).
    """
    client = MlflowClient()
    mv = get_version(name, version)
    version = str(mv.version)
    current = stage_of(mv)
    check_transition(current, stage)
    if stage != "candidate":
        tags = mv.tags or {}
        tasks = [t for t in tags.get("tasks", "").split(",") if t]
        rules = load_policy(policy)
        failures = gate_failures(rules.gate(stage), metrics_from_tags(tags), tasks, current)
        if failures:
            with contextlib.suppress(MlflowException):
                client.set_model_version_tag(name, version, "last_refusal", f"{stage}: " + "; ".join(failures))
            raise PromotionRefusedError(
                f"promotion of {name} v{version} to {stage} refused:\n  - " + "\n  - ".join(failures),
                f"promote a version that passes, or change the gate in {rules.source}")
    _verify(mv, verify_base=verify_base and stage != "candidate")
    previous = _holder(name, stage)
    client.set_registered_model_alias(name, stage, version)
    for other in STAGES:
        if other != stage and other in (mv.aliases or []):
            client.delete_registered_model_alias(name, other)
    _set_stage(name, version, stage)
    archived = None
    if previous is not None and str(previous.version) != version:
        if stage == "production":
            _set_stage(name, str(previous.version), ARCHIVED)
            history = [*_history(name), str(previous.version)]
            client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
            archived = int(previous.version)
        else:
            _set_stage(name, str(previous.version), "registered")
    return {"name": name, "version": int(version), "stage": stage, "from": current or "registered",
            "archived": archived}


def rollback(name: str) -> dict[str, Any]:
    """Put the previous production version of ``name`` back in production; archive the current one."""
    client = MlflowClient()
    current = _holder(name, "production")
    history = _history(name)
    while history:
        target = history.pop()
        try:
            client.get_model_version(name, target)
        except MlflowException:
            continue  # deleted since; try the one before
        client.set_registered_model_alias(name, "production", target)
        _set_stage(name, target, "production")
        if current is not None and str(current.version) != target:
            _set_stage(name, str(current.version), ARCHIVED)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
        return {"name": name, "production": int(target),
                "archived": int(current.version) if current is not None else None}
    raise SeapError(f"{name} has no earlier production version to roll back to",
                    "rollback restores the production version a later promotion archived; none was archived "
                    "(`seap models --name NAME` shows the stages)")


def search(filter_string: str = "", name: str | None = None) -> list[dict[str, Any]]:
    """Registered SEAP versions matching an MLflow filter (``tags.task = 'capitals'``)."""
    client = MlflowClient()
    parts = [f"name = '{name}'"] if name else []
    if filter_string:
        parts.append(filter_string)
    try:
        found = client.search_model_versions(" and ".join(parts) or None)
    except MlflowException as exc:
        raise SeapError(f"invalid registry filter {filter_string!r}: {exc.message}",
                        "e.g. \"tags.task = 'capitals' and tags.sparsity = '0.2'\"") from None
    out = []
    for mv in sorted(found, key=lambda v: (v.name, int(v.version))):
        tags = mv.tags or {}
        out.append({"name": mv.name, "version": int(mv.version), "aliases": sorted(mv.aliases or []),
                    "stage": tags.get(STAGE_TAG, ""), "legacy_stage": mv.current_stage, "tags": dict(tags)})
    return out


def format_versions(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table of :func:`search` results."""
    header = ("name", "version", "stage", "task", "sparsity", "retention", "min_retention", "prefill_speedup")
    lines = [" | ".join(header)]
    for r in rows:
        t = r["tags"]
        lines.append(" | ".join([r["name"], str(r["version"]), r["stage"] or "-", t.get("task", "-"),
                                 t.get("sparsity", "-"), t.get("retention", "-"), t.get("min_retention", "-"),
                                 t.get("prefill_speedup", "-")]))
    return "\n".join(lines)


def main_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


__all__ = ["DEFAULT_EXPERIMENT", "PromotionRefusedError", "RegistryUnavailableError", "connect", "experiment_id",
           "find_version", "format_versions", "get_version", "log_pipeline_run", "promote", "redact",
           "register_record", "register_results", "resolve_tracking_uri", "rollback", "run_metrics", "search",
           "stage_of", "verify_version"]
