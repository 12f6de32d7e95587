"""Atomic file and directory writes, hashing and small JSON helpers.

Every artifact is written to a temporary sibling first and renamed into place, so a
crash or a concurrent writer never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seap.errors import ArtifactError, SeapError

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or malformed file into an :class:`ArtifactError`."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} not found: {p}", "check the path, or re-create the artifact")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{what} {p} is not valid JSON ({exc})", "the file is corrupt: delete it and re-create it"
        ) from exc


_HOST = socket.gethostname().replace("-", "_")[:32]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries of ``target`` left by killed processes on this host.

    A temporary is ``.<name>.tmp-<host>-<pid>-<random>``; it is stale when its process is
    gone. Temporaries of live processes (a concurrent run) and of other hosts are kept.
    """
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        parts = tmp.name.rsplit(".tmp-", 1)[-1].split("-")
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``path`` on success.

    On error the temporary directory is removed and ``path`` is left as it was. With
    ``overwrite`` an existing ``path`` is replaced only once the new one is complete;
    the old content is moved aside first and deleted last, so nothing is lost if the
    swap is interrupted.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise SeapError(f"output {target} already exists", "choose another path, or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise SeapError(f"output {target} exists and is not a directory", "choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        if not overwrite:  # created meanwhile by a concurrent writer: keep theirs, never replace it
            shutil.rmtree(tmp, ignore_errors=True)
            raise SeapError(f"output {target} already exists (written concurrently)",
                            "choose another path, or pass --overwrite")
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_once(path: str | os.PathLike[str], build: Callable[[Path], None]) -> bool:
    """Create the folder ``path`` once: ``build(out)`` fills a fresh folder ``out`` (which it
    creates) inside a temporary sibling, then ``out`` is renamed to ``path``.

    An existing ``path`` is never replaced: if a concurrent writer finished it first, this
    build is discarded and ``False`` is returned (same inputs, same content). On error nothing
    is left behind. Temporaries of killed processes are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        out = tmp / "out"
        build(out)
        if not out.exists():
            raise SeapError(f"nothing was written for {target}", "this is a bug: the stage wrote no output")
        if target.exists():
            return False
        try:
            os.rename(out, target)
        except OSError:
            if target.exists():  # lost the race to a concurrent writer
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def redact_uri(text: str) -> str:
    """``text`` with the credentials of any URI in it hidden (``postgresql://u:p@h`` -> ``postgresql://***@h``)."""
    import re

    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(text))


def short_hash(digest: str, n: int = 12) -> str:
    """A short display form of a hex digest (``sha256:`` prefix removed)."""
    return digest.split(":", 1)[-1][:n]
