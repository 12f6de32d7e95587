"""Tensor artifacts: a folder with one safetensors file and one JSON file of metadata.

Statistics, scores and masks share this layout. The JSON records the artifact's format
name and version and the SHA-256 of the tensors; reading verifies all three, so a
truncated, edited or foreign file fails with a clear error instead of a wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seap.errors import ArtifactError
from seap.io import atomic_directory, atomic_write_json, read_json, sha256_file

_RESERVED = ("format", "format_version", "tensors_sha256")


@dataclass(frozen=True)
class ArtifactKind:
    """Names and version of one artifact type, and how to re-create it."""

    format: str  # e.g. "seap-mask"
    version: int
    tensors_file: str  # e.g. "mask.safetensors"
    meta_file: str  # e.g. "mask.json"
    remake: str  # the fix to print, e.g. "rebuild the mask with `seap masks`"


def write_artifact(kind: ArtifactKind, path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``meta`` into the folder ``path`` atomically."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / kind.tensors_file))
        atomic_write_json(tmp / kind.meta_file, {
            **meta,
            "format": kind.format,
            "format_version": kind.version,
            "tensors_sha256": sha256_file(tmp / kind.tensors_file),
        })
    return Path(path)


def read_artifact(kind: ArtifactKind, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify an artifact folder; returns (tensors, metadata without the bookkeeping keys)."""
    p = Path(path)
    meta = read_json(p / kind.meta_file, f"{kind.format} metadata")
    if meta.get("format") != kind.format:
        raise ArtifactError(f"{p} is not a {kind.format} folder (format {meta.get('format')!r})", kind.remake)
    if meta.get("format_version") != kind.version:
        raise ArtifactError(
            f"{p} has {kind.format} format version {meta.get('format_version')}, this SEAP reads {kind.version}",
            kind.remake,
        )
    tensor_file = p / kind.tensors_file
    if not tensor_file.is_file() or sha256_file(tensor_file) != meta.get("tensors_sha256"):
        raise ArtifactError(f"{tensor_file} is missing or corrupt (checksum mismatch)", kind.remake)
    try:
        tensors = load_file(str(tensor_file))
    except SafetensorError as exc:  # pragma: no cover - the checksum catches corruption first
        raise ArtifactError(f"{tensor_file} is corrupt ({exc})", kind.remake) from exc
    return tensors, {k: v for k, v in meta.items() if k not in _RESERVED}


def require(tensors: dict[str, torch.Tensor], key: str, kind: ArtifactKind) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"{kind.format} artifact lacks tensor {key!r}", kind.remake)
    return tensors[key]
