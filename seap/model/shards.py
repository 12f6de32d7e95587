"""Safetensors checkpoints as files: the tensor names of one file or of shards listed by an
index (each file checked whole before any work), a tensor count read from the headers, and a
file written through a temporary so that no reader ever sees half of one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from seap.errors import ArtifactError, SeapError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PROGRESS_FILE = "progress.json"  # a resumable job's record of what it finished


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> file of a safetensors checkpoint (one ``model.safetensors``, or shards
    listed by ``model.safetensors.index.json``). Every file is opened once to check it is whole:
    a missing or truncated shard is refused by name before any work."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{index} is not a safetensors index ({exc})", "re-download or re-save the model") from None
        files = {name: folder / file for name, file in weight_map.items()}
    elif (folder / SINGLE_FILE).is_file():
        files = {}
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(found) != 1:
            raise ArtifactError(f"{folder} has no {SINGLE_FILE} and no {INDEX_FILE}" +
                                (f" ({len(found)} safetensors files: {', '.join(found[:4])})" if found else ""),
                                "pass a Hugging Face model folder with safetensors weights")
        files = {"": folder / found[0]}
    names: dict[str, Path] = {}
    for path in sorted(set(files.values()) or {folder / SINGLE_FILE}):
        if not path.is_file():
            raise ArtifactError(f"shard {path.name} of {folder} is missing", "re-download or re-save the model")
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"shard {path.name} of {folder} is unreadable or truncated ({exc})",
                                "re-download or re-save the model") from None
        for key in keys:
            names[key] = path
    listed = {n for n, p in files.items() if n}
    absent = sorted(listed - set(names))
    if absent:
        raise ArtifactError(f"{folder}: the index lists {len(absent)} tensor(s) its shards do not hold "
                            f"(e.g. {absent[0]} in {files[absent[0]].name})", "re-download or re-save the model")
    return names


def shard_parameter_count(folder: str | Path) -> int:
    """The number of parameters (tensor elements) in a safetensors checkpoint, read from its headers.
    (A tied head stored once counts once.)"""
    from safetensors import safe_open

    total = 0
    for path in sorted(set(checkpoint_files(folder).values())):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def write_safetensors(tensors: Mapping[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``file`` through a temporary file renamed into place, so a reader never
    sees half a file; a full or read-only disk is a clear error and leaves nothing behind."""
    import os

    from seap.tensor_files import write_tensor_file

    tmp = file.with_name(f".{file.name}.tmp")
    try:
        write_tensor_file(tensors, tmp, metadata)
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SeapError(f"cannot write {file}: {exc.strerror or exc}",
                        "free space there, or choose another work folder (--workdir) or --offload cpu") from None


__all__ = ["INDEX_FILE", "PROGRESS_FILE", "SINGLE_FILE", "checkpoint_files", "shard_parameter_count",
           "write_safetensors"]
