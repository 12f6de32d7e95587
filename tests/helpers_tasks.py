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


def direct_mc_accuracy(loaded, eval_file: Path, limit: int | None = None) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of a multiple-choice task computed here, without lm-eval or SEAP's
    harness: each of the first ``limit`` records scores every choice by the summed log-probability
    of ``" " + choice`` after the question (``acc_norm``: divided by the choice's length in
    characters), one unpadded forward pass per choice; the argmax (first on ties) is the answer."""
    import torch

    records = [json.loads(line) for line in Path(eval_file).read_text().splitlines() if line.strip()][:limit]
    hits = {"acc": 0, "acc_norm": 0}
    for record in records:
        context = loaded.tokenizer(record["question"])["input_ids"]
        scores = []
        for choice in record["choices"]:
            whole = loaded.tokenizer(record["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[pos - 1, whole[pos]]) for pos in range(len(context), len(whole))))
        for metric, values in (("acc", scores), ("acc_norm", [s / len(c) for s, c in zip(scores, record["choices"])])):
            hits[metric] += int(max(range(len(values)), key=values.__getitem__) == record["answer"])
    return {metric: count / len(records) for metric, count in hits.items()}
