"""Selection items: each task's train split cut in two (seeded), a part that calibrates and a
held-out part that selects (the quality study's settings, the accuracy budget's sparsities).
The reported evaluation items are never touched.

:func:`write_selection_data` writes a data folder where each task's ``train.jsonl`` is the
calibrating part and ``validation.jsonl`` the held-out part (``items`` records, at most half of
the train split), so that every stage reads it as an ordinary task folder."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_text

MIN_TRAIN_RECORDS = 4  # a train split smaller than this cannot spare items


def _group_of(record: Any, index: int) -> Any:
    """The group a record is held out with: its ``"group"`` field (a fact asked in several
    templates), else the record alone."""
    if isinstance(record, dict) and record.get("group") is not None:
        return ("group", str(record["group"]))
    return ("record", index)


def split_train(records: Sequence[Any], items: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(calibrating part, held-out part) of ``records``: about ``min(items, len // 2)`` records
    held out, drawn with ``seed`` as whole groups (records sharing a ``"group"`` field, so that no
    held-out fact is also calibrated on; a record without one is a group alone), never more than
    half; both parts in the records' own order."""
    groups: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(_group_of(record, i), []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    limit, half = min(items, len(records) // 2), len(records) // 2
    held: list[int] = []
    for key in order:
        if len(held) >= limit:
            break
        if len(held) + len(groups[key]) <= half:
            held.extend(groups[key])
    kept = set(held)
    return [r for i, r in enumerate(records) if i not in kept], [records[i] for i in sorted(held)]


def write_selection_data(specs: Sequence[Any], folder: str | Path, items: int, seed: int,
                         generic: Sequence[str] = (), generic_dir: str | Path | None = None) -> list[str]:
    """Write the selection data folder of the tasks ``specs``
    (:class:`~seap.data.catalogue.TaskSpec`); the ``generic`` tasks (refit text, never
    evaluated) are copied from ``generic_dir`` as they are. Returns the task names as a run on
    the folder spells them (``jsonl:<task>``, or the standard benchmark's own name). Files that
    already hold the same text are left alone."""
    from seap.data.catalogue import STANDARD_TASKS
    from seap.data.corpus import read_records

    folder = Path(folder)
    names = []
    for spec in specs:
        records = spec.calibration_records() if spec.train_file is None else read_records(spec.train_file)
        if len(records) < MIN_TRAIN_RECORDS:
            raise SeapError(f"task {spec.name!r} has {len(records)} train records, too few to hold some out",
                            f"give it at least {MIN_TRAIN_RECORDS} train records, or leave it out")
        train, heldout = split_train(records, items, seed)
        for split, rows in (("train", train), ("validation", heldout)):
            text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
            path = folder / spec.name / f"{split}.jsonl"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                atomic_write_text(path, text)
        if spec.name in STANDARD_TASKS:
            test = folder / spec.name / "test.jsonl"  # lm-eval's definitions may list a test split too
            if not test.is_file():
                atomic_write_text(test, "".join(json.dumps(r, sort_keys=True) + "\n" for r in heldout))
        names.append(spec.name if spec.name in STANDARD_TASKS else f"jsonl:{spec.name}")
    for task in generic:
        source, target = Path(generic_dir or ".") / task, folder / task
        if not target.is_dir():
            if not source.is_dir():
                raise SeapError(f"generic refit text {task!r}: no folder {source}",
                                "put the task under the study's --data-dir, or pass --generic with another task")
            shutil.copytree(source, target.with_name(f".{task}.partial"), dirs_exist_ok=True)
            target.with_name(f".{task}.partial").rename(target)
    return names


__all__ = ["MIN_TRAIN_RECORDS", "split_train", "write_selection_data"]
