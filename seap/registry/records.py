"""Registry records of pruned experts, and the local registry folder.

Every expert the pipeline builds (base model, task or ``general``, sparsity, score,
schedule) becomes one :class:`ExpertRecord`: its masks, optional router, base-model
fingerprint, headline metrics and searchable tags. The MLflow registry stores these same
records as model versions; without a tracking server they are written to a local folder::

    <root>/<registered name>/<version key>/record.json
                                          /masks/<name>/...   (copies of the small mask artifacts)
                                          /router/...         (routed bundles only)

The version key is a content hash of the masks, the router and the metrics, so registering
the same result twice (a cached re-run) is a no-op, and two pipelines registering at the
same time write two complete folders or the same one, never a half-written record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.evaluation.metrics import drops, retention, speed_of, task_accuracy
from seap.io import atomic_directory, canonical_json, copy_artifact, read_json
from seap.maths.schedules import DEFAULT_SCHEDULE
from seap.maths.scores import DEFAULT_SCORE

RECORD_FILE = "record.json"
RECORD_VERSION = 1


def model_slug(model: str) -> str:
    """A registry-safe short name of a base model (``smollm2-135m``, ``Qwen2.5-0.5B``...)."""
    name = Path(str(model).rstrip("/")).name or str(model)
    name = re.sub(r"\.gguf$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def registered_name(model: str, task: str, kind: str = "expert") -> str:
    """``seap-<model>-<task>`` for experts and the general mask, ``seap-<model>-routed`` for bundles."""
    return f"seap-{model_slug(model)}-{'routed' if kind == 'routed' else task}"


@dataclass
class ExpertRecord:
    """One registrable expert (or general mask, or routed bundle) with its provenance and metrics."""

    name: str
    kind: str  # "expert", "general" or "routed"
    task: str  # the expert's task, "general" or "routed"
    method: str
    sparsity: float
    realised_sparsity: float
    score: str
    schedule: str
    base_model: str
    base_fingerprint: str
    masks: dict[str, str]  # mask name (task or "general") -> artifact folder
    metrics: dict[str, float] = field(default_factory=dict)
    router: str | None = None
    lm_eval_version: str | None = None
    data_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """Searchable string tags: what the expert is and its headline metrics."""
        tags = {"task": self.task, "kind": self.kind, "method": self.method, "sparsity": f"{self.sparsity:g}",
                "realised_sparsity": f"{self.realised_sparsity:.4f}", "score": self.score,
                "schedule": self.schedule, "base_model": self.base_model, "base_fingerprint": self.base_fingerprint}
        tags["tasks"] = ",".join(self.evaluated_tasks)
        for key, value in sorted(self.metrics.items()):  # headline and per-task numbers, searchable
            tags[key] = f"{value:.4f}"
        if self.lm_eval_version:
            tags["lm_eval_version"] = self.lm_eval_version
        if self.data_fingerprint:
            tags["data_fingerprint"] = self.data_fingerprint
        return tags

    @property
    def evaluated_tasks(self) -> list[str]:
        """The tasks this version was evaluated on (its own task, or every task of a general mask or bundle)."""
        return sorted(k[len("acc_"):] for k in self.metrics if k.startswith("acc_"))

    def version_key(self) -> str:
        from seap.contenthash import tree_digest

        parts = {name: tree_digest(path) for name, path in sorted(self.masks.items())}
        parts["router"] = tree_digest(self.router) if self.router else ""
        payload = canonical_json({"parts": parts, "metrics": self.metrics, "tags": self.tags})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"record_version": RECORD_VERSION, **asdict(self), "tags": self.tags}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpertRecord:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def expert_records(results: Mapping[str, Any], masks: Mapping[str, Mapping[str, str | Path]],
                   router: str | Path | None = None, score: str = DEFAULT_SCORE, schedule: str = DEFAULT_SCHEDULE,
                   methods: Sequence[str] = ("seap-expert", "seap-general")) -> list[ExpertRecord]:
    """Records for the SEAP experts and general masks (and a routed bundle per sparsity when a
    router and routed rows exist) of a pipeline's results.

    ``masks`` maps ``"<method>@<sparsity>"`` to ``{mask name: folder}``, as the pipeline
    built them; metrics come from the results rows: accuracy on the mask's task(s) with the
    report's metric, retention against dense per task and its minimum, and the speed-ups.
    """
    from seap.maths.mask_formats import BUDGET_META as MASK_META
    from seap.run.methods import BUDGET_GENERAL_ROW, BUDGET_ROUTED_ROW, BUDGET_ROW, FALLBACK_MASK
    from seap.maths.mask_formats import load_mask

    rows = results["rows"]
    metric = results.get("metric", "acc")
    dense = next((r for r in rows if r["method"] == "dense"), None)
    model = results["config"]["model"]
    fingerprint = str(results.get("model_fingerprint") or "")
    records: list[ExpertRecord] = []
    for row in rows:
        method, sparsity = row["method"], row["sparsity"]
        sized_rows = (BUDGET_ROW, BUDGET_GENERAL_ROW, BUDGET_ROUTED_ROW)
        if method not in (*methods, "seap-routed", *sized_rows) or method == "dense":
            continue
        key = method if method in sized_rows else f"{method}@{sparsity:g}"
        if method == BUDGET_ROW:  # each task's expert at its own size
            group = masks.get(BUDGET_ROW, {})
            units = [(task, "expert", [task], {task: group[task]}) for task in row["tasks"] if task in group]
        elif method in ("seap-routed", BUDGET_ROUTED_ROW):
            if not router:
                continue
            group = {**masks.get(BUDGET_ROW, {}), "general": str(Path(masks[BUDGET_ROUTED_ROW]["row"]) / FALLBACK_MASK)} \
                if method == BUDGET_ROUTED_ROW else \
                {**masks.get(f"seap-expert@{sparsity:g}", {}), **masks.get(f"seap-general@{sparsity:g}", {})}
            units = [("routed", "routed", list(row["tasks"]), group)]
        elif method == "seap-expert":
            group = masks.get(key, {})
            units = [(task, "expert", [task], {task: group[task]}) for task in row["tasks"] if task in group]
        else:
            group = masks.get(key, {})
            units = [("general", "general", list(row["tasks"]), dict(group))] if group else []
        for task, kind, evaluated, unit_masks in units:
            metrics: dict[str, float] = {}
            values = [v for v in (task_accuracy(row, t, metric) for t in evaluated) if v is not None]
            for t in evaluated:
                value = task_accuracy(row, t, metric)
                if value is not None:
                    metrics[f"acc_{t}"] = value
            if values:
                metrics["accuracy"] = sum(values) / len(values)
            metrics.update(retention(row, dense, metric, evaluated))
            metrics.update(drops(row, dense, metric, evaluated))
            sized_by = {name: load_mask(path).meta.get(MASK_META) for name, path in unit_masks.items()} \
                if method in sized_rows else {}
            budgeted = [b for b in sized_by.values() if b]
            if budgeted:  # what it was sized by: the allowed drop (the largest of a bundle's masks), in points
                if all(b.get("allowed_drop") is not None for b in budgeted):  # (none with a speed target alone)
                    metrics["budget_drop"] = 100.0 * max(float(b["allowed_drop"]) for b in budgeted)
                if len(budgeted) == 1:  # one mask: its selection drop and its chosen sparsity
                    metrics["selection_drop"] = 100.0 * (float(budgeted[0]["selection_dense"])
                                                         - float(budgeted[0]["selection_accuracy"]))
                    sparsity = float(budgeted[0]["chosen_sparsity"])
            bench = speed_of(results, key, task if kind == "expert" else "general") or \
                speed_of(results, f"seap-general@{sparsity:g}", "general")
            if bench:
                metrics["prefill_speedup"] = bench["prefill_speedup"]
                metrics["decode_speedup"] = bench["decode_speedup"]
            realised = row["realised_sparsity"] if kind != "expert" else _realised(unit_masks[task])
            extra = {"routing": row.get("routing")} if kind == "routed" else {}
            if kind == "routed" and row.get("fallback"):  # (chosen on held-out tasks)
                extra["fallback"] = {k: v for k, v in row["fallback"].items() if k != "candidates"}
            if budgeted:
                extra["accuracy_budget"] = dict(budgeted[0]) if len(budgeted) == 1 else dict(sized_by)
            records.append(ExpertRecord(
                name=registered_name(model, task, kind), kind=kind, task=task, method=method, sparsity=sparsity,
                realised_sparsity=realised, score=score, schedule=schedule, base_model=model,
                base_fingerprint=fingerprint, masks={k: str(v) for k, v in unit_masks.items()}, metrics=metrics,
                router=str(router) if kind == "routed" else None, lm_eval_version=results.get("lm_eval_version"),
                data_fingerprint=results.get("data_fingerprint"), extra=extra))
    return records


def _realised(mask_dir: str | Path) -> float:
    from seap.maths.mask_formats import load_mask

    return load_mask(mask_dir).realised_sparsity()


def write_local_record(record: ExpertRecord, root: str | Path) -> Path:
    """Copy the record's masks (and router) and its JSON into ``root`` atomically; idempotent."""
    out = Path(root) / record.name / record.version_key()
    if (out / RECORD_FILE).exists():
        return out
    try:
        with atomic_directory(out) as tmp:
            stored = {}
            for name, path in record.masks.items():
                copy_artifact(path, tmp / "masks" / name)
                stored[name] = f"masks/{name}"
            data = record.to_json()
            data["masks"] = stored
            data["source_masks"] = record.masks
            if record.router:
                copy_artifact(record.router, tmp / "router")
                data["router"] = "router"
            data["version_key"] = out.name
            (tmp / RECORD_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except (SeapError, OSError):
        if (out / RECORD_FILE).exists():  # a concurrent registration of the same record won
            return out
        raise
    return out


def register_locally(records: Sequence[ExpertRecord], root: str | Path) -> list[Path]:
    """Write every record under ``root``; returns the record folders."""
    return [write_local_record(r, root) for r in records]


def resolve_tracking_uri(tracking_uri: str | None = None, local_dir: str | Path | None = None) -> str:
    """Where MLflow records go: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local
    sqlite database in ``local_dir`` (default ``runs/mlflow``): the embedded default, no server."""
    import os

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(local_dir or 'runs/mlflow').resolve() / 'mlflow.db'}"


