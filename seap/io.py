"""Atomic file and directory writes, hashing and small JSON helpers.

Every artifact is written to a temporary sibling first and renamed into place, so a
crash or a concurrent writer never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from seap.errors import ArtifactError, DiskFullError, SeapError

_UMASK = os.umask(0)
os.umask(_UMASK)
_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is reached",
             errno.EFBIG: "a file passed the file-size limit"}
_NO_SPACE_TEXT = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("code: 28", errno.ENOSPC),
                  ("Disk quota exceeded", errno.EDQUOT), ("File too large", errno.EFBIG), ("os error 27", errno.EFBIG),
                  ("code: 27", errno.EFBIG))


def _space_errno(exc: BaseException) -> int | None:
    """The errno of an out-of-space failure, however the writer reports it (an ``OSError``;
    safetensors' and torch's own errors carry the OS message in their text); else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return seen.errno
        text = str(seen)
        for needle, number in _NO_SPACE_TEXT:
            if needle in text:
                return number
        seen = seen.__cause__ or seen.__context__
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_full(exc: BaseException, target: str | os.PathLike[str], written: int) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``target``, what was written before the failure (so at
    least that much more is needed) and the space left, when ``exc`` is an out-of-space failure."""
    number = _space_errno(exc)
    if number is None:
        return None
    target = Path(target)
    where = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    what = _NO_SPACE[number]
    if number == errno.EFBIG:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        what += f" (ulimit -f: {'unlimited' if limit == resource.RLIM_INFINITY else human_size(limit)})"
    return DiskFullError(
        f"{what} while writing {target}: {human_size(written)} were written before it stopped, so it needs more "
        f"than that ({human_size(free)} free there); nothing partial was kept",
        "free space (`seap cache prune --max-size SIZE` removes old work outputs), raise the limit, or write to a "
        "larger disk (--out, --workdir); then run the same command again: it resumes from what finished")


def human_size(size: float) -> str:
    """Bytes as people read them (1.5G)."""
    for unit in ("B", "K", "M", "G"):
        if abs(size) < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = disk_full(exc, target, len(data))
        if full is not None:
            raise full from None
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


def cache_dir() -> Path:
    """SEAP's cache folder: ``$SEAP_CACHE_DIR`` or ``~/.cache/seap`` (converted and downloaded
    models, generated task files, the llama.cpp build)."""
    return Path(os.environ.get("SEAP_CACHE_DIR") or Path.home() / ".cache" / "seap")


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
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            removed.append(tmp)
    return removed


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()  # (symlinks too: a link to an input is that input)


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def own_output(path: str | os.PathLike[str]) -> str | None:
    """What SEAP output ``path`` is (``"a SEAP corpus"``, ``"a seap-mask artifact"``, ...), or None
    when it is not one this tool wrote (recognised by its own metadata, never by its name)."""
    p = Path(path)
    if p.is_file():
        try:
            with open(p, encoding="utf-8") as handle:
                first = handle.readline(1 << 16)
            if "seap_corpus" in json.loads(first):
                return "a SEAP corpus"
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            return None
        return None
    if not p.is_dir():
        return None
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    if not entries:
        return "an empty folder"
    for meta in p.glob("*.json"):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict):
            fmt = data.get("format")
            if isinstance(fmt, str) and fmt.startswith("seap-"):
                return f"a {fmt} artifact"
            if meta.name == "config.json" and "seap_pruning" in data:
                return "a SEAP pruned model"
            if meta.name == "config.json" and "seap_export" in data:
                return "a SEAP stock-transformers export"
    if all(e.is_dir() and own_output(e) not in (None, "an empty folder") for e in entries):
        return "a folder of SEAP outputs"
    return None


def check_output(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str] | None] = (),
                 overwrite: bool = False, file: bool = False,
                 recognise: Callable[[Path], str | None] | None = None) -> Path:
    """Refuse an output that would lose data, before any work is done.

    * never the working folder, one of its parents, or the home folder;
    * never one of the same command's ``inputs``, a folder holding one, or a path inside one
      (with or without ``overwrite``);
    * an existing output only with ``overwrite``, and only when this tool wrote it
      (:func:`own_output`, or the caller's ``recognise``); anything else is described and left alone;
    * a ``file`` output must not be a folder (and a folder output not a file), and its
      location must be creatable and writable.
    """
    target = _resolved(out)
    cwd = Path.cwd().resolve()
    if _is_within(cwd, target) or target == _resolved("~"):
        raise SeapError(f"--out {out} is the working folder, one of its parents or the home folder; "
                        "writing there would replace everything in it", "pass a new path for --out")
    for item in inputs:
        if item is None or not str(item) or "://" in str(item):
            continue
        source = _resolved(item)
        if _is_within(source, target) or _is_within(target, source):
            raise SeapError(f"--out {out} {'is' if source == target else 'overlaps'} the input {item}; "
                            "a command never writes over its own input", "pass another path for --out")
    if target.exists():
        if file and target.is_dir():
            raise SeapError(f"--out {out} is a folder, and this command writes a file",
                            "pass a file path for --out, e.g. " + str(Path(out) / "corpus.jsonl"))
        if not file and not target.is_dir():
            raise SeapError(f"--out {out} is a file, and this command writes a folder", "pass a folder path for --out")
        what = own_output(target) or (recognise(target) if recognise else None)
        if not overwrite:
            raise SeapError(f"output {out} already exists ({what or 'not written by SEAP'})",
                            "choose another --out, or pass --overwrite to replace it" if what
                            else "choose another --out")
        if what is None:
            listing = sorted(e.name for e in target.iterdir())[:5] if target.is_dir() else []
            raise SeapError(f"--overwrite only replaces outputs SEAP wrote, and {out} is not one"
                            + (f" (it holds {', '.join(listing)}{', ...' if len(listing) == 5 else ''})" if listing else ""),
                            "choose another --out; move or delete that path yourself if it is really to go")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SeapError(f"cannot create --out {out}: {parent} is a file", "pass a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SeapError(f"cannot write --out {out}: {parent} is not writable", "pass a path in a writable folder")
    return target


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False,
                     inputs: Sequence[str | os.PathLike[str] | None] = (), replace_foreign: bool = False,
                     recognise: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``path`` on success.

    On error the temporary directory is removed and ``path`` is left as it was. With
    ``overwrite`` an existing ``path`` is replaced only once the new one is complete, and
    only if SEAP wrote it (:func:`check_output`; ``replace_foreign`` for folders the caller
    owns by construction); the old content is moved aside first and deleted last, so nothing
    is lost if the swap is interrupted. Files are given the permissions the user's umask says.
    """
    target = Path(path)
    if replace_foreign:
        if target.exists() and not overwrite:
            raise SeapError(f"output {target} already exists", "choose another path, or pass --overwrite")
    else:
        check_output(target, inputs, overwrite, recognise=recognise)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as exc:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(exc, target, written)
        if full is not None:
            raise full from None
        raise
    _umask_permissions(tmp)
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False,
                inputs: Sequence[str | os.PathLike[str] | None] = (),
                recognise: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """A temporary sibling path for a large file that a writer fills; renamed to ``path`` on
    success, removed on error. An existing ``path`` is replaced only with ``overwrite`` and
    only when SEAP wrote it (:func:`check_output` with ``recognise``)."""
    target = check_output(path, inputs, overwrite, file=True, recognise=recognise)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.is_file():
            raise SeapError(f"nothing was written for {target}", "this is a bug: the writer wrote no file")
        os.chmod(tmp, 0o666 & ~_UMASK)
        if target.exists() and not overwrite:  # created meanwhile by a concurrent writer: keep theirs
            raise SeapError(f"output {target} already exists (written concurrently)",
                            "choose another path, or pass --overwrite")
        os.replace(tmp, target)
    except BaseException as exc:
        full = disk_full(exc, target, _size(tmp))
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full is not None:
            raise full from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask_permissions(folder: Path) -> None:
    """Files and folders under ``folder`` as the user's umask says (some writers, e.g.
    safetensors, create their files 0600, which breaks a team's shared folder)."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_UMASK)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~_UMASK)


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
        if out.is_dir():
            _umask_permissions(out)
        if target.exists():
            return False
        try:
            os.rename(out, target)
        except OSError:
            if target.exists():  # lost the race to a concurrent writer
                return False
            raise
        return True
    except BaseException as exc:
        full = disk_full(exc, target, _size(tmp))
        if full is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_artifact(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy the artifact folder ``source`` to ``target`` (which must not exist), hard-linking
    each file where both are on one filesystem. Artifacts are written once (atomically) and
    never changed in place, and every read checks their checksums, so a link is as safe as a
    copy and costs neither the time nor the space of a refitted expert's weights."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed: a plain copy
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return Path(target)


def redact_uri(text: str) -> str:
    """``text`` with the credentials of any URI in it hidden (``postgresql://u:p@h`` -> ``postgresql://***@h``)."""
    import re

    return re.sub(r"(?<=://)[^/@\s]+@", "***@", str(text))


def short_hash(digest: str, n: int = 12) -> str:
    """A short display form of a hex digest (``sha256:`` prefix removed)."""
    return digest.split(":", 1)[-1][:n]
