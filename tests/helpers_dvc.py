"""Helpers for tests that run the real DVC and ``seap`` commands in a temporary git repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: dvc, seap, python

RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")


def dvc_env(pycache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of the subprocesses: the venv's ``dvc`` and ``seap`` first on PATH, no
    analytics, no network for Hugging Face. With ``pycache`` the stages share compiled bytecode
    in that folder (each stage is a new Python process) without writing into the venv."""
    env = dict(os.environ)
    # a tracking URI set by an earlier test (mlflow.set_tracking_uri exports it) must not leak in:
    # params.yaml leaves tracking_uri null, so the register stage uses the project's local store
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "CI": "1", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "GIT_TERMINAL_PROMPT": "0"})
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> str:
    """Run a command; returns stdout and stderr together, or fails the test showing them."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{output[-6000:]}")
    return output


def dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True) -> str:
    return run([str(BIN / "dvc"), *args], repo, env, check)


def init_repo(repo: Path, env: dict[str, str]) -> Path:
    """``git init`` (identity set locally) and ``dvc init``, analytics off."""
    repo.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], repo, env)
    run(["git", "config", "user.email", "tests@example.com"], repo, env)
    run(["git", "config", "user.name", "seap tests"], repo, env)
    dvc(repo, env, "init", "-q")
    dvc(repo, env, "config", "core.analytics", "false")
    return repo


def copy_pipeline(repo: Path) -> None:
    """The repository's real dvc.yaml and .dvcignore, and the seap sources its stages depend on."""
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(ROOT / ".dvcignore", repo / ".dvcignore")
    shutil.copytree(ROOT / "seap", repo / "seap", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "mlflow", repo / "mlflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "server"))


def tiny_params(model: Path, tasks: list[str], sparsities: list[float], **sections: dict[str, Any]) -> dict[str, Any]:
    """A complete params.yaml (DVC wants every key a stage tracks) for a tiny model: small corpora,
    4 evaluation items, one bench repeat, and the uniform schedule (tiny models have too few
    layers for the logistic one)."""
    from seap.run.config import default_params

    params = default_params()
    overrides: dict[str, dict[str, Any]] = {
        "model": {"name": str(model), "device": "cpu", "dtype": "float32"},
        "data": {"dir": "data", "tasks": tasks, "samples": 20},
        "masks": {"sparsities": sparsities, "schedule": "uniform"},
        "evaluate": {"limit": 4},
        "bench": {"repeats": 1},
        "register": {"dir": "registry", "mlflow_dir": "runs/mlflow"},
    }
    for name, values in {**overrides}.items():
        params[name].update(values)
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    return params


def write_params(repo: Path, params: dict[str, Any]) -> Path:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def stages_in(output: str) -> dict[str, set[str]]:
    """What ``dvc repro`` did per stage: ``ran``, ``skipped`` (unchanged) or ``restored`` (run cache)."""
    return {"ran": set(RUNNING.findall(output)), "skipped": set(SKIPPED.findall(output)),
            "restored": set(RESTORED.findall(output))}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
