"""Atomic outputs: nothing half-written, nothing of a concurrent writer replaced."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seap.errors import SeapError
from seap.io import atomic_directory, remove_stale_temporaries


def test_failed_build_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writer_is_never_replaced(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(SeapError, match="already exists"), atomic_directory(target) as tmp:
        (tmp / "mine").write_text("mine")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_swaps_only_when_complete(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.json").write_text('{"format": "seap-mask"}')  # an output SEAP wrote
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_temporaries_of_killed_processes_are_removed(tmp_path) -> None:
    target = tmp_path / "out"
    code = ("import os, sys; from seap.io import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n    (tmp / 'half').write_text('x'); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1  # what a SIGKILL leaves behind
    with atomic_directory(tmp_path / "other") as tmp:  # a live temporary of another output is kept
        assert remove_stale_temporaries(target) == stale
        assert tmp.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_copy_artifact_links_files_and_copies_the_tree(tmp_path) -> None:
    from seap.io import copy_artifact

    source = tmp_path / "mask"
    (source / "parts").mkdir(parents=True)
    (source / "mask.json").write_text('{"format": "seap-mask"}')
    (source / "parts" / "a.safetensors").write_bytes(b"\0" * 64)
    target = copy_artifact(source, tmp_path / "registry" / "mask")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "mask.json", "parts", "parts/a.safetensors"]
    assert (target / "mask.json").read_text() == '{"format": "seap-mask"}'
    assert (target / "mask.json").stat().st_ino == (source / "mask.json").stat().st_ino  # same filesystem: a link
    with pytest.raises(FileExistsError):  # never merges into an existing folder
        copy_artifact(source, target)
