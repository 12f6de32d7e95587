"""Small generated task folders for tests (no ../shared needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

# two tasks with disjoint, in-vocabulary words, so a router can separate them
GEO = ["paris", "france", "rome", "italy", "berlin", "germany", "capital", "city"]
LIFE = ["water", "hot", "low", "little", "man", "year", "day", "people", "work", "live"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_rows(words: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))
        choices = rng.sample(words, 3)
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(3)})
    return rows


def make_task_dir(root: Path, n_train: int = 30, n_eval: int = 12) -> Path:
    """``root/geo`` and ``root/life``: user multiple-choice tasks with train and validation splits."""
    for seed, (name, words) in enumerate((("geo", GEO), ("life", LIFE))):
        write_jsonl(root / name / "train.jsonl", mc_rows(words, n_train, seed))
        write_jsonl(root / name / "validation.jsonl", mc_rows(words, n_eval, seed + 100))
    return root


def make_piqa_dir(root: Path) -> Path:
    """A tiny PIQA folder in the Hugging Face schema (for the local: source)."""
    rows = [{"goal": f"how do i {w}", "sol1": f"use {w}", "sol2": f"avoid {w}", "label": i % 2}
            for i, w in enumerate(GEO + LIFE)]
    write_jsonl(root / "piqa" / "train.jsonl", rows[:10])
    write_jsonl(root / "piqa" / "validation.jsonl", rows[10:])
    return root
