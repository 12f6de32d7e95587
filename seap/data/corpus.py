"""Calibration corpora: per-task texts in SEAP's "knowledge sentence" format.

A task record becomes one plain sentence, the question followed by its gold answer, with no
options and no prompt scaffolding (SEAP, §2 of the method notes). Records may be in the
generic multiple-choice schema ``{"question", "choices", "answer"}``, already be text
(``{"text"}``), or use the Hugging Face schema of a standard benchmark (PIQA, BoolQ, ARC,
OpenBookQA, WinoGrande, HellaSwag, GSM8K, WikiText); the schema is detected from the keys.

A corpus file is JSON Lines: an optional header line ``{"seap_corpus": 1, ...}`` with
how it was built, then one ``{"task": ..., "text": ...}`` object per line.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_text, canonical_json, sha256_bytes

CORPUS_FORMAT_VERSION = 1
DEFAULT_SAMPLES_PER_TASK = 200
DEFAULT_SEED = 42
DEFAULT_MAX_TOKENS = 512

Record = Mapping[str, Any]


def _cap(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:]


def _letter_index(labels: Sequence[str], key: str) -> int:
    return list(labels).index(str(key))


def _generic_mc(r: Record) -> str:
    choices = list(r["choices"])
    answer = int(r["answer"])
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer index {answer} is outside the {len(choices)} choices")
    return f"{str(r['question']).strip()} {str(choices[answer]).strip()}"


def _piqa(r: Record) -> str:
    return f"{r['goal'].strip()} {r['sol1' if int(r['label']) == 0 else 'sol2'].strip()}"


def _boolq(r: Record) -> str:
    return f"{r['passage'].strip()} {_cap(r['question'])}? {'Yes' if int(r['label']) else 'No'}"


def _arc(r: Record) -> str:
    choices = r["choices"]
    return f"{r['question'].strip()} {choices['text'][_letter_index(choices['label'], r['answerKey'])].strip()}"


def _openbookqa(r: Record) -> str:
    choices = r["choices"]
    answer = choices["text"][_letter_index(choices["label"], r["answerKey"])].strip()
    fact = f"{_cap(r['fact1'])}. " if r.get("fact1") else ""
    return f"{fact}{r['question_stem'].strip()} {answer}"


def _winogrande(r: Record) -> str:
    option = r["option1"] if str(r["answer"]) == "1" else r["option2"]
    return str(r["sentence"]).replace("_", str(option), 1)


def _hellaswag(r: Record) -> str:
    ctx = r.get("ctx") or f"{r.get('ctx_a', '')} {_cap(r.get('ctx_b', ''))}"
    return f"{ctx.strip()} {r['endings'][int(r['label'])].strip()}"


def _gsm8k(r: Record) -> str:
    return f"{r['question'].strip()} {r['answer'].strip()}"


def _text(r: Record) -> str:
    return str(r["text"])


def _page(r: Record) -> str:
    return str(r["page"])


# schema name -> (keys that identify it, converter); checked in this order
SCHEMAS: dict[str, tuple[frozenset[str], Callable[[Record], str]]] = {
    "text": (frozenset({"text"}), _text),
    "multiple_choice": (frozenset({"question", "choices", "answer"}), _generic_mc),
    "piqa": (frozenset({"goal", "sol1", "sol2", "label"}), _piqa),
    "boolq": (frozenset({"passage", "question", "label"}), _boolq),
    "openbookqa": (frozenset({"question_stem", "choices", "answerKey"}), _openbookqa),
    "arc": (frozenset({"question", "choices", "answerKey"}), _arc),
    "winogrande": (frozenset({"sentence", "option1", "option2", "answer"}), _winogrande),
    "hellaswag": (frozenset({"endings", "label"}), _hellaswag),
    "gsm8k": (frozenset({"question", "answer"}), _gsm8k),
    "wikitext": (frozenset({"page"}), _page),
}


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_index(v: Any) -> bool:  # a whole number, or its decimal string ("0", "1": HF stores some labels so)
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v.strip().isdigit())


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _is_choices(v: Any) -> bool:
    return isinstance(v, dict) and _is_str_list(v.get("text")) and _is_str_list(v.get("label"))


_KINDS: dict[Callable[[Any], bool], str] = {
    _is_str: "a string", _is_index: "a whole-number index (0, 1, ...)", _is_str_list: "a non-empty list of strings",
    _is_choices: 'an object {"text": [...], "label": [...]}',
}
# schema name -> field -> what its value must be
FIELD_TYPES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "text": {"text": _is_str},
    "multiple_choice": {"question": _is_str, "choices": _is_str_list, "answer": _is_index},
    "piqa": {"goal": _is_str, "sol1": _is_str, "sol2": _is_str, "label": _is_index},
    "boolq": {"passage": _is_str, "question": _is_str, "label": lambda v: isinstance(v, bool) or _is_index(v)},
    "openbookqa": {"question_stem": _is_str, "choices": _is_choices, "answerKey": _is_str},
    "arc": {"question": _is_str, "choices": _is_choices, "answerKey": _is_str},
    "winogrande": {"sentence": _is_str, "option1": _is_str, "option2": _is_str, "answer": _is_index},
    "hellaswag": {"endings": _is_str_list, "label": _is_index},
    "gsm8k": {"question": _is_str, "answer": _is_str},
    "wikitext": {"page": _is_str},
}


def check_record(record: Record, schema: str) -> None:
    """Raise ``ValueError`` naming the first field of ``record`` whose value does not fit ``schema``
    (types included: ``null``, a number for a text, a string for a list of choices)."""
    for name, ok in FIELD_TYPES.get(schema, {}).items():
        value = record.get(name)
        if not ok(value):
            kind = _KINDS.get(ok, "boolean or a whole-number index")
            raise ValueError(f"field {name!r} must be {kind}, got {json.dumps(value)[:60]}")
    if schema == "multiple_choice" and int(record["answer"]) >= len(record["choices"]):
        raise ValueError(f"field 'answer' is {record['answer']}, outside the {len(record['choices'])} choices")


def detect_schema(record: Record) -> str:
    """Name of the first schema whose identifying keys are all in ``record``."""
    keys = set(record)
    for name, (required, _) in SCHEMAS.items():
        if required <= keys:
            return name
    raise SeapError(
        f"record with keys {sorted(keys)} matches no known schema",
        'use {"question": ..., "choices": [...], "answer": <index>} or {"text": ...}, '
        f"or a benchmark schema ({', '.join(SCHEMAS)})",
    )


def knowledge_sentence(record: Record, schema: str | None = None) -> str:
    """The calibration text of one task record: question plus gold answer."""
    name = schema or detect_schema(record)
    if name not in SCHEMAS:
        raise SeapError(f"unknown record schema {name!r}", f"use one of: {', '.join(SCHEMAS)}")
    try:
        check_record(record, name)
        return SCHEMAS[name][1](record)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SeapError(f"record does not fit the {name!r} schema: {exc!r}", "check the record's fields") from exc


@dataclass
class CalibrationCorpus:
    """The calibration texts of one task."""

    task: str
    texts: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """Content hash of the task name and texts (metadata excluded)."""
        return "sha256:" + sha256_bytes(canonical_json({"task": self.task, "texts": self.texts}).encode())

    def __len__(self) -> int:
        return len(self.texts)


def merge_corpora(parts: Sequence[CalibrationCorpus], task: str | None = None) -> CalibrationCorpus:
    """One corpus holding every text of ``parts``, in order (named ``task``, or the parts' names
    joined by ``+``)."""
    if not parts:
        raise ValueError("nothing to merge")
    if len(parts) == 1 and task is None:
        return parts[0]
    return CalibrationCorpus(task or "+".join(c.task for c in parts), [t for c in parts for t in c.texts])


_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_task_name(task: str) -> str:
    if not isinstance(task, str) or not _TASK_RE.match(task):
        raise SeapError(
            f"invalid task name {task!r}",
            "task names use letters, digits, '_', '-' and '.', starting with a letter or digit",
        )
    return task


def _check_line(path: Path, number: int, record: Record, unit: str = "line") -> None:
    """A record of a known schema whose fields do not fit it: an error naming file, line and field."""
    fields = {k: v for k, v in record.items() if k != "task"}
    if "seap_corpus" in fields:
        return  # a corpus file's header
    try:
        schema = detect_schema(fields)
    except SeapError:
        return  # (not calibration data, e.g. an evaluation-only benchmark; building a corpus names it)
    try:
        check_record(fields, schema)
    except ValueError as exc:
        raise SeapError(f"{path}, {unit} {number}: {exc} (schema {schema!r})",
                        "fix that record; see docs/engine.md, calibration data") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read task records from a ``.jsonl`` file (one object per line) or a ``.json`` list."""
    p = Path(path)
    if p.is_dir():
        raise SeapError(f"{p} is a folder, not a records file",
                        "pass one .jsonl or .json file of records (a folder of tasks is --data-dir)")
    if not p.is_file():
        raise SeapError(f"calibration file not found: {p}", "check the path")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SeapError(f"calibration file {p} is not UTF-8 text", "pass a JSON Lines file") from exc
    records: list[dict[str, Any]] = []
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SeapError(f"{p} is not valid JSON: {exc}", "fix the file or use JSON Lines") from exc
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise SeapError(f"{p} must hold a JSON list of objects", "fix the file or use JSON Lines")
        for index, obj in enumerate(data, start=1):
            _check_line(p, index, obj, "record")
        records = data
    else:
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SeapError(
                    f"{p}, line {lineno}: not valid JSON ({exc.msg})",
                    "each line must be one JSON object, e.g. "
                    '{"question": "...", "choices": ["...", "..."], "answer": 0}',
                ) from exc
            if not isinstance(obj, dict):
                raise SeapError(f"{p}, line {lineno}: expected a JSON object, got {type(obj).__name__}",
                                "each line must be one JSON object")
            _check_line(p, lineno, obj)
            records.append(obj)
    if not records:
        raise SeapError(f"calibration file {p} holds no records", "add at least one record per task")
    return records