def read_local_record(folder: str | Path) -> ExpertRecord:
    """One record folder, with mask and router paths resolved to its stored copies."""
    path = Path(folder) / RECORD_FILE
    data = read_json(path, "registry record")
    record = ExpertRecord.from_json(data)
    record.masks = {k: str(path.parent / v) for k, v in record.masks.items()}
    if record.router:
        record.router = str(path.parent / record.router)
    return record


def read_local_registry(root: str | Path) -> list[ExpertRecord]:
    """All records under ``root``, with mask and router paths resolved to their stored copies."""
    return [read_local_record(path.parent) for path in sorted(Path(root).glob(f"*/*/{RECORD_FILE}"))]


def check_registration(results_dir: str | Path, registry_dir: str | Path | None) -> list[ExpertRecord]:
    """What a registration needs, checked before MLflow is touched: a results folder with
    evaluated rows and (unless records are given, ``registry_dir`` None) a registry folder that
    holds records. Returns those records."""
    results = read_json(Path(results_dir) / "results.json", "pipeline results")
    if not isinstance(results, dict) or not results.get("rows"):
        raise SeapError(f"{results_dir}/results.json holds no evaluated rows",
                        "pass the results folder of a finished pipeline run (`seap eval`, the flow or dvc repro)")
    if registry_dir is None:
        return []
    if not Path(registry_dir).is_dir():
        raise SeapError(f"registry folder {registry_dir} does not exist",
                        "pass the folder the pipeline wrote (registry_dir, by default runs/registry)")
    records = read_local_registry(registry_dir)
    if not records:
        raise SeapError(f"registry folder {registry_dir} holds no registered experts",
                        "pass the folder the pipeline wrote (registry_dir, by default runs/registry)")
    return records


__all__ = ["ExpertRecord", "check_registration", "expert_records", "model_slug", "read_local_record", "read_local_registry", "register_locally",
           "registered_name", "resolve_tracking_uri", "write_local_record"]
