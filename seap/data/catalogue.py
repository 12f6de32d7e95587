"""The task catalogue: where each task's calibration records and evaluation come from.

Every task resolves to a :class:`TaskSpec` with a calibration split (train) and an
lm-eval task evaluated on its validation or test split; the two never share records.
Four sources, chosen per task with a ``source:`` prefix or automatically:

* ``hub:NAME``: a standard lm-eval task (boolq, piqa, hellaswag, winogrande, arc_easy,
  arc_challenge, openbookqa, gsm8k, wikitext), data from the Hugging Face hub.
* ``local:NAME``: the same standard task from a local folder of JSONL files in the Hugging
  Face schema (``DATA_DIR/NAME/{train,validation,test}.jsonl``, e.g. ``../shared/benchmarks``),
  evaluated through lm-eval's own task definition with only the data location overridden,
  so prompts and metrics are the standard ones.
* ``jsonl:NAME``: a user's multiple-choice task, ``DATA_DIR/NAME/train.jsonl`` plus
  ``validation.jsonl`` or ``test.jsonl`` with records ``{"question", "choices", "answer"}``.
* ``starter:NAME``: a task of the built-in starter suite (:mod:`seap.data.starter`), written as
  a ``jsonl`` task into the cache; needs no download.

Without a prefix: a starter task name -> starter; a folder ``DATA_DIR/NAME`` -> local (for a
standard name) or jsonl; a standard name -> hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.data.corpus import read_records
from seap.errors import SeapError
from seap.io import atomic_write_text, cache_dir
from seap.data.starter import STARTER_TASKS, starter_files

SOURCES = ("hub", "local", "jsonl", "starter")


@dataclass(frozen=True)
class StandardTask:
    """A standard lm-eval task: its YAML (under lm_eval/tasks) and the splits it uses."""

    yaml: str
    splits: tuple[str, ...]  # data files the YAML reads
    eval_split: str
    calibration_subdir: str | None = None  # a folder with a richer train schema (OBQA fact1)
    kind: str = "multiple_choice"
    hub: tuple[str, str | None] = ("", None)
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # what lm-eval's YAML reports


STANDARD_TASKS: dict[str, StandardTask] = {
    "piqa": StandardTask("piqa/piqa.yaml", ("train", "validation"), "validation", hub=("baber/piqa", None)),
    "boolq": StandardTask("super_glue/boolq/default.yaml", ("train", "validation"), "validation",
                          hub=("aps/super_glue", "boolq"), metrics=("acc",)),
    "hellaswag": StandardTask("hellaswag/hellaswag.yaml", ("train", "validation"), "validation",
                              hub=("Rowan/hellaswag", None)),
    "winogrande": StandardTask("winogrande/default.yaml", ("train", "validation"), "validation",
                               hub=("allenai/winogrande", "winogrande_xl"), metrics=("acc",)),
    "arc_easy": StandardTask("arc/arc_easy.yaml", ("train", "validation", "test"), "test",
                             hub=("allenai/ai2_arc", "ARC-Easy")),
    "arc_challenge": StandardTask("arc/arc_challenge.yaml", ("train", "validation", "test"), "test",
                                  hub=("allenai/ai2_arc", "ARC-Challenge")),
    "openbookqa": StandardTask("openbookqa/openbookqa.yaml", ("train", "validation", "test"), "test",
                               calibration_subdir="additional", hub=("allenai/openbookqa", "additional")),
    "gsm8k": StandardTask("gsm8k/gsm8k.yaml", ("train", "test"), "test", kind="generate_until",
                          hub=("openai/gsm8k", "main")),
    "wikitext": StandardTask("wikitext/wikitext.yaml", ("test",), "test", kind="perplexity",
                             hub=("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
                             extra={"training_split": None, "validation_split": None}),
}


@dataclass
class TaskSpec:
    """One task: how to get its calibration records and how lm-eval evaluates it."""

    name: str
    source: str
    lm_eval_task: str  # the task name registered with the TaskManager
    kind: str  # multiple_choice, generate_until or perplexity
    eval_split: str
    train_file: Path | None = None  # calibration records (local, jsonl, starter)
    eval_file: Path | None = None
    hub: tuple[str, str | None] | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The accuracy metrics lm-eval reports for it (``acc``, and ``acc_norm`` for most)."""
        std = STANDARD_TASKS.get(self.name)
        return std.metrics if std is not None and self.source in ("hub", "local") else ("acc", "acc_norm")

    def calibration_records(self) -> list[dict[str, Any]]:
        """The train-split records (calibration corpora and router training come from these)."""
        if self.train_file is not None:
            return read_records(self.train_file)
        if self.hub is None:
            raise SeapError(f"task {self.name!r} has no training split", "give it a train.jsonl")
        try:
            import datasets

            ds = datasets.load_dataset(self.hub[0], self.hub[1], split="train")
        except Exception as exc:  # noqa: BLE001 - network / hub failures of many kinds
            raise SeapError(
                f"could not load the train split of {self.name!r} from the hub ({str(exc).splitlines()[0][:200]})",
                f"pass a local copy with --data-dir (local:{self.name})",
            ) from exc
        return [dict(r) for r in ds]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "lm_eval_task": self.lm_eval_task, "kind": self.kind,
                "eval_split": self.eval_split, "train_file": str(self.train_file) if self.train_file else None,
                "eval_file": str(self.eval_file) if self.eval_file else None}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(os.path.dirname(lm_eval.tasks.__file__))


