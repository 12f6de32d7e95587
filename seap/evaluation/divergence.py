"""How far a pruned model's next-token distributions are from the dense model's.

The mean KL divergence ``KL(p_dense || p_pruned)`` over every predicted token of a set of
texts: a continuous measure of damage that, unlike accuracy, is not stuck at chance when a
model is badly pruned, and needs no labels. The quality study measures it on held-out text of
each task (the knowledge sentences of its evaluation items, :func:`heldout_texts`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from seap.data.corpus import knowledge_sentence, read_records
from seap.errors import SeapError
from seap.model.loaded import LoadedModel

DEFAULT_KL_TEXTS = 200  # held-out texts per task
DEFAULT_KL_TOKENS = 128  # token cap per text


def heldout_texts(spec: Any, count: int = DEFAULT_KL_TEXTS, seed: int = 0) -> list[str]:
    """Up to ``count`` knowledge sentences of a task's evaluation-split records (never its
    calibration records), sampled with ``seed``."""
    if spec.eval_file is None:
        raise SeapError(f"task {spec.name!r} has no local evaluation file for held-out text",
                        "give it a validation.jsonl (or test.jsonl) in the data folder")
    records = read_records(spec.eval_file)
    if len(records) > count:
        records = random.Random(seed).sample(records, count)
    return [knowledge_sentence(r) for r in records]


def token_kl(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(dense) || softmax(pruned))`` per position (last dimension: the vocabulary)."""
    p = torch.log_softmax(dense_logits.double(), dim=-1)
    q = torch.log_softmax(pruned_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def mean_kl(dense: LoadedModel, pruned: LoadedModel, texts: Sequence[str], max_tokens: int = DEFAULT_KL_TOKENS,
            batch_size: int = 16) -> dict[str, float]:
    """Mean per-token KL of ``pruned`` from ``dense`` over ``texts`` (padding excluded); both
    models must share the tokenizer."""
    if not texts:
        raise SeapError("no texts to measure the KL divergence on", "pass at least one text")
    tok = dense.tokenizer
    total, tokens = 0.0, 0
    device = next(dense.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens).to(device)
            a = dense.model(**batch).logits[:, :-1]
            b = pruned.model(**batch).logits[:, :-1]
            valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
            kl = token_kl(a, b)
            total += float(kl[valid].sum())
            tokens += int(valid.sum())
    return {"kl": total / max(tokens, 1), "tokens": tokens, "texts": len(texts)}


__all__ = ["DEFAULT_KL_TEXTS", "DEFAULT_KL_TOKENS", "heldout_texts", "mean_kl", "token_kl"]
