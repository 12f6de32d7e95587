"""Running GGUF exports in a real, unmodified llama.cpp: next-token logits, greedy generation
and llama.cpp's own speed benchmark.

The build comes from ``scripts/build_llama_cpp.sh`` (a pinned llama.cpp release, built once
and cached); :func:`find_llama_cpp` finds it from ``$SEAP_LLAMA_CPP`` or the cache folder.
The logits go through the llama_cpp Python binding of the same release (ctypes over the
built ``libllama``); the speed through ``llama-bench``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seap.errors import SeapError
from seap.io import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the release scripts/build_llama_cpp.sh builds
BUILD_COMMAND = "bash scripts/build_llama_cpp.sh"


@dataclass(frozen=True)
class LlamaCppBuild:
    """A llama.cpp build laid out by ``scripts/build_llama_cpp.sh``."""

    root: Path
    version: str
    lib_path: Path
    bin_dir: Path
    python_path: Path

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"

    def describe(self) -> str:
        commit = (self.root / "COMMIT").read_text().strip()[:12] if (self.root / "COMMIT").is_file() else "?"
        return f"llama.cpp {commit} (from llama-cpp-python {self.version})"


def find_llama_cpp(location: str | os.PathLike[str] | None = None) -> LlamaCppBuild | None:
    """The llama.cpp build at ``location``, ``$SEAP_LLAMA_CPP`` or the cache folder; ``None`` if there is none."""
    root = Path(location or os.environ.get("SEAP_LLAMA_CPP") or cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION)
    env_file = root / "ENV"
    if not env_file.is_file():
        return None
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    build = LlamaCppBuild(root, env.get("LLAMA_CPP_VERSION", "?"), Path(env["LLAMA_CPP_LIB_PATH"]),
                          Path(env["LLAMA_CPP_BIN"]), Path(env["LLAMA_CPP_PYTHON"]))
    if not (build.lib_path / "libllama.so").exists() and not any(build.lib_path.glob("libllama.*")):
        return None
    return build


def require_llama_cpp(location: str | os.PathLike[str] | None = None) -> LlamaCppBuild:
    build = find_llama_cpp(location)
    if build is None:
        raise SeapError("no llama.cpp build found" + (f" at {location}" if location else ""),
                        f"build the pinned release once with `{BUILD_COMMAND}` (about 10 minutes), "
                        "or point --llama-cpp / SEAP_LLAMA_CPP at a build folder it made")
    return build


def _binding(build: LlamaCppBuild) -> Any:
    """The llama_cpp module of the build (its library path set before the first import)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.lib_path)
    if str(build.python_path) not in sys.path:
        sys.path.insert(0, str(build.python_path))
    return importlib.import_module("llama_cpp")


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp (CPU), evaluated on token ids."""

    def __init__(self, build: LlamaCppBuild, gguf_path: str | os.PathLike[str], n_ctx: int = 512,
                 threads: int | None = None) -> None:
        binding = _binding(build)
        self.llm = binding.Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, n_gpu_layers=0,
                                 n_threads=threads or os.cpu_count(), n_batch=n_ctx, verbose=False)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after every position, ``[len(token_ids), vocab]`` (float32)."""
        self.llm.reset()
        self.llm.eval(list(token_ids))
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def greedy(self, token_ids: Sequence[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy tokens after the prompt (the argmax of the logits, no sampling)."""
        self.llm.reset()
        self.llm.eval(list(token_ids))
        out: list[int] = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


@contextlib.contextmanager
def llama_cpp_model(build: LlamaCppBuild, gguf_path: str | os.PathLike[str], n_ctx: int = 512,
                    threads: int | None = None) -> Iterator[LlamaCppModel]:
    model = LlamaCppModel(build, gguf_path, n_ctx, threads)
    try:
        yield model
    finally:
        model.close()


def llama_bench(build: LlamaCppBuild, gguf_paths: Sequence[str | os.PathLike[str]], prompt_tokens: int = 128,
                gen_tokens: int = 32, repetitions: int = 5, threads: int | None = None) -> list[dict[str, Any]]:
    """llama.cpp's ``llama-bench`` over all files in one run (it interleaves nothing: each file's tests
    run back to back); per file: prompt-processing and generation tokens/s (mean and spread)."""
    if not build.bench.exists():
        raise SeapError(f"{build.bench} is missing", f"rebuild with `{BUILD_COMMAND}`")
    cmd = [str(build.bench), "-p", str(prompt_tokens), "-n", str(gen_tokens), "-r", str(repetitions),
           "-t", str(threads or os.cpu_count()), "-o", "json"]
    for path in gguf_paths:
        cmd += ["-m", str(path)]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{build.lib_path}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SeapError(f"llama-bench failed: {result.stderr.strip()[-500:]}", "check the GGUF files and the build")
    rows = json.loads(result.stdout)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["model_filename"], {"file": row["model_filename"], "params": row.get("model_n_params"),
                                                         "bytes": row.get("model_size")})
        kind = "prefill" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "decode"
        entry[f"{kind}_tokens_per_s"] = row["avg_ts"]
        entry[f"{kind}_tokens_per_s_sd"] = row.get("stddev_ts")
        entry["build"] = row.get("build_commit")
        entry["threads"] = row.get("n_threads")
    return [out[str(p)] if str(p) in out else out[next(k for k in out if k.endswith(Path(p).name))] for p in gguf_paths]