def build_corpus(
    records: Sequence[Record],
    task: str,
    n_samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
    schema: str | None = None,
    keep_empty: bool = False,
    source: str | None = None,
) -> CalibrationCorpus:
    """Sample ``n_samples`` records (all if fewer or ``None``) with ``seed`` and build their texts.

    Empty texts are dropped unless ``keep_empty`` (SEAP's code keeps empty WikiText lines,
    which calibrate on the BOS token alone).
    """
    check_task_name(task)
    if n_samples is not None and n_samples <= 0:
        raise SeapError(f"samples per task must be positive, got {n_samples}", "pass --samples 1 or more")
    texts = [knowledge_sentence(r, schema) for r in records]
    candidates = [t for t in texts if keep_empty or t.strip()]
    if not candidates:
        raise SeapError(f"task {task!r} has no non-empty calibration text", "check the records' fields")
    if n_samples is not None and n_samples < len(candidates):
        rng = random.Random(seed)
        picked = sorted(rng.sample(range(len(candidates)), n_samples))
        candidates = [candidates[i] for i in picked]
    meta = {"n_requested": n_samples, "seed": seed, "schema": schema or "auto", "source": source}
    return CalibrationCorpus(task, candidates, meta)


def corpora_from_records(
    records: Sequence[Record],
    default_task: str,
    n_samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
    tasks: Iterable[str] | None = None,
    source: str | None = None,
) -> dict[str, CalibrationCorpus]:
    """Group records by their ``"task"`` field (``default_task`` if absent) and build one corpus per task."""
    grouped: dict[str, list[Record]] = {}
    for r in records:
        task = str(r.get("task", default_task))
        grouped.setdefault(task, []).append({k: v for k, v in r.items() if k != "task"})
    wanted = list(tasks) if tasks else sorted(grouped)
    missing = [t for t in wanted if t not in grouped]
    if missing:
        raise SeapError(
            f"task(s) {missing} not found in the calibration records",
            f"the records hold: {', '.join(sorted(grouped))}",
        )
    return {t: build_corpus(grouped[t], t, n_samples, seed, source=source) for t in wanted}


