"""Safetensors files read and written one tensor at a time.

:func:`save_file` of the ``safetensors`` package turns every tensor into bytes before it
writes any, and its memory-mapped reader keeps each page it touched resident while the file
is open. For artifacts as large as a model (refitted weights of every layer) both hold the
whole file in memory. This module does neither:

* :class:`TensorFile` opens a safetensors file once (its descriptor keeps the contents even
  if the path is later replaced or removed), parses the header, and reads one tensor at a
  time with positional reads into memory of its own;
* :class:`LazyTensors` is a read-only mapping over (a prefix of) such a file whose values are
  read when looked up, so a model-sized artifact can be passed around while only the tensor
  in use is in memory; :class:`TensorRef` names one tensor of a file without reading it;
* :func:`write_tensor_file` writes tensors, or references to tensors of other files (copied
  in chunks, never decoded), one at a time. Its bytes are exactly those of ``save_file``
  (same header, order and padding; metadata keys sorted).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

CHUNK = 64 * 1024 * 1024  # bytes per read or write of a large tensor

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# the order in which safetensors lays out tensors: by dtype, in this order, then by name
_LAYOUT = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3",
           "F8_E5M2", "I8", "U8", "F6_E3M2", "F6_E2M3", "F4", "BOOL")


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file (truncated, or not one at all)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class TensorFile:
    """One safetensors file, open for reading tensor by tensor (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise TensorFileError(f"{self.path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise TensorFileError(f"{self.path}: its header runs past the end of the file (truncated)")
        try:
            header = json.loads(os.pread(fd, length, 8))
        except ValueError as exc:
            raise TensorFileError(f"{self.path}: its header is not JSON ({exc})") from None
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        base = 8 + length
        self._info: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                start, end = entry["data_offsets"]
                info = TensorInfo(dtype, tuple(int(s) for s in entry["shape"]), base + int(start), base + int(end))
            except (KeyError, TypeError, ValueError):
                raise TensorFileError(f"{self.path}: tensor {name!r} has an unreadable entry {entry}") from None
            if info.end > size:
                raise TensorFileError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated)")
            self._info[name] = info

    def __reduce__(self) -> tuple[Any, ...]:  # (another process opens the path again)
        return (TensorFile, (self.path,))

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def _read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:done + CHUNK]], offset + done)
            if got <= 0:
                raise TensorFileError(f"{self.path} ended early (truncated)")
            done += got

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read now into memory of its own."""
        info = self._info[name]
        buffer = bytearray(info.end - info.start)
        self._read_into(memoryview(buffer), info.start)
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def copy_bytes(self, name: str, out: Any) -> None:
        """Write tensor ``name``'s raw bytes to the binary file ``out``, a chunk at a time."""
        info = self._info[name]
        offset = info.start
        while offset < info.end:
            chunk = os.pread(self._fd, min(CHUNK, info.end - offset), offset)
            if not chunk:
                raise TensorFileError(f"{self.path} ended early (truncated)")
            out.write(chunk)
            offset += len(chunk)

    def sha256(self) -> str:
        """SHA-256 of the whole file as opened (the same bytes every read sees)."""
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(self._fd, CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    def close(self) -> None:
        self._closer()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of an open :class:`TensorFile`, not read yet."""

    file: TensorFile
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.file.info(self.name).dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.info(self.name).shape

    def load(self) -> torch.Tensor:
        return self.file.get(self.name)


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of ``file`` whose names start with ``prefix`` (keys without it), each read
    when looked up: a mapping as large as the file that holds one tensor at a time."""

    def __init__(self, file: TensorFile, prefix: str = "", names: list[str] | None = None) -> None:
        self.file, self.prefix = file, prefix
        self._names = names if names is not None else [k[len(prefix):] for k in file.keys() if k.startswith(prefix)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.file.get(self.prefix + name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def ref(self, name: str) -> TensorRef:
        if name not in self._names:
            raise KeyError(name)
        return TensorRef(self.file, self.prefix + name)

    def view(self, prefix: str, names: list[str] | None = None) -> LazyTensors:
        """The tensors under ``prefix`` (within this view), keys without it; ``names``: only those."""
        inner = [k[len(prefix):] for k in self._names if k.startswith(prefix)]
        if names is not None:
            inner = [k for k in inner if k in names]
        return LazyTensors(self.file, self.prefix + prefix, inner)

    @classmethod
    def open(cls, path: str | Path) -> LazyTensors:
        return cls(TensorFile(path))


def subset(tensors: Mapping[str, torch.Tensor], prefix: str, names: list[str] | None = None
           ) -> Mapping[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix`` (keys without it; ``names``: only those),
    still unread when ``tensors`` is a :class:`LazyTensors`."""
    if isinstance(tensors, LazyTensors):
        return tensors.view(prefix, names)
    return {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and (names is None or k[len(prefix):] in names)}


Storable = Union[torch.Tensor, TensorRef]


def stored(tensors: Mapping[str, torch.Tensor], name: str) -> Storable:
    """``tensors[name]`` to hand to :func:`write_tensor_file`: a reference when it is still
    unread in a file, so that it is copied without being read into memory."""
    return tensors.ref(name) if isinstance(tensors, LazyTensors) else tensors[name]


def _layout(tensors: Mapping[str, Storable]) -> list[tuple[str, str, tuple[int, ...], int]]:
    entries = []
    for name, value in tensors.items():
        dtype, shape = value.dtype, tuple(value.shape)
        if dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        count = 1
        for s in shape:
            count *= s
        entries.append((name, _NAMES[dtype], shape, count * torch.empty((), dtype=dtype).element_size()))
    entries.sort(key=lambda e: (_LAYOUT.index(e[1]), e[0]))
    return entries


def write_tensor_file(tensors: Mapping[str, Storable], path: str | Path, metadata: Mapping[str, str] | None = None
                      ) -> None:
    """Write ``tensors`` (tensors, or :class:`TensorRef` to tensors of other files) to ``path`` in
    the safetensors format, one at a time; the bytes equal those of ``safetensors.torch.save_file``.
    The caller makes it atomic (a temporary name renamed into place)."""
    entries = _layout(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, _dtype, _shape, size in entries:
            value = tensors[name] if not isinstance(tensors, LazyTensors) else tensors.ref(name)
            if isinstance(value, TensorRef):
                value.file.copy_bytes(value.name, out)
                continue
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                out.write(flat.view(torch.uint8).numpy().data)


__all__ = ["LazyTensors", "Storable", "TensorFile", "TensorFileError", "TensorInfo", "TensorRef", "stored", "subset",
           "write_tensor_file"]
