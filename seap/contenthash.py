"""Content hashes for caching pipeline stages: of files, folders, code and parameters.

A stage's cache key is the hash of its name, its parameters, the content of its input
files and folders, and the source code of the library modules it runs. Equal keys mean
equal outputs, so outputs can be stored under their key and reused across processes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from seap.io import canonical_json, sha256_file


def tree_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, sorted).

    Hidden entries (``.name``), e.g. temporary files of an unfinished write, are ignored.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"cannot hash {p}: no such file or folder")
    h = hashlib.sha256()
    for file in sorted(f for f in p.rglob("*") if f.is_file()):
        rel = file.relative_to(p)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0" + sha256_file(file).encode() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def module_digest(module: str) -> str:
    """The source of a module; of a package, of every module in its folder (its ``__init__``
    alone would leave the modules it holds out of the key)."""
    loaded = importlib.import_module(module)
    if not hasattr(loaded, "__path__"):
        return hashlib.sha256(inspect.getsource(loaded).encode()).hexdigest()
    h = hashlib.sha256()
    for folder in loaded.__path__:
        for path in sorted(Path(folder).rglob("*.py")):
            h.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return h.hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """Hash of the source of the given modules (e.g. ``["seap.model.calibration", "seap.maths.moments"]``)."""
    h = hashlib.sha256()
    for module in sorted(set(modules)):
        h.update(f"{module}:{module_digest(module)}".encode())
    return h.hexdigest()


def stage_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, str | Path] | None = None,
              modules: Iterable[str] = ()) -> str:
    """The cache key of a stage run: name, parameters, input contents and code."""
    h = hashlib.sha256(stage.encode() + b"\0")
    h.update(canonical_json(dict(params)).encode())
    for name, path in sorted((inputs or {}).items()):
        h.update(f"\0{name}={tree_digest(path)}".encode())
    h.update(b"\0" + code_digest(modules).encode())
    return f"{stage}-{h.hexdigest()[:24]}"