def _yaml(obj: dict[str, Any]) -> str:
    """YAML for a task config; lm-eval's YAML loader also reads JSON-style flow values."""
    lines = []
    for key, value in obj.items():
        lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _check_file(path: Path, task: str, split: str, fix: str) -> Path:
    if not path.is_file():
        raise SeapError(f"task {task!r} has no {split} split: {path} is missing", fix)
    return path


def _check_schema(path: Path, task: str, expected: Sequence[str] | None) -> int:
    """Validate every record of a JSONL file against the task's schema; returns the count."""
    records = read_records(path)
    for i, record in enumerate(records, start=1):
        if expected is not None and not set(expected) <= set(record):
            raise SeapError(
                f"{path}, record {i}: fields {sorted(record)} do not match task {task!r} (needs {list(expected)})",
                "fix the file, or check that it belongs to this task",
            )
        if expected is None and not {"question", "choices", "answer"} <= set(record):
            raise SeapError(
                f"{path}, record {i}: not a multiple-choice record (fields {sorted(record)})",
                'use {"question": "...", "choices": ["...", "..."], "answer": <index>}',
            )
        if expected is None:
            choices, answer = record["choices"], record["answer"]
            if not isinstance(choices, list) or len(choices) < 2 or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise SeapError(f"{path}, record {i}: needs 2+ choices and an answer index into them",
                                'e.g. {"question": "2+2=", "choices": ["3", "4"], "answer": 1}')
    return len(records)


# the fields that identify each standard task's schema (checked on local files)
STANDARD_FIELDS: dict[str, tuple[str, ...]] = {
    "piqa": ("goal", "sol1", "sol2", "label"), "boolq": ("passage", "question", "label"),
    "hellaswag": ("ctx", "endings", "label"), "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_easy": ("question", "choices", "answerKey"), "arc_challenge": ("question", "choices", "answerKey"),
    "openbookqa": ("question_stem", "choices", "answerKey"), "gsm8k": ("question", "answer"), "wikitext": ("page",),
}


