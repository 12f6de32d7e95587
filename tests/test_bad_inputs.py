"""The catalogue of bad inputs and faults: every entry point answers with one clear message.

Each case runs a command as a user would (in-process through ``seap.cli.main``, or as a
process where a kill or a second process is part of the fault) and asserts the exit code,
that the message names the problem, that no traceback was printed, that no partial output
remains, and that no input changed. The shared inputs (a tiny model, calibration records, a
corpus, statistics, scores, a mask) are built once; a case that needs a damaged copy makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seap.model.checkpoint import load_pruned

from seap.cli import main
from tests.helpers import SENTENCES, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    """The shared inputs (never changed by a case) and the case's own folder."""

    inputs: Path
    work: Path

    def __getattr__(self, name: str) -> str:  # env.model, env.calib, env.corpus, env.stats, ...
        return str(self.inputs / INPUTS[name])


INPUTS = {"model": "model", "other_model": "other-model", "calib": "calib.jsonl", "corpus": "corpus.jsonl",
          "stats": "stats", "stats_facts": "stats/facts", "stats_chat": "stats/chat", "scores": "scores",
          "mask": "mask", "results": "results", "registry": "registry"}


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(oct(path.stat().st_mode).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for name, seed in (("model", 0), ("other-model", 3)):
        tiny = make_tiny_model("llama-gqa", layers=6, seed=seed)
        tiny.model.save_pretrained(root / name)
        tiny.tokenizer.save_pretrained(root / name)
    lines = [{"task": "facts" if i % 2 else "chat", "text": s} for i, s in enumerate(SENTENCES * 2)]
    (root / "calib.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    quiet = ["--no-progress"]
    assert main([*quiet, "corpus", "--records", str(root / "calib.jsonl"), "--out", str(root / "corpus.jsonl")]) == 0
    assert main([*quiet, "stats", "--model", str(root / "model"), "--corpus", str(root / "corpus.jsonl"),
                 "--out", str(root / "stats")]) == 0
    assert main(["scores", "--stats", str(root / "stats" / "facts"), "--out", str(root / "scores")]) == 0
    assert main(["masks", "--scores", str(root / "scores"), "--sparsity", "0.3", "--out", str(root / "mask")]) == 0
    (root / "results").mkdir()
    (root / "results" / "results.json").write_text(json.dumps({"rows": [], "config": {}}))
    (root / "registry").mkdir()
    return root


# -- how a case damages a copy, or prepares its own folder -----------------------------------------------
def _write(rel: str, content: str | bytes) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        path = env.work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


def _copy(name: str, rel: str, edit: Callable[[Path], None] | None = None) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        source, target = env.inputs / INPUTS[name], env.work / rel
        shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
        if edit:
            edit(target)
    return prepare


def _edit_json(file: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        change(data)
        (folder / file).write_text(json.dumps(data))
    return edit


def _flip_byte(file: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = bytearray((folder / file).read_bytes())
        data[-1] ^= 0xFF
        (folder / file).write_bytes(bytes(data))
    return edit


def _foreign_folder(rel: str) -> Callable[[Env], None]:
    return _write(f"{rel}/notes.txt", "my own notes, not SEAP's")


def _both(*steps: Callable[[Env], None]) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        for step in steps:
            step(env)
    return prepare


def _model_folder(rel: str, files: dict[str, str | bytes]) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        folder = env.work / rel
        folder.mkdir(parents=True)
        for name, content in files.items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


def _tiny_config(model_type: str = "llama") -> str:
    return json.dumps({"model_type": model_type, "hidden_size": 8, "num_attention_heads": 2,
                       "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 16})


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    message: str  # a piece of the message that names the problem (case-insensitive)
    code: int = 2
    prepare: Callable[[Env], None] | None = None
    absent: tuple[str, ...] = ("out",)  # under the case's folder: what must not exist afterwards
    kept: tuple[str, ...] = ()  # under the case's folder: files a refusal must leave as they were
    env: dict[str, str] = field(default_factory=dict)


def W(env: Env, rel: str = "out") -> str:
    return str(env.work / rel)


def records_case(name: str, content: str | bytes, message: str, file: str = "c.jsonl") -> Case:
    """``seap corpus`` on a records file holding ``content``."""
    return Case(name, lambda e: ["corpus", "--records", W(e, file), "--out", W(e)], message,
                prepare=_write(file, content))


NO_TRACKING_URI = {"MLFLOW_TRACKING_URI": ""}  # (mlflow.set_tracking_uri exports it: earlier tests leave it set)

CASES = [
    # -- calibration files ------------------------------------------------------------------------------
    Case("corpus-missing-records", lambda e: ["corpus", "--records", W(e, "nope.jsonl"), "--out", W(e)], "not found"),
    records_case("corpus-empty-file", "", "holds no records"),
    records_case("corpus-not-json", "{oops\n", "line 1: not valid JSON"),
    records_case("corpus-not-utf8", b"\xff\xfe\x00junk\n", "not UTF-8"),
    records_case("corpus-json-not-a-list", "[1, 2]", "JSON list of objects", file="c.json"),
    records_case("corpus-line-not-object", "[1]\n", "expected a JSON object"),
    records_case("record-text-null", '{"text": null}\n', "line 1: field 'text' must be a string"),
    records_case("record-text-number", '{"text": "ok"}\n{"text": 7}\n', "field 'text' must be a string"),
    records_case("record-choices-string", '{"question": "q", "choices": "ab", "answer": 0}\n', "field 'choices' must be a non-empty list"),
    records_case("record-answer-float", '{"question": "q", "choices": ["a", "b"], "answer": 1.7}\n', "field 'answer' must be a whole-number index"),
    records_case("record-answer-letter", '{"question": "q", "choices": ["a", "b"], "answer": "b"}\n', "field 'answer' must be a whole-number index"),
    records_case("record-answer-out-of-range", '{"question": "q", "choices": ["a", "b"], "answer": 5}\n', "outside the 2 choices"),
    records_case("record-unknown-schema", '{"foo": 1}\n', "matches no known schema"),
    records_case("record-piqa-label-null", '{"goal": "g", "sol1": "a", "sol2": "b", "label": null}\n', "field 'label'"),
    records_case("corpus-bad-task-name", '{"task": "../x", "text": "hello"}\n', "invalid task name"),
    Case("corpus-unknown-task", lambda e: ["corpus", "--records", e.calib, "--task", "nope", "--out", W(e)], "nope"),
    # -- numbers ----------------------------------------------------------------------------------------
    Case("corpus-samples-zero", lambda e: ["corpus", "--records", e.calib, "--samples", "0", "--out", W(e)],
         "must be at least 1"),
    Case("corpus-samples-text", lambda e: ["corpus", "--records", e.calib, "--samples", "many", "--out", W(e)],
         "expected a whole number"),
    Case("stats-batch-size-zero", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--batch-size", "0",
                                             "--out", W(e)], "must be at least 1"),
    Case("stats-max-tokens-negative", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--max-tokens",
                                                 "-5", "--out", W(e)], "must be at least 1"),
    Case("stats-shard-out-of-range", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--shard", "4/2",
                                                "--out", W(e)], "numbered 0..N-1"),
    Case("corpus-records-a-folder", lambda e: ["corpus", "--records", W(e, "recs"), "--out", W(e, "c.jsonl")],
         "is a folder, not a records file", absent=("c.jsonl",), prepare=_write("recs/a.jsonl", "{}\n"),
         kept=("recs/a.jsonl",)),
    Case("stats-shard-negative", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--shard", "-1/2",
                                            "--out", W(e)], "numbered 0..N-1"),
    Case("stats-shard-garbage", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--shard", "half",
                                           "--out", W(e)], "must look like I/N"),
    Case("masks-sparsity-above-one", lambda e: ["masks", "--scores", e.scores, "--sparsity", "1.5", "--out", W(e)],
         "sparsity"),
    Case("masks-sparsity-negative", lambda e: ["masks", "--scores", e.scores, "--sparsity", "-0.1", "--out", W(e)],
         "sparsity"),
    Case("masks-sparsity-nan", lambda e: ["masks", "--scores", e.scores, "--sparsity", "nan", "--out", W(e)], "sparsity"),
    Case("masks-sparsity-text", lambda e: ["masks", "--scores", e.scores, "--sparsity", "half", "--out", W(e)],
         "invalid float value"),
    Case("prune-sparsity-one", lambda e: ["prune", "--model", e.model, "--calib", e.calib, "--sparsity", "1",
                                          "--out", W(e)], "sparsity"),
    Case("masks-bad-weight", lambda e: ["masks", "--scores", e.scores, e.scores, "--general", "--weight", "facts",
                                        "--sparsity", "0.3", "--out", W(e)], "bad weight"),
    # -- models -----------------------------------------------------------------------------------------
    Case("model-missing", lambda e: ["stats", "--model", W(e, "no-model"), "--corpus", e.corpus, "--out", W(e)],
         "not found"),
    Case("model-folder-without-config", lambda e: ["stats", "--model", W(e, "m"), "--corpus", e.corpus, "--out", W(e)],
         "without config.json", prepare=_model_folder("m", {"readme.txt": "hi"})),
    Case("model-config-without-weights", lambda e: ["stats", "--model", W(e, "m"), "--corpus", e.corpus,
                                                    "--out", W(e)], "no weights",
         prepare=_model_folder("m", {"config.json": _tiny_config()})),
    Case("model-only-pickle-weights", lambda e: ["stats", "--model", W(e, "m"), "--corpus", e.corpus, "--out", W(e)],
         "never unpickles", prepare=_model_folder("m", {"config.json": _tiny_config(), "pytorch_model.bin": b"PK"})),
    Case("model-unsupported-architecture", lambda e: ["stats", "--model", W(e, "m"), "--corpus", e.corpus,
                                                      "--out", W(e)], "bert",
         prepare=_model_folder("m", {"config.json": json.dumps({"model_type": "bert"}), "model.safetensors": b"x"})),
    Case("model-corrupt-gguf", lambda e: ["stats", "--model", W(e, "m.gguf"), "--corpus", e.corpus, "--out", W(e)],
         "gguf", prepare=_write("m.gguf", b"GGUF\x03\x00\x00\x00garbage")),
    Case("model-not-gguf", lambda e: ["stats", "--model", W(e, "m.gguf"), "--corpus", e.corpus, "--out", W(e)],
         "gguf", prepare=_write("m.gguf", b"this is text")),
    Case("device-banana", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--device", "banana",
                                     "--out", W(e)], "unknown device 'banana'"),
    Case("device-cuda-absent", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--device", "cuda:7",
                                          "--out", W(e)], "cuda:7"),
    Case("dtype-unknown", lambda e: ["stats", "--model", e.model, "--corpus", e.corpus, "--dtype", "int3",
                                     "--out", W(e)], "unknown dtype"),
    # -- artifacts ----------------------------------------------------------------------------------------
    Case("mask-missing", lambda e: ["apply", "--model", e.model, "--mask", W(e, "nomask"), "--out", W(e)], "not found"),
    Case("mask-tensors-corrupt", lambda e: ["apply", "--model", e.model, "--mask", W(e, "m"), "--out", W(e)],
         "checksum mismatch", prepare=_copy("mask", "m", _flip_byte("mask.safetensors"))),
    Case("mask-meta-edited", lambda e: ["apply", "--model", e.model, "--mask", W(e, "m"), "--out", W(e)],
         "was edited", prepare=_copy("mask", "m", _edit_json("mask.json", lambda d: d.update(task="other")))),
    Case("mask-meta-not-json", lambda e: ["apply", "--model", e.model, "--mask", W(e, "m"), "--out", W(e)],
         "not valid JSON", prepare=_copy("mask", "m", lambda f: (f / "mask.json").write_text("{"))),
    Case("mask-newer-format", lambda e: ["apply", "--model", e.model, "--mask", W(e, "m"), "--out", W(e)],
         "format version", prepare=_copy("mask", "m", _edit_json("mask.json", lambda d: d.update(format_version=99)))),
    Case("mask-of-another-model", lambda e: ["apply", "--model", e.other_model, "--mask", e.mask, "--out", W(e)],
         "base model"),
    Case("scores-from-a-mask-folder", lambda e: ["scores", "--stats", e.mask, "--out", W(e)],
         "not a seap-activation-statistics"),
    Case("stats-fingerprint-edited", lambda e: ["scores", "--stats", W(e, "s"), "--out", W(e)], "was edited",
         prepare=_copy("stats_facts", "s", _edit_json("stats.json",
                                                      lambda d: d.update(model_fingerprint="sha256:" + "0" * 64)))),
    Case("stats-task-edited", lambda e: ["merge-stats", W(e, "s"), e.stats_chat, "--out", W(e)], "was edited",
         prepare=_copy("stats_facts", "s", _edit_json("stats.json", lambda d: d.update(task="chat")))),
    Case("merge-same-folder-twice", lambda e: ["merge-stats", e.stats_facts, e.stats_facts, "--out", W(e)],
         "given twice"),
    Case("merge-same-statistics-copied", lambda e: ["merge-stats", e.stats_facts, W(e, "s"), "--out", W(e)],
         "same statistics", prepare=_copy("stats_facts", "s")),
    Case("masks-from-statistics", lambda e: ["masks", "--scores", e.stats_facts, "--sparsity", "0.3", "--out", W(e)],
         "not a seap-importance-scores"),
    # -- output paths -------------------------------------------------------------------------------------
    Case("corpus-out-is-its-input", lambda e: ["corpus", "--records", W(e, "c.jsonl"), "--out", W(e, "c.jsonl"),
                                               "--overwrite"], "its own input", absent=(),
         prepare=_write("c.jsonl", '{"text": "a"}\n{"text": "b"}\n'), kept=("c.jsonl",)),
    Case("corpus-out-exists", lambda e: ["corpus", "--records", e.calib, "--out", W(e, "c.jsonl")], "already exists",
         absent=(), prepare=_write("c.jsonl", "precious\n"), kept=("c.jsonl",)),
    Case("corpus-overwrite-foreign-file", lambda e: ["corpus", "--records", e.calib, "--out", W(e, "c.jsonl"),
                                                     "--overwrite"], "only replaces outputs SEAP wrote", absent=(),
         prepare=_write("c.jsonl", "precious\n"), kept=("c.jsonl",)),
    Case("corpus-out-is-a-folder", lambda e: ["corpus", "--records", e.calib, "--out", W(e, "d")], "is a folder",
         absent=(), prepare=_write("d/keep.txt", "x"), kept=("d/keep.txt",)),
    Case("corpus-out-under-a-file", lambda e: ["corpus", "--records", e.calib, "--out", W(e, "f/c.jsonl")],
         "is a file", absent=(), prepare=_write("f", "x"), kept=("f",)),
    Case("apply-out-is-the-model", lambda e: ["apply", "--model", W(e, "m"), "--mask", e.mask, "--out", W(e, "m"),
                                              "--overwrite"], "its own input", absent=(),
         prepare=_copy("model", "m"), kept=("m/config.json", "m/model.safetensors")),
    Case("apply-out-is-the-working-folder", lambda e: ["apply", "--model", e.model, "--mask", e.mask, "--out", ".",
                                                       "--overwrite"], "working folder", absent=()),
    Case("apply-out-is-the-home-folder", lambda e: ["apply", "--model", e.model, "--mask", e.mask, "--out", "~",
                                                    "--overwrite"], "home folder", absent=()),
    Case("scores-overwrite-foreign-folder", lambda e: ["scores", "--stats", e.stats_facts, "--out", W(e, "u"),
                                                       "--overwrite"], "it holds notes.txt", absent=(),
         prepare=_foreign_folder("u"), kept=("u/notes.txt",)),
    Case("scores-out-exists", lambda e: ["scores", "--stats", e.stats_facts, "--out", W(e, "sc")], "already exists",
         absent=(), prepare=_copy("scores", "sc"), kept=("sc/scores.json",)),
    Case("scores-out-under-a-file", lambda e: ["scores", "--stats", e.stats_facts, "--out", W(e, "f/out")], "is a file",
         absent=(), prepare=_write("f", "x"), kept=("f",)),
    Case("stats-out-holds-its-corpus", lambda e: ["stats", "--model", e.model, "--corpus", W(e, "d/c.jsonl"),
                                                  "--out", W(e, "d"), "--overwrite"], "overlaps the input", absent=(),
         prepare=_both(_write("d/.keep", ""), _copy("corpus", "d/c.jsonl")),
         kept=("d/c.jsonl",)),
    Case("masks-out-is-its-scores", lambda e: ["masks", "--scores", W(e, "sc"), "--sparsity", "0.3", "--out",
                                               W(e, "sc"), "--overwrite"], "its own input", absent=(),
         prepare=_copy("scores", "sc"), kept=("sc/scores.json",)),
    Case("prune-overwrite-foreign-folder", lambda e: ["prune", "--model", e.model, "--calib", e.calib, "--sparsity",
                                                      "0.3", "--out", W(e, "u"), "--overwrite"], "only replaces outputs",
         absent=(), prepare=_foreign_folder("u"), kept=("u/notes.txt",)),
    Case("prune-out-under-a-file", lambda e: ["prune", "--model", e.model, "--calib", e.calib, "--sparsity", "0.3",
                                              "--out", W(e, "f/p")], "is a file", absent=(), prepare=_write("f", "x"),
         kept=("f",)),
    Case("router-out-exists-foreign", lambda e: ["router", "--model", e.model, "--tasks", "capitals", "--out",
                                                 W(e, "u"), "--overwrite"], "only replaces outputs", absent=(),
         prepare=_foreign_folder("u"), kept=("u/notes.txt",)),
    # -- the pipeline's parameters (the same checks behind eval, the flow and dvc repro) ---------------------
    Case("eval-device-banana", lambda e: ["eval", "--device", "banana", "--workdir", W(e, "w")], "unknown device",
         absent=("w",)),
    Case("eval-sparsity-zero", lambda e: ["eval", "--sparsities", "0", "--workdir", W(e, "w")], "dense model",
         absent=("w",)),
    Case("eval-unknown-method", lambda e: ["eval", "--methods", "magic", "--workdir", W(e, "w")], "magic",
         absent=("w",)),
    Case("eval-budget-negative", lambda e: ["eval", "--max-drop", "-1", "--workdir", W(e, "w")], "at least 0",
         absent=("w",)),
    Case("eval-budget-twice", lambda e: ["eval", "--max-drop", "2", "--max-drop-rel", "0.1", "--workdir", W(e, "w")],
         "budget is given twice", absent=("w",)),
    Case("eval-budget-grid-twice", lambda e: ["eval", "--max-drop", "2", "--budget-grid", "0.2", "0.2",
                                              "--workdir", W(e, "w")], "listed twice", absent=("w",)),
    Case("eval-budget-no-selection-items", lambda e: ["eval", "--max-drop", "2", "--selection-items", "0",
                                                      "--workdir", W(e, "w")], "at least 1", absent=("w",)),
    Case("eval-fallback-tasks-without-router", lambda e: ["eval", "--max-drop", "2", "--methods", "seap-expert",
                                                          "--fallback-tasks", "piqa", "--workdir", W(e, "w")],
         "has no routed row", absent=("w",)),
    Case("eval-fallback-task-is-calibrated", lambda e: ["eval", "--max-drop", "2", "--fallback-tasks", "capitals",
                                                        "--workdir", W(e, "w")], "capitals is also a task of the run",
         absent=("w",)),
    Case("eval-bisect-without-a-budget", lambda e: ["eval", "--budget-search", "bisect", "--workdir", W(e, "w")],
         "no budget to search for", absent=("w",)),
    Case("eval-bisect-step-with-the-grid", lambda e: ["eval", "--max-drop", "2", "--budget-step", "0.05",
                                                     "--workdir", W(e, "w")], "the search is the grid", absent=("w",)),
    Case("eval-bisect-step-past-the-ceiling", lambda e: ["eval", "--max-drop", "2", "--budget-search", "bisect",
                                                         "--budget-step", "0.3", "--budget-grid", "0.2",
                                                         "--workdir", W(e, "w")], "nothing to bisect", absent=("w",)),
    Case("eval-bisect-with-a-speed-target", lambda e: ["eval", "--max-drop", "2", "--budget-search", "bisect",
                                                       "--min-speedup", "1.2", "--workdir", W(e, "w")],
         "the bisection measures none", absent=("w",)),
    Case("eval-speed-engine-without-a-target", lambda e: ["eval", "--speedup-engine", "llama.cpp",
                                                          "--workdir", W(e, "w")], "no speed target", absent=("w",)),
    Case("eval-speed-target-in-llama-cpp-without-a-build",
         lambda e: ["eval", "--min-speedup", "1.2", "--speedup-engine", "llama.cpp", "--bench-llama-cpp", W(e, "none"),
                    "--workdir", W(e, "w")], "no llama.cpp build was found", absent=("w",)),
    Case("eval-speed-target-beyond-the-grid", lambda e: ["eval", "--min-speedup", "9", "--workdir", W(e, "w")],
         "beyond what the search can measure", absent=("w",)),
    Case("eval-metric-a-task-lacks", lambda e: ["eval", "--tasks", "boolq", "capitals", "--data-dir", W(e, "data"),
                                                "--metric", "acc_norm", "--workdir", W(e, "w")],
         "boolq report no acc_norm (boolq: acc)", absent=("w",),
         prepare=_both(*(_write(f"data/boolq/{split}.jsonl", "".join(
             '{"passage": "Water is wet.", "question": "is water wet", "label": %d}\n' % (i % 2) for i in range(8)))
             for split in ("train", "validation")))),
    Case("eval-workdir-is-a-file", lambda e: ["eval", "--workdir", W(e, "w")], "is a file", absent=(),
         kept=("w",), prepare=_write("w", "not a folder")),
    Case("eval-out-holds-other-files", lambda e: ["eval", "--out", W(e, "o"), "--workdir", W(e, "w")],
         "holds other files (notes.txt)", absent=("w",), kept=("o/notes.txt",), prepare=_write("o/notes.txt", "mine")),
    Case("eval-data-dir-missing", lambda e: ["eval", "--data-dir", W(e, "nope"), "--workdir", W(e, "w")],
         "nope is not a folder", absent=("w", "nope")),
    Case("eval-cache-cap-unreadable", lambda e: ["eval", "--cache-max-size", "lots", "--workdir", W(e, "w")],
         "cannot read the size", absent=("w",)),
    Case("eval-disk-below-the-floor", lambda e: ["eval", "--model", e.model, "--methods", "seap-expert",
                                                 "--no-mlflow", "--no-bench", "--workdir", W(e, "w"),
                                                 "--out", W(e, "o")],
         "below the floor of", absent=("w", "o"), env={"SEAP_MIN_FREE_DISK": "1000T"}),
    Case("prune-budget-and-sparsity", lambda e: ["prune", "--model", e.model, "--task", "capitals", "--max-drop", "2",
                                                 "--sparsity", "0.3", "--out", W(e), "--workdir", W(e, "w")],
         "both given", absent=("out", "w")),
    Case("prune-budget-two-tasks", lambda e: ["prune", "--model", e.model, "--task", "capitals", "--task", "antonyms",
                                              "--max-drop", "2", "--out", W(e), "--workdir", W(e, "w")],
         "sizes one task's expert", absent=("out", "w")),
    Case("prune-budget-with-a-records-file", lambda e: ["prune", "--model", e.model, "--calib", e.calib, "--task",
                                                        "facts", "--max-drop", "2", "--out", W(e)],
         "would not be used", absent=("out",)),
    Case("prune-budget-for-a-baseline", lambda e: ["prune", "--model", e.model, "--task", "capitals", "--method",
                                                   "wanda-sp", "--max-drop", "2", "--out", W(e)],
         "sizes SEAP experts", absent=("out",)),
    Case("prune-without-a-sparsity", lambda e: ["prune", "--model", e.model, "--calib", e.calib, "--out", W(e)],
         "needs a sparsity", absent=("out",)),
    Case("eval-out-is-a-file", lambda e: ["eval", "--out", W(e, "o"), "--workdir", W(e, "w")], "is a file",
         absent=("w",), kept=("o",), prepare=_write("o", "a file")),
    Case("eval-registry-dir-is-a-file", lambda e: ["eval", "--registry-dir", W(e, "r"), "--workdir", W(e, "w")],
         "is a file", absent=("w",), kept=("r",), prepare=_write("r", "a file")),
    Case("eval-mlflow-dir-is-a-file", lambda e: ["eval", "--mlflow-dir", W(e, "m"), "--workdir", W(e, "w")],
         "is a file", absent=("w",), kept=("m",), prepare=_write("m", "a file")),
    Case("eval-refit-options-without-the-refit", lambda e: ["eval", "--no-reconstruct", "--refit-alpha", "0.1",
                                                           "--workdir", W(e, "w")], "refit is switched off",
         absent=("w",)),
    Case("eval-speed-target-below-one", lambda e: ["eval", "--min-speedup", "0.5", "--workdir", W(e, "w")],
         "must be at least 1", absent=("w",)),
    Case("prune-budget-unknown-task", lambda e: ["prune", "--model", e.model, "--task", "astrology", "--max-drop", "2",
                                                 "--out", W(e), "--workdir", W(e, "w")], "astrology",
         absent=("out", "w")),
    # -- the work folder ------------------------------------------------------------------------------------
    Case("cache-list-with-prune-options", lambda e: ["cache", "--workdir", W(e, "w"), "--max-size", "1G"],
         "options of prune", absent=(), prepare=_write("w/masks/.keep", "")),
    Case("cache-prune-without-a-limit", lambda e: ["cache", "prune", "--workdir", W(e, "w")], "needs a limit",
         absent=(), prepare=_write("w/masks/.keep", "")),
    Case("cache-of-a-missing-work-folder", lambda e: ["cache", "--workdir", W(e, "nope")], "does not exist",
         absent=("nope",)),
    Case("cache-unreadable-size", lambda e: ["cache", "prune", "--workdir", W(e, "w"), "--max-size", "big"],
         "cannot read the size", absent=(), prepare=_write("w/masks/.keep", "")),
    # -- the registry -------------------------------------------------------------------------------------
    Case("promote-version-not-a-number", lambda e: ["promote", "seap-x", "abc", "--to", "staging"],
         "positive whole number"),
    Case("promote-into-a-registry-that-is-not-there", lambda e: ["promote", "seap-x", "1", "--to", "staging",
                                                                  "--mlflow-dir", W(e, "mlflow")],
         "no MLflow registry at", absent=("mlflow",), env=NO_TRACKING_URI),
    Case("rollback-in-a-registry-that-is-not-there", lambda e: ["rollback", "seap-x", "--mlflow-dir", W(e, "mlflow")],
         "no MLflow registry at", absent=("mlflow",), env=NO_TRACKING_URI),
    Case("models-of-a-registry-that-is-not-there", lambda e: ["models", "--mlflow-dir", W(e, "mlflow")],
         "no MLflow registry at", absent=("mlflow",), env=NO_TRACKING_URI),
    Case("register-results-without-rows", lambda e: ["register", "--results", e.results, "--registry", e.registry,
                                                     "--mlflow-dir", W(e, "mlflow")], "holds no evaluated rows",
         absent=("mlflow",)),
    Case("register-results-missing", lambda e: ["register", "--results", W(e, "nope"), "--registry", e.registry,
                                                "--mlflow-dir", W(e, "mlflow")], "not found", absent=("mlflow",)),
    Case("register-unreachable-server", lambda e: ["models", "--tracking-uri", "http://127.0.0.1:9"], "127.0.0.1:9",
         absent=()),
    Case("credentials-never-printed", lambda e: ["models"], "not installed", absent=(),
         env={"MLFLOW_TRACKING_URI": "postgresql://seapuser:hunter2-secret@127.0.0.1:9/db"}),
]


