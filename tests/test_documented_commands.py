"""Every command the documentation shows is one that works: the commands in README.md and
docs/*.md code blocks are collected and each is checked the cheapest way that proves it.

* ``seap ...``: the whole command line parsed by the real parser (every option, value and
  sub-command as written);
* ``python -m flows.X ...``: parsed by that flow's own command line;
* ``dvc SUB ...``: ``dvc SUB --help`` answers (the sub-command exists in the pinned DVC);
* ``python scripts/X.py ...``: ``--help`` answers; ``bash X.sh``: the script exists.

A documented front door can then no longer break silently: renaming an option or a script
without the docs fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "console", "shell")


def documented_commands() -> list[tuple[str, int, list[str]]]:
    """(file, line, words) of every command line in a shell code block, env assignments and
    ``.venv/bin/`` dropped, continuations joined, comments cut."""
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        inside, start, pending = False, 0, ""
        for number, line in enumerate(lines, 1):
            fence = re.match(r"\s*```(\w*)", line)
            if fence:
                inside = not inside and fence.group(1) in SHELLS
                continue
            if not inside:
                continue
            if not pending:
                start = number
            text = line.strip()
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text, pending = pending + text, ""
            try:
                words = shlex.split(text, comments=True)
            except ValueError:
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words:
                words[0] = words[0].removeprefix(".venv/bin/")
                found.append((doc.relative_to(ROOT).as_posix(), start, words))
    return found


COMMANDS = documented_commands()


def _kind(words: list[str]) -> str | None:
    if words[0] == "seap":
        return "seap"
    if words[:2] == ["python", "-m"] and words[2].startswith("flows."):
        return "flow"
    if words[0] == "dvc" and len(words) > 1:
        return "dvc"
    if words[0] == "python" and len(words) > 1 and words[1].startswith("scripts/"):
        return "script"
    if words[0] == "bash" and len(words) > 1 and words[1].endswith(".sh"):
        return "shell"
    return None


CHECKED = [(f, n, w) for f, n, w in COMMANDS if _kind(w)]


def test_the_docs_show_the_front_doors() -> None:
    kinds = {_kind(w) for _, _, w in CHECKED}
    assert kinds >= {"seap", "flow", "dvc", "shell"} and len(CHECKED) >= 40, (kinds, len(CHECKED))


@pytest.mark.parametrize(("where", "line", "words"), [c for c in CHECKED if _kind(c[2]) in ("seap", "flow")],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_a_documented_command_line_parses(where: str, line: int, words: list[str]) -> None:
    import argparse

    if words[0] == "seap":
        from seap.cli import _attach_dashed_values, build_parser

        parser = build_parser()
        argv = _attach_dashed_values(words[1:])
    else:
        module = __import__(words[2], fromlist=["x"])
        parser = module.build_parser() if hasattr(module, "build_parser") else None
        if parser is None:  # flows.pipeline: its parse_args
            try:
                module.parse_args(words[3:])
            except SystemExit as exc:
                pytest.fail(f"{where}:{line}: {' '.join(words)} does not parse (exit {exc.code})")
            return
        argv = words[3:]
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{where}:{line}: {' '.join(words)} does not parse")
    except argparse.ArgumentError as exc:
        pytest.fail(f"{where}:{line}: {exc}")


def test_documented_dvc_sub_commands_and_scripts_exist() -> None:
    dvc = ROOT / ".venv" / "bin" / "dvc"
    subs = sorted({w[1] for _, _, w in CHECKED if _kind(w) == "dvc" and not w[1].startswith("-")})
    for sub in subs:
        done = subprocess.run([str(dvc), sub, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, f"dvc {sub}: {done.stderr[-300:]}"
    for where, line, words in CHECKED:
        if _kind(words) == "shell":
            assert (ROOT / words[1]).is_file() or words[1].startswith("/"), f"{where}:{line}: {words[1]} is missing"
        if _kind(words) == "script":
            script = ROOT / words[1]
            assert script.is_file(), f"{where}:{line}: {words[1]} is missing"
    scripts = sorted({w[1] for _, _, w in CHECKED if _kind(w) == "script" and w[1].endswith(".py")})
    for script in scripts:
        done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT,
                              timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, f"{script} --help: {done.stderr[-300:]}"
