"""What a work folder holds, kept honest and bounded: entry records, run records, listing,
pruning and a size cap.

Every cached job output (``<workdir>/<stage>/<key>/``) gets a record beside it,
``<stage>/.<key>.entry.json``: the digest of its content when it was written, its size, its
job. A cache hit re-hashes the folder anyway (the digest is what later keys read), so the
record makes verification free: an entry whose content no longer matches is *corrupt* and is
rebuilt, never trusted. The record's modification time is the entry's last use.

Every run of a plan writes a run record, ``<workdir>/.runs/<stamp>-<pid>.json``: the entries it
used or built. The newest run's entries are what a re-run needs; :func:`prune` keeps them (and
entries in use by a live run) unless asked, and removes the rest oldest-used first, by age or
down to a size. :func:`enforce_cap` is the same eviction run by the executor after each job,
so a run under a size cap stays under it (outputs the rest of the run still reads are kept).

The registry folder is listed (:func:`registry_usage`) but never pruned here: a registered
version's files are its own (hard links of the work entries, so pruning the work folder
frees nothing they hold, and breaks nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_json
from seap.io import human_size as human  # (bytes as people read them; one definition)

ENTRY_SUFFIX = ".entry.json"  # (a sibling of each entry: .<key>.entry.json)
RUNS_DIR = ".runs"
UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str | int) -> int:
    """``"20G"`` -> bytes (K, M, G, T: powers of 1024; a plain number is bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise SeapError(f"cannot read the size {text!r}", "write a number with K, M, G or T after it, e.g. 20G")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def parse_age(text: str) -> float:
    """``"7d"`` -> seconds (s, m, h, d, w)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise SeapError(f"cannot read the age {text!r}", "write a number with s, m, h, d or w after it, e.g. 7d")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path``, a hard-linked file by its share (size over its link
    count: entries link each other's files, and a file on disk is counted once in a total)."""
    if path.is_file():
        st = path.stat()
        return st.st_size // max(st.st_nlink, 1)
    total = 0.0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += st.st_size / max(st.st_nlink, 1)
    return int(total)


def record_path(entry: Path) -> Path:
    """Where the record of the entry folder ``entry`` lives."""
    return entry.parent / f".{entry.name}{ENTRY_SUFFIX}"


def write_record(entry: Path, digest: str, job: str) -> None:
    """The record of a freshly written (or first verified) entry."""
    atomic_write_json(record_path(entry), {"digest": digest, "job": job, "bytes": folder_size(entry),
                                           "written": time.time()})


def check_entry(entry: Path, digest: str, job: str) -> bool:
    """Whether the entry's content (``digest``, just computed) is what was written. An entry
    without a record (older work folders) is recorded now and trusted. A good entry is marked
    used (its record's time)."""
    path = record_path(entry)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        with contextlib.suppress(OSError):  # (a read-only shared cache is still read)
            write_record(entry, digest, job)
        return True
    if record.get("digest") != digest:
        return False
    with contextlib.suppress(OSError):
        os.utime(path)
    return True


def discard_entry(entry: Path) -> None:
    """Remove an entry and its record: renamed aside first, so that a reader never sees half of it."""
    aside = entry.parent / f".{entry.name}.discarded-{os.getpid()}"
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)
    record_path(entry).unlink(missing_ok=True)


# -- run records -------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """The entries one run of a plan used or built (paths relative to the work folder)."""

    path: Path
    pid: int
    started: float
    entries: set[str] = field(default_factory=set)


