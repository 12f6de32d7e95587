"""Tensor artifacts: a folder with one safetensors file and one JSON file of metadata.

Statistics, scores and masks share this layout. The JSON records the artifact's format
name and version, the SHA-256 of the tensors and the SHA-256 of the metadata itself (task,
model fingerprint, ...); reading verifies all four, so a truncated, edited or foreign file
fails with a clear error instead of a wrong result.

Large optional parts (the second moments of statistics) go into *sidecar* safetensors files
in a sub-folder, written one at a time (never all in memory) and read one at a time
(:func:`read_sidecar`, which verifies that file's checksum when it is opened).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from seap.errors import ArtifactError
from seap.io import atomic_directory, atomic_write_json, canonical_json, read_json, sha256_bytes, sha256_file
from seap.tensor_files import LazyTensors, Storable, TensorFile, TensorFileError, write_tensor_file

_RESERVED = ("format", "format_version", "tensors_sha256", "meta_sha256")  # (``sidecars`` stays: its owner reads it)
SIDECAR_DIR = "parts"
# a sidecar: tensors made on demand (only one sidecar in memory at a time), or a safetensors
# file written before (linked or copied in, never read into memory)
Sidecar = Union[Callable[[], dict[str, torch.Tensor]], Path]


@dataclass(frozen=True)
class ArtifactKind:
    """Names and version of one artifact type, and how to re-create it."""

    format: str  # e.g. "seap-mask"
    version: int
    tensors_file: str  # e.g. "mask.safetensors"
    meta_file: str  # e.g. "mask.json"
    remake: str  # the fix to print, e.g. "rebuild the mask with `seap masks`"


def _meta_sha256(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata as JSON stores it (bookkeeping keys excluded)."""
    stored = json.loads(json.dumps({k: v for k, v in meta.items() if k not in _RESERVED}, default=str))
    return sha256_bytes(canonical_json(stored).encode("utf-8"))


def _save(tensors: Mapping[str, Storable], file: Path) -> None:
    write_tensor_file(tensors, file)  # (one tensor at a time; a reference to another file is copied unread)


def write_artifact(kind: ArtifactKind, path: str | Path, tensors: Mapping[str, Storable], meta: dict[str, Any],
                   overwrite: bool = False, sidecars: Mapping[str, Sidecar] | None = None) -> Path:
    """Write ``tensors`` (tensors, or references to tensors of open files, copied unread) and
    ``meta`` into the folder ``path`` atomically, with each sidecar
    (name -> tensors made on demand, or an existing safetensors file) as ``parts/<name>.safetensors``."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _save(tensors, tmp / kind.tensors_file)
        checksums = {}
        if sidecars:
            (tmp / SIDECAR_DIR).mkdir()
            for name, part in sidecars.items():
                target = tmp / SIDECAR_DIR / f"{name}.safetensors"
                if isinstance(part, Path):
                    try:
                        os.link(part, target)  # same file system: no copy
                    except OSError:
                        shutil.copyfile(part, target)
                else:
                    _save(part(), target)
                checksums[name] = sha256_file(target)
        record = {**meta, "format": kind.format, "format_version": kind.version,
                  "tensors_sha256": sha256_file(tmp / kind.tensors_file)}
        if checksums:
            record["sidecars"] = checksums
        record["meta_sha256"] = _meta_sha256(record)
        atomic_write_json(tmp / kind.meta_file, record)
    return Path(path)


@dataclass(frozen=True)
class SidecarRef:
    """Where one sidecar of an artifact is and what its checksum must be."""

    file: Path
    sha256: str | None  # None: a private temporary file (not yet part of an artifact)
    kind: ArtifactKind


def sidecar_refs(kind: ArtifactKind, path: str | Path, meta_sidecars: Mapping[str, str] | None) -> dict[str, SidecarRef]:
    """The sidecars an artifact's metadata lists; each file must exist (checked now, read later)."""
    refs = {}
    for name, sha in (meta_sidecars or {}).items():
        file = Path(path) / SIDECAR_DIR / f"{name}.safetensors"
        if not file.is_file():
            raise ArtifactError(f"{file} is missing", kind.remake)
        refs[name] = SidecarRef(file, sha, kind)
    return refs


def read_sidecar(ref: SidecarRef) -> dict[str, torch.Tensor]:
    """One sidecar's tensors, its checksum verified first."""
    if ref.sha256 is not None and (not ref.file.is_file() or sha256_file(ref.file) != ref.sha256):
        raise ArtifactError(f"{ref.file} is missing or corrupt (checksum mismatch)", ref.kind.remake)
    try:
        return load_file(str(ref.file))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{ref.file} is corrupt ({exc})", ref.kind.remake) from exc


def read_artifact(kind: ArtifactKind, path: str | Path, lazy: bool = False
                  ) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """Read and verify an artifact folder; returns (tensors, metadata without the bookkeeping keys).
    ``lazy``: the tensors as a :class:`~seap.tensor_files.LazyTensors` over the verified file,
    each read when looked up (for artifacts as large as a model)."""
    p = Path(path)
    if p.is_dir() and not (p / kind.meta_file).is_file():
        from seap.io import own_output

        what = own_output(p)
        if what and what != "an empty folder":
            raise ArtifactError(f"{p} is {what}, not a {kind.format} folder", kind.remake)
    meta = read_json(p / kind.meta_file, f"{kind.format} metadata")
    if meta.get("format") != kind.format:
        raise ArtifactError(f"{p} is not a {kind.format} folder (format {meta.get('format')!r})", kind.remake)
    if meta.get("format_version") != kind.version:
        raise ArtifactError(
            f"{p} has {kind.format} format version {meta.get('format_version')}, this SEAP reads {kind.version}",
            kind.remake,
        )
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha256(meta):
        raise ArtifactError(f"{p / kind.meta_file} was edited: its metadata no longer matches its checksum",
                            kind.remake)
    tensor_file = p / kind.tensors_file
    corrupt = ArtifactError(f"{tensor_file} is missing or corrupt (checksum mismatch)", kind.remake)
    if lazy:  # (the checksum of the very file then read: its descriptor stays open)
        try:
            opened = TensorFile(tensor_file)
        except (OSError, TensorFileError):
            raise corrupt from None
        if opened.sha256() != meta.get("tensors_sha256"):
            raise corrupt
        return LazyTensors(opened), {k: v for k, v in meta.items() if k not in _RESERVED}
    if not tensor_file.is_file() or sha256_file(tensor_file) != meta.get("tensors_sha256"):
        raise corrupt
    try:
        tensors = load_file(str(tensor_file))
    except SafetensorError as exc:  # pragma: no cover - the checksum catches corruption first
        raise ArtifactError(f"{tensor_file} is corrupt ({exc})", kind.remake) from exc
    return tensors, {k: v for k, v in meta.items() if k not in _RESERVED}


def require(tensors: Mapping[str, torch.Tensor], key: str, kind: ArtifactKind) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"{kind.format} artifact lacks tensor {key!r}", kind.remake)
    return tensors[key]
