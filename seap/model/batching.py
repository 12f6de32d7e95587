"""Turning calibration texts into batches: token ids, shards of a corpus, batches of similar
length and their padding. Every pass over tokenized text (statistics, refits, router
statistics and features) batches it so."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from seap.errors import SeapError


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The indices of sequences of the given ``lengths``, grouped in batches of at most
    ``batch_size`` of similar length (longest first, ties in index order) to minimise padding.
    Every pass over tokenized texts (statistics, router statistics, refits, router features)
    batches them so."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard_texts(texts: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Texts ``i, i+n, i+2n, ...`` of ``shard=(i, n)`` (all of them without a shard); an invalid
    shard is refused."""
    if shard is None:
        return list(texts)
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise SeapError(f"invalid shard {index}/{count}", "shards are numbered 0..n-1, e.g. --shard 0/4")
    return list(texts)[index::count]


def tokenize_corpus(tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_tokens``; texts that tokenize to nothing are dropped."""
    kwargs: dict[str, Any] = {"truncation": max_tokens is not None}
    if max_tokens is not None:
        kwargs["max_length"] = max_tokens
    ids = [tokenizer(t, **kwargs)["input_ids"] for t in texts]
    return [x for x in ids if len(x) > 0]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


__all__ = ["length_batches", "pad_batch", "shard_texts", "tokenize_corpus"]