class RunLog:
    """The run record of the plan being run, rewritten (atomically) as entries are used."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.started = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        self.path = self.workdir / RUNS_DIR / f"{stamp}-{os.getpid()}.json"
        self.entries: list[str] = []

    def used(self, entry: str | Path) -> None:
        rel = os.path.relpath(entry, self.workdir)
        if rel not in self.entries:
            self.entries.append(rel)
            atomic_write_json(self.path, {"pid": os.getpid(), "started": self.started, "entries": self.entries})


def run_records(workdir: Path) -> list[RunRecord]:
    """The work folder's run records, oldest first."""
    out = []
    for path in sorted((workdir / RUNS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        out.append(RunRecord(path, int(data.get("pid", 0)), float(data.get("started", 0)), set(data.get("entries", []))))
    return sorted(out, key=lambda r: (r.started, r.path.name))


def _alive(pid: int) -> bool:
    """Whether another process ``pid`` runs (this process's own run is governed by its ``keep``)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- listing -----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One cached output."""

    stage: str
    path: Path
    bytes: int
    last_used: float
    runs: list[str]  # the run records that list it (<stamp>-<pid>)
    newest: bool  # in the newest run's record
    live: bool  # in the record of a run still going

    @property
    def rel(self) -> str:
        return f"{self.stage}/{self.path.name}"


def entries(workdir: str | Path) -> list[Entry]:
    """Every cached output of the work folder, with its size, last use and the runs that used it."""
    root = Path(workdir)
    records = run_records(root)
    newest = records[-1].entries if records else set()
    live = set().union(*(r.entries for r in records if _alive(r.pid))) if records else set()
    out = []
    for stage in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        for path in sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rel = f"{stage.name}/{path.name}"
            record = record_path(path)
            size = folder_size(path)  # (now: links made since it was written change its share)
            try:
                used = record.stat().st_mtime
            except FileNotFoundError:
                used = path.stat().st_mtime
            out.append(Entry(stage.name, path, size, used, [r.path.stem for r in records if rel in r.entries],
                             rel in newest, rel in live))
    return out


def leftovers(workdir: str | Path) -> list[Path]:
    """Temporaries, partial builds and discarded entries of processes that are gone."""
    root = Path(workdir)
    found = []
    for stage in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        for path in stage.iterdir():
            match = re.search(r"\.(tmp-[^-]+-(\d+)-\w+|discarded-(\d+)|partial-(\d+)|unkeyed-\w+)$", path.name)
            if match:
                pid = int(match.group(2) or match.group(3) or match.group(4) or 0)
                if not _alive(pid) or match.group(0).startswith(".unkeyed"):
                    found.append(path)
            elif path.name.endswith((".partial", ".partial.lock")):  # a killed job's part (and its lock): kept
                entry = stage / path.name[1:].split(".partial")[0]                 # while its entry is unbuilt
                if entry.exists():
                    found.append(path)
            elif path.name.endswith(ENTRY_SUFFIX) and not (stage / path.name[1:-len(ENTRY_SUFFIX)]).exists():
                found.append(path)
    return found


def registry_usage(registry: str | Path) -> list[tuple[str, int]]:
    """(registered model/version folder, bytes) of a local registry folder."""
    root = Path(registry)
    if not root.is_dir():
        return []
    return [(f"{p.parent.name}/{p.name}", folder_size(p)) for p in sorted(root.glob("*/*")) if p.is_dir()]


def summary(workdir: str | Path) -> list[dict[str, Any]]:
    """Per stage: entries, bytes, last use, and how many the newest run used."""
    stages: dict[str, dict[str, Any]] = {}
    for e in entries(workdir):
        s = stages.setdefault(e.stage, {"stage": e.stage, "entries": 0, "bytes": 0, "last_used": 0.0, "newest_run": 0})
        s["entries"] += 1
        s["bytes"] += e.bytes
        s["last_used"] = max(s["last_used"], e.last_used)
        s["newest_run"] += e.newest
    return list(stages.values())


# -- pruning -----------------------------------------------------------------------------------------------
def _remove(found: Iterable[Path]) -> None:
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def prune(workdir: str | Path, max_size: int | None = None, older_than: float | None = None,
          include_newest: bool = False, keep: Iterable[str] = (), dry_run: bool = False) -> list[Entry]:
    """Remove cached outputs, least recently used first: every entry unused for ``older_than``
    seconds, then more until the work folder holds at most ``max_size`` bytes. Entries of the
    newest run (unless ``include_newest``), of runs still going and in ``keep`` (paths relative
    to the work folder) stay. Leftover temporaries of dead processes always go. Returns what
    was (or, ``dry_run``, would be) removed."""
    root = Path(workdir)
    if not dry_run:
        _remove(leftovers(root))
    found = entries(root)
    keep = set(keep)
    removable = sorted((e for e in found if not e.live and e.rel not in keep and (include_newest or not e.newest)),
                       key=lambda e: e.last_used)
    now, total = time.time(), sum(e.bytes for e in found)
    chosen: list[Entry] = []
    for e in removable:
        old = older_than is not None and now - e.last_used >= older_than
        big = max_size is not None and total > max_size
        if not (old or big):
            continue
        chosen.append(e)
        total -= e.bytes
    if not dry_run:
        for e in chosen:
            discard_entry(e.path)
        _forget(root, {e.rel for e in chosen})
    return chosen


def _forget(root: Path, removed: set[str]) -> None:
    """Drop removed entries from the run records, and records left with nothing (not the newest)."""
    if not removed:
        return
    records = run_records(root)
    for r in records:
        if r.entries & removed:
            left = sorted(r.entries - removed)
            if not left and r is not records[-1] and not _alive(r.pid):
                r.path.unlink(missing_ok=True)
            else:
                atomic_write_json(r.path, {"pid": r.pid, "started": r.started, "entries": left})


def enforce_cap(workdir: str | Path, cap: int, keep: Iterable[str]) -> tuple[int, list[Entry]]:
    """The executor's eviction: :func:`prune` down to ``cap`` bytes, this run's newest entries
    included except those in ``keep`` (what the rest of the run still reads). Returns the bytes
    left and what was evicted."""
    keep = set(keep)
    evicted: list[Entry] = []
    for _ in range(8):  # (removing an entry raises the share of files it linked with others: measure again)
        gone = prune(workdir, max_size=cap, include_newest=True, keep=keep)
        evicted += gone
        held = sum(e.bytes for e in entries(workdir))
        if held <= cap or not gone:
            return held, evicted
    return held, evicted


# -- free space before a run ---------------------------------------------------------------------------------
DEFAULT_FLOOR = "1G"  # the least free space a run starts with ($SEAP_MIN_FREE_DISK)
REFIT_SHARE = 0.3  # of a model's weights, what a refitted mask stores (attention output and MLP down projections)


def model_parameters(location: str) -> int | None:
    """The parameter count of a local safetensors model (a folder, or the cached conversion of an
    alias), read from the files' headers; None when it cannot be known without loading or
    fetching it."""
    from seap.io import cache_dir

    folder = Path(location)
    if not folder.is_dir():
        folder = cache_dir() / "models" / location
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def estimate_run_bytes(jobs: Iterable[Any], location: str, dtype: str) -> int | None:
    """A rough figure for what a plan's ``jobs`` write: each refitted mask about
    :data:`REFIT_SHARE` of the weights it keeps, each pruned checkpoint the weights it keeps;
    None when the model's size is unknown before it is fetched."""
    params = model_parameters(location)
    if params is None:
        return None
    width = 2 if dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    total = 0.0
    for job in jobs:
        at = re.search(r"@(\d+(?:\.\d+)?)", job.key)  # (row keys: seap-expert@0.2/geo, seap-expert@0.2:geo)
        kept = 1.0 - float(at.group(1)) if at else 1.0
        if job.stage == "refits" and job.name != "walk":
            total += REFIT_SHARE * params * width * kept
        elif job.stage == "checkpoint":
            total += params * width * kept
    return int(total + params * width * 0.05)  # (statistics, scores, masks, rows: small)


def check_space(jobs: Iterable[Any], workdir: str | Path, location: str, dtype: str,
                say: Any = None) -> tuple[int, int | None]:
    """Before a run: refuse when the work folder's disk has less than the floor free
    (``$SEAP_MIN_FREE_DISK``, default 1G), and warn when it has less than the run's estimate.
    Returns (free bytes, estimate)."""
    where = next((p for p in (Path(workdir).resolve(), *Path(workdir).resolve().parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    floor = parse_size(os.environ.get("SEAP_MIN_FREE_DISK") or DEFAULT_FLOOR)
    if free < floor:
        raise SeapError(f"only {human(free)} is free on the disk of the work folder {workdir}, below the floor of "
                        f"{human(floor)}",
                        "free space (`seap cache prune --max-size SIZE`), or point --workdir at a larger disk "
                        "($SEAP_MIN_FREE_DISK sets the floor)")
    estimate = estimate_run_bytes(jobs, location, dtype)
    if estimate is not None and free < estimate and say is not None:
        say(f"warning: this run may write about {human(estimate)} to {workdir}, and {human(free)} is free there; "
            "a cap (--cache-max-size) or `seap cache prune` keeps it bounded")
    return free, estimate


def iter_lines(workdir: str | Path, registry: str | Path | None = None) -> Iterator[str]:
    """``seap cache list``'s table."""
    rows = summary(workdir)
    total = sum(r["bytes"] for r in rows)
    yield f"work folder {workdir}: {human(total)} in {sum(r['entries'] for r in rows)} entries"
    yield f"{'stage':<18}{'entries':>8}{'size':>10}  {'last used':<17}{'newest run':>11}"
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        yield f"{r['stage']:<18}{r['entries']:>8}{human(r['bytes']):>10}  {used:<17}{r['newest_run']:>11}"
    stale = leftovers(workdir)
    if stale:
        yield f"leftovers of killed runs: {len(stale)} ({human(sum(folder_size(p) for p in stale))}); " \
              "`seap cache prune` removes them"
    if registry is not None:
        versions = registry_usage(registry)
        yield f"registry {registry}: {human(sum(b for _, b in versions))} in {len(versions)} versions " \
              "(never pruned here; files shared with the work folder are counted in both)"
        for name, size in sorted(versions, key=lambda v: -v[1])[:10]:
            yield f"  {name:<50}{human(size):>10}"


__all__ = ["DEFAULT_FLOOR", "check_space", "estimate_run_bytes", "model_parameters", "ENTRY_SUFFIX", "Entry", "RUNS_DIR", "RunLog", "RunRecord", "check_entry", "discard_entry",
           "enforce_cap", "entries", "folder_size", "human", "iter_lines", "leftovers", "parse_age", "parse_size",
           "prune", "record_path", "registry_usage", "run_records", "summary", "write_record"]
