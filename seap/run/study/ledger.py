"""The study's ledger of finished runs: ``<out>/results/study-runs/``, one small JSON file per
run (its configuration, results, per-item correctness and KL, the code digest and commit it was
measured with), so a study resumes on another machine, where the work folder is gone, from the
runs a previous machine finished.

An entry is named ``<run name>-<digest>.json``, the digest being that of
:func:`ledger_material` (what the run's numbers depend on); it is reused only when its format
and material match the run asked for."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_json, read_json
from seap.run.config import RunConfig
from seap.run.methods import row_key


@dataclass
class StudyRun:
    """One finished run of the study (measured now, or read from the ledger): its configuration,
    its results (``results.json``), each row's per-item correctness and each mask row's KL."""

    name: str
    config: RunConfig
    results: dict[str, Any]
    items: dict[str, dict[str, dict[int, float]]]  # row -> task -> item -> correctness
    kl: dict[str, Any] = field(default_factory=dict)  # row -> {"tasks": ..., "mean": ...}
    measured: dict[str, Any] = field(default_factory=dict)  # code digest, commit, seconds, date
    reused: bool = False  # read from the ledger

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """Row key (``method@sparsity``, or dense) -> that row of the results."""
        return {row_key(r["method"], r["sparsity"]): r for r in self.results["rows"]}


LEDGER_FORMAT = "seap-study-run/1"
# RunConfig fields that do not change a run's numbers (where outputs go, what is registered, speed)
_LEDGER_IGNORES = ("workdir", "out", "registry_dir", "mlflow", "tracking_uri", "mlflow_dir", "experiment", "bench",
                   "bench_repeats", "bench_llama_cpp", "dask_workers", "dask_address", "stats_shards", "cache_max_size")
# options added after the ledger began, at the value that computes what the code did before they
# existed: left out of the material, so an entry measured before them still matches (a run at
# another value, such as the product's default widths, does not)
_LEDGER_NEUTRAL: dict[str, Any] = {"unit": "auto", "router_kind": "features", "allow_k_reduction": False,
                                   "expert_score": "tcess", "channel_multiple": 1, "same_width": False,
                                   "general_weights": {}}


def _without_neutral(material: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in material.items() if not (k in _LEDGER_NEUTRAL and v == _LEDGER_NEUTRAL[k])}


def ledger_material(config: RunConfig, kl_texts: int) -> dict[str, Any]:
    """What a run's numbers depend on, as the ledger matches it: every configuration field but
    output locations and registration, the data folder by its content, and the KL texts."""
    from seap.contenthash import tree_digest

    values = {k: v for k, v in config.to_dict().items() if k not in _LEDGER_IGNORES}
    if values.get("data_dir"):
        values["data_dir"] = {"digest": tree_digest(values["data_dir"])}
    values["kl_texts"] = kl_texts
    return _without_neutral(json.loads(json.dumps(values, sort_keys=True, default=str)))


def ledger_path(ledger_dir: Path, name: str, material: Mapping[str, Any]) -> Path:
    """The entry of the run ``name`` with ``material`` (:func:`ledger_material`) in ``ledger_dir``."""
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return ledger_dir / f"{name}-{digest}.json"


def _code_version() -> dict[str, Any]:
    """The digest of every stage's source and, in a git checkout, the commit (with ``+changes``
    when ``seap/`` has uncommitted changes)."""
    import subprocess
    from seap.contenthash import code_digest
    from seap.run.plan import STAGES

    run_folder, package = Path(__file__).parents[1], Path(__file__).parents[2]  # seap/run and seap
    version: dict[str, Any] = {"code": code_digest(m for s in STAGES.values() for m in s.modules)[:16]}
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=run_folder,
                               capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package,
                               capture_output=True, text=True, timeout=10)
        if found.returncode == 0:
            version["commit"] = found.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def measurement_stamp(started: float) -> dict[str, Any]:
    """How a run measured now was measured: the code digest and commit, the seconds since
    ``started`` (a :func:`time.perf_counter` reading) and the date."""
    return {**_code_version(), "seconds": round(time.perf_counter() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def encode_correctness(values: Mapping[int, float]) -> dict[str, Any]:
    """Per-item correctness, compact: a string of 0/1 digits in item order (a list when a
    value is fractional), with the item ids unless they are 0..n-1."""
    ids = sorted(values)
    scores = [values[i] for i in ids]
    out: dict[str, Any] = {"values": "".join(str(int(v)) for v in scores) if all(v in (0.0, 1.0) for v in scores)
                           else scores}
    if ids != list(range(len(ids))):
        out["ids"] = ids
    return out


def decode_correctness(data: Mapping[str, Any]) -> dict[int, float]:
    """The inverse of :func:`encode_correctness`."""
    raw = data["values"]
    scores = [float(c) for c in raw] if isinstance(raw, str) else [float(v) for v in raw]
    ids = data.get("ids", range(len(scores)))
    if len(ids) != len(scores):
        raise SeapError("a study ledger entry has per-item values that do not match its item ids",
                        "delete that entry (it will be measured again)")
    return dict(zip(ids, scores))


def read_entry(path: Path, name: str, config: RunConfig, material: Mapping[str, Any]) -> StudyRun | None:
    """The run ``name`` of ``config`` as the ledger entry at ``path`` holds it, or None when
    there is no entry there, or one of another format or another :func:`ledger_material`."""
    if not path.is_file():
        return None
    entry = read_json(path, "study ledger entry")
    if entry.get("format") != LEDGER_FORMAT or _without_neutral(entry.get("material") or {}) != material:
        return None
    items = {row: {task: decode_correctness(v) for task, v in tasks.items()} for row, tasks in entry["items"].items()}
    return StudyRun(name, config, entry["results"], items, entry.get("kl", {}), entry["measured"], True)


def write_entry(path: Path, run: StudyRun, material: Mapping[str, Any]) -> None:
    """Write the finished ``run``, whose :func:`ledger_material` is ``material``, to ``path``."""
    atomic_write_json(path, {"format": LEDGER_FORMAT, "name": run.name, "material": material,
                             "measured": run.measured, "results": run.results, "kl": run.kl,
                             "items": {row: {task: encode_correctness(v) for task, v in tasks.items()}
                                       for row, tasks in run.items.items()}})


__all__ = ["LEDGER_FORMAT", "StudyRun", "decode_correctness", "encode_correctness", "ledger_material", "ledger_path",
           "measurement_stamp", "read_entry", "write_entry"]