def write_corpus(path: str | Path, corpora: Mapping[str, CalibrationCorpus], max_tokens: int | None = None) -> Path:
    """Write corpora to one JSON Lines file (header line first), atomically."""
    header = {
        "seap_corpus": CORPUS_FORMAT_VERSION,
        "max_tokens": max_tokens,
        "tasks": {t: {"n": len(c), "digest": c.digest(), **c.meta} for t, c in corpora.items()},
    }
    lines = [json.dumps(header, sort_keys=True)]
    for task, corpus in corpora.items():
        lines.extend(json.dumps({"task": task, "text": text}, ensure_ascii=False) for text in corpus.texts)
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_corpus(path: str | Path, default_task: str | None = None) -> tuple[dict[str, CalibrationCorpus], dict[str, Any]]:
    """Read a corpus file; returns the corpora by task and the header (empty if none).

    A file of task records (not yet texts) is converted with :func:`knowledge_sentence`,
    keeping every record.
    """
    p = Path(path)
    records = read_records(p)
    header: dict[str, Any] = {}
    if "seap_corpus" in records[0]:
        header = records.pop(0)
        if header["seap_corpus"] != CORPUS_FORMAT_VERSION:
            raise SeapError(f"corpus {p} has format version {header['seap_corpus']}", "rebuild it with `seap corpus`")
    if not records:
        raise SeapError(f"corpus {p} holds no texts", "rebuild it with `seap corpus`")
    corpora = corpora_from_records(records, default_task or _stem_task(p), n_samples=None, source=str(p))
    for task, corpus in corpora.items():
        corpus.meta.update(header.get("tasks", {}).get(task, {}))
        corpus.meta.pop("digest", None)
    return corpora, header


def _stem_task(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem) or "task"
    return stem if stem[0].isalnum() else f"t{stem}"


BUILTIN_CALIBRATION = "builtin"  # the calibration source that means the built-in starter suite


def load_calibration_records(source: str) -> list[dict[str, Any]]:
    """Records from a JSON/JSONL file, or the built-in starter suite for ``"builtin"``."""
    if source == BUILTIN_CALIBRATION:
        from seap.data.starter import starter_calibration_records

        return starter_calibration_records()
    return read_records(source)


def build_corpora(
    source: str,
    tasks: Sequence[str] | None = None,
    samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
) -> dict[str, CalibrationCorpus]:
    """Calibration corpora per task from a records file (``"task"`` field, else the file name)."""
    records = load_calibration_records(source)
    default_task = "builtin" if source == BUILTIN_CALIBRATION else Path(source).stem
    return corpora_from_records(records, default_task, samples, seed, tasks, source=source)