class TaskCatalogue:
    """Resolves task names to :class:`TaskSpec` and writes the lm-eval YAMLs they need.

    ``data_dir`` is the folder of local tasks; ``work_dir`` receives generated YAMLs and
    starter-suite files (default: ``$SEAP_CACHE_DIR/tasks``).
    """

    def __init__(self, data_dir: str | Path | None = None, work_dir: str | Path | None = None, starter_seed: int = 0):
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise SeapError(f"data folder {self.data_dir} does not exist", "pass an existing folder to --data-dir")
        self.work_dir = Path(work_dir) if work_dir else cache_dir() / "tasks"
        self.yaml_dir = self.work_dir / "lm_eval_yaml"
        self.starter_seed = starter_seed
        self.specs: dict[str, TaskSpec] = {}

    # -- resolution ----------------------------------------------------------------
    def resolve(self, names: Sequence[str]) -> list[TaskSpec]:
        if not names:
            raise SeapError("no tasks given", f"name tasks, e.g. {', '.join(list(STARTER_TASKS)[:3])}")
        specs = [self.resolve_one(n) for n in names]
        seen = [s.name for s in specs]
        if len(set(seen)) != len(seen):
            raise SeapError(f"a task is named twice: {seen}", "name each task once")
        return specs

    def resolve_one(self, name: str) -> TaskSpec:
        source, _, task = name.rpartition(":")
        if source and source not in SOURCES:
            raise SeapError(f"unknown task source {source!r} in {name!r}", f"use one of: {', '.join(SOURCES)}")
        if not source:
            source = self._auto_source(task)
        builder = {"hub": self._hub, "local": self._local, "jsonl": self._jsonl, "starter": self._starter}[source]
        spec = builder(task)
        self.specs[spec.name] = spec
        return spec

    def _auto_source(self, task: str) -> str:
        if task in STARTER_TASKS:
            return "starter"
        if self.data_dir is not None and (self.data_dir / task).is_dir():
            return "local" if task in STANDARD_TASKS else "jsonl"
        if task in STANDARD_TASKS:
            return "hub"
        known = sorted([*STARTER_TASKS, *STANDARD_TASKS])
        where = f" and no folder {self.data_dir / task}" if self.data_dir else ""
        raise SeapError(f"unknown task {task!r}{where}",
                        f"known tasks: {', '.join(known)}; or put a task folder under --data-dir")

    def _hub(self, task: str) -> TaskSpec:
        if task not in STANDARD_TASKS:
            raise SeapError(f"{task!r} is not a standard lm-eval task", f"standard tasks: {', '.join(STANDARD_TASKS)}")
        std = STANDARD_TASKS[task]
        return TaskSpec(task, "hub", task, std.kind, std.eval_split, hub=std.hub)

    def _local(self, task: str) -> TaskSpec:
        if task not in STANDARD_TASKS:
            raise SeapError(f"local:{task} is not a standard lm-eval task", f"use jsonl:{task} for your own tasks")
        if self.data_dir is None:
            raise SeapError(f"local:{task} needs a data folder", "pass --data-dir (e.g. ../shared/benchmarks)")
        std = STANDARD_TASKS[task]
        folder = self.data_dir / task
        fix = f"put the split as {folder}/<split>.jsonl in the Hugging Face schema"
        files = {split: _check_file(folder / f"{split}.jsonl", task, split, fix) for split in std.splits}
        train = files.get("train")
        if std.calibration_subdir and (folder / std.calibration_subdir / "train.jsonl").is_file():
            train = folder / std.calibration_subdir / "train.jsonl"
        eval_file = files[std.eval_split]
        if _check_schema(eval_file, task, STANDARD_FIELDS[task]) == 0:
            raise SeapError(f"the evaluation split of {task!r} is empty", f"fill {eval_file}")
        if train is not None:
            _check_schema(train, task, STANDARD_FIELDS[task])
        name = f"{task}_seap_local"
        config = {"include": str(lm_eval_tasks_dir() / std.yaml), "task": name, "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                  **std.extra}
        self._write_yaml(name, config)
        return TaskSpec(task, "local", name, std.kind, std.eval_split, train, eval_file)

    def _jsonl(self, task: str, folder: Path | None = None, source: str = "jsonl") -> TaskSpec:
        if folder is None:
            if self.data_dir is None:
                raise SeapError(f"jsonl:{task} needs a data folder", "pass --data-dir with a folder per task")
            folder = self.data_dir / task
        if not folder.is_dir():
            raise SeapError(f"task folder {folder} does not exist", "create it with train.jsonl and validation.jsonl")
        train = _check_file(folder / "train.jsonl", task, "train", f"add {folder}/train.jsonl (calibration records)")
        eval_split = "validation" if (folder / "validation.jsonl").is_file() else "test"
        eval_file = _check_file(folder / f"{eval_split}.jsonl", task, "validation or test",
                                f"add {folder}/validation.jsonl (evaluation records)")
        _check_schema(train, task, None)
        if _check_schema(eval_file, task, None) == 0:
            raise SeapError(f"the evaluation split of {task!r} is empty", f"fill {eval_file}")
        name = f"{task}_seap_{source}"
        config = {
            "task": name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"train": str(train), eval_split: str(eval_file)}},
            "training_split": "train", f"{eval_split}_split": eval_split, "output_type": "multiple_choice",
            "doc_to_text": "question", "doc_to_choice": "choices", "doc_to_target": "answer",
            "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        self._write_yaml(name, config)
        return TaskSpec(task, source, name, "multiple_choice", eval_split, train, eval_file)

    def _starter(self, task: str) -> TaskSpec:
        if task not in STARTER_TASKS:
            raise SeapError(f"unknown starter task {task!r}", f"starter tasks: {', '.join(STARTER_TASKS)}")
        root = self.work_dir / "starter" / f"seed{self.starter_seed}"
        for rel, text in starter_files(self.starter_seed, [task]).items():
            path = root / rel
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                atomic_write_text(path, text)
        folder = root / task
        return self._jsonl(task, folder, source="starter")

    def _write_yaml(self, name: str, config: dict[str, Any]) -> None:
        text = _yaml(config)
        path = self.yaml_dir / f"{name}.yaml"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)

    def task_manager(self) -> Any:
        """An lm-eval TaskManager that knows the generated YAMLs.

        lm-eval's own task index (thousands of YAMLs, seconds to build in every process) is
        only included when a resolved task needs it: ``hub`` tasks, and ``local`` ones, whose
        YAMLs include lm-eval's. ``jsonl`` and ``starter`` YAMLs are self-contained.
        """
        from lm_eval.tasks import TaskManager

        self.yaml_dir.mkdir(parents=True, exist_ok=True)
        self_contained = bool(self.specs) and all(s.source in ("jsonl", "starter") for s in self.specs.values())
        return TaskManager(include_path=str(self.yaml_dir), include_defaults=not self_contained)


def resolve_tasks(names: Sequence[str], data_dir: str | Path | None = None) -> tuple[TaskCatalogue, list[TaskSpec]]:
    registry = TaskCatalogue(data_dir)
    return registry, registry.resolve(names)