def _run_case(case: Case, env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
              ) -> tuple[int, str]:
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEAP_LOG_DIR", str(env.work / "logs"))
    try:
        code = main(["--no-progress", *case.argv(env)])
    except SystemExit as exc:  # argparse: usage and one error line
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_message_and_loses_nothing(case: Case, inputs: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(inputs, tmp_path / "case")
    env.work.mkdir()
    monkeypatch.chdir(env.work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    if case.prepare:
        case.prepare(env)
    before_inputs = _tree_digest(inputs)
    kept = {rel: (env.work / rel).read_bytes() for rel in case.kept}
    code, output = _run_case(case, env, capsys, monkeypatch)
    assert code == case.code, output
    assert case.message.lower() in output.lower(), output
    assert "Traceback" not in output
    assert "hunter2" not in output
    for log in (env.work / "logs").glob("*"):  # a logged trace holds no credentials either
        assert "hunter2" not in log.read_text()
    for rel in case.absent:
        assert not (env.work / rel).exists(), f"{rel} was left behind"
    assert not [p for p in env.work.rglob(".*.tmp-*")], "a temporary was left behind"
    for rel, content in kept.items():
        assert (env.work / rel).read_bytes() == content, f"{rel} changed"
    assert _tree_digest(inputs) == before_inputs, "a shared input changed"


# -- faults that take a second process: kill -9, two writers -------------------------------------------------
def _seap(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true"}
    return subprocess.Popen([sys.executable, "-m", "seap", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("command", ["stats", "prune"])
def test_a_kill_leaves_no_partial_output_and_the_rerun_works(command: str, inputs: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(inputs, tmp_path)
    out = tmp_path / ("out.jsonl" if command == "corpus" else "out")
    argv = {"corpus": ["corpus", "--records", env.calib, "--out", str(out)],
            "stats": ["stats", "--model", env.model, "--corpus", env.corpus, "--out", str(out)],
            "prune": ["prune", "--model", env.model, "--calib", env.calib, "--sparsity", "0.3", "--out", str(out)],
            }[command]
    process = _seap(*argv, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:  # kill it mid-write, or as late as we can
        if any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir()):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    if out.exists() and command == "stats":  # it finished first: then it is whole
        assert sorted(p.name for p in out.iterdir()) == ["chat", "facts"]
    monkeypatch.chdir(tmp_path)  # the re-run, in this process (a new process costs its imports)
    assert main(["--no-progress", *argv, *(["--overwrite"] if out.exists() else [])]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "a stale temporary stayed"
    if command == "stats":
        assert sorted(p.name for p in out.iterdir()) == ["chat", "facts"]
    if command == "prune":  # (written layer by layer: shards and their index)
        assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
        assert load_pruned(out).fingerprint


def test_two_writers_on_one_output_one_wins_and_the_other_says_so(inputs: Path, tmp_path: Path) -> None:
    env = Env(inputs, tmp_path)
    argv = ["scores", "--stats", env.stats_facts, "--out", str(tmp_path / "out")]
    first, second = _seap(*argv, cwd=tmp_path), _seap(*argv, cwd=tmp_path)
    results = [p.communicate(timeout=120) + (p.returncode,) for p in (first, second)]
    codes = sorted(code for _, _, code in results)
    assert codes in ([0, 0], [0, 2]), results  # both finished before the other looked, or one refused
    for _, err, code in results:
        assert "Traceback" not in err
        if code == 2:
            assert "already exists" in err
    assert main(["scores", "--stats", env.stats_facts, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "out" / "scores.safetensors").read_bytes() == \
        (tmp_path / "again" / "scores.safetensors").read_bytes()


def test_outputs_follow_the_umask(inputs: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert main(["scores", "--stats", str(inputs / "stats" / "facts"), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"scores.safetensors": 0o644, "scores.json": 0o644}


@pytest.fixture
def unwritable_folder(tmp_path: Path):
    """A folder nobody may create entries in, root included: immutable (``chattr +i``, which
    root can set) for root, as CI runs; read-only permissions for anyone else. The attribute is
    removed afterwards so that the folder can be cleaned up."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
        if done.returncode != 0:  # e.g. a file system without the immutable attribute
            pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o500)
        undo = ["chmod", "700", str(folder)]
    try:
        with pytest.raises(PermissionError):  # the premise: nothing can be written there
            (folder / "probe").write_text("x")
        yield folder
    finally:
        subprocess.run(undo, check=True)


def test_a_read_only_output_location_is_refused_before_any_work(inputs: Path, unwritable_folder: Path,
                                                                 capsys) -> None:
    code = main(["corpus", "--records", str(inputs / "calib.jsonl"), "--out", str(unwritable_folder / "c.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"{unwritable_folder} is not writable" in err and "Traceback" not in err
    assert not list(unwritable_folder.iterdir()) and not list(unwritable_folder.parent.glob(".*.tmp-*"))


FAULT_TESTS = ("kill of stats and prune (2)", "kill of eval", "two writers on one output", "two evals on one work "
               "folder and registry", "umask", "read-only output location")  # (the tests above this one)


def test_the_catalogue_is_large_enough() -> None:
    """Cases here, faults above, full-disk commands, and the malformed serving requests of the
    load test (tests/registry/test_serving_load.py) and corrupt entries (tests/run/test_cache_entries.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from load_test_serving import MALFORMED

    total = len(CASES) + len(FAULT_TESTS) + 1 + len(FULL_DISK_COMMANDS) + len(MALFORMED) + 1
    assert total >= 120, total


# -- a full disk, or a file past the file-size limit, while each command writes --------------------------------
FULL_DISK_COMMANDS = {
    "corpus": lambda e, out: ["corpus", "--records", e.calib, "--out", str(out / "c.jsonl")],
    "stats": lambda e, out: ["stats", "--model", e.model, "--corpus", e.corpus, "--out", str(out / "o")],
    "scores": lambda e, out: ["scores", "--stats", e.stats_facts, "--out", str(out / "o")],
    "masks": lambda e, out: ["masks", "--scores", e.scores, "--sparsity", "0.3", "--out", str(out / "o")],
    "apply": lambda e, out: ["apply", "--model", e.model, "--mask", e.mask, "--out", str(out / "o")],
    "prune": lambda e, out: ["prune", "--model", e.model, "--calib", e.calib, "--sparsity", "0.3", "--out",
                             str(out / "o"), "--workdir", str(out / "w")],
}


def _largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("command", sorted(FULL_DISK_COMMANDS))
def test_a_file_past_the_size_limit_names_the_path_keeps_nothing_and_the_rerun_works(
        command: str, inputs: Path, tmp_path: Path) -> None:
    """``ulimit -f`` (RLIMIT_FSIZE) set below the largest file the command writes: one clear
    message naming the output and what was written, exit 2, no traceback, no partial output and
    no temporaries; the same command without the limit then succeeds."""
    import resource

    env = Env(inputs, tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "limited"
    reference.mkdir(), out.mkdir()
    argv = FULL_DISK_COMMANDS[command]
    done = _seap(*argv(env, reference), cwd=reference)
    assert done.wait(timeout=300) == 0, done.communicate()[1]
    limit = max(_largest_file(reference) // 2, 64)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = _tree_digest(inputs)
    process = subprocess.Popen([sys.executable, "-m", "seap", "--no-progress", *argv(env, out)], cwd=out,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "CI": "true",
                                    "SEAP_LOG_DIR": str(tmp_path / "logs")},
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limited)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert "file-size limit" in err and str(out) in err and "were written before it stopped" in err, err
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name], "a temporary was left behind"
    assert not (out / "o").exists() and not (out / "c.jsonl").exists()
    assert _tree_digest(inputs) == before
    again = _seap(*argv(env, out), cwd=out)
    assert again.wait(timeout=300) == 0, again.communicate()[1]


# -- kills and concurrent writers on the long-running commands ---------------------------------------------------
def _eval_argv(base: Path, data: Path, work: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(base), "--tasks", "geo", "life", "--data-dir", str(data), "--methods",
            "seap-expert", "seap-general", "--sparsities", "0.3", "--limit", "6", "--samples", "20", "--schedule",
            "uniform", "--no-bench", "--no-mlflow", "--workdir", str(work), "--out", str(out),
            "--registry-dir", str(work.parent / "registry")]


def test_a_killed_eval_resumes_to_identical_results_with_no_corrupt_entry(tmp_path: Path) -> None:
    """kill -9 of `seap eval` part-way (once some outputs are finished): the same command then
    reuses what finished, every entry verifies, no leftover of the killed process stays, and the
    results equal an uninterrupted run's."""
    from seap.run.cache_entries import entries, leftovers
    from tests.helpers_flows import tiny_project

    base, data = tiny_project(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    process = _seap(*_eval_argv(base, data, work, out), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (work / "refits").is_dir():  # statistics, scores and masks finished; the refit walk under way
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = {e.rel for e in entries(work)}
    again = _seap(*_eval_argv(base, data, work, out), cwd=tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "corrupt" not in err and "Traceback" not in err
    assert finished <= {e.rel for e in entries(work)}  # what finished was reused, not rebuilt elsewhere
    assert not leftovers(work)
    reference = _seap(*_eval_argv(base, data, tmp_path / "work2", tmp_path / "out2"), cwd=tmp_path)
    assert reference.wait(timeout=600) == 0
    rows = [(r["method"], r["average"]) for r in json.loads((out / "results.json").read_text())["rows"]]
    assert rows == [(r["method"], r["average"]) for r in json.loads((tmp_path / "out2" / "results.json").read_text())["rows"]]


def test_two_evals_on_one_work_folder_agree_and_both_finish(tmp_path: Path) -> None:
    """Two `seap eval` processes at once on one work folder (and one registry): each builds or
    reuses the other's finished outputs, neither reads a half-written one, both finish with the
    same table."""
    from seap.run.cache_entries import leftovers
    from tests.helpers_flows import tiny_project

    base, data = tiny_project(tmp_path)
    work = tmp_path / "work"
    first = _seap(*_eval_argv(base, data, work, tmp_path / "out1"), cwd=tmp_path)
    second = _seap(*_eval_argv(base, data, work, tmp_path / "out2"), cwd=tmp_path)
    results = [p.communicate(timeout=900) + (p.returncode,) for p in (first, second)]
    for _, err, code in results:
        assert code == 0 and "Traceback" not in err, err
    tables = [json.loads((tmp_path / f"out{i}" / "results.json").read_text())["rows"] for i in (1, 2)]
    assert [r["average"] for r in tables[0]] == [r["average"] for r in tables[1]]
    assert not leftovers(work)
