"""Loglikelihoods of continuations with every shared prefix computed once.

A multiple-choice item asks for ``log p(continuation | context)`` of every choice; the
choices share their context, and the items of a task often share the start of their
contexts too ("The capital of ..."). lm-eval's ``HFLM`` runs ``context + choice`` once per
choice and projects every position onto the vocabulary. Here all requests go into one
prefix tree of tokens (the input of a request is ``context + continuation[:-1]``; the last
continuation token is never an input): a token's hidden states depend only on the tokens
before it, so every distinct prefix is computed once. The tree is cut into rows (depth-first,
each row carrying the ancestors of its tokens), each token attends to its ancestors only
(a tree-shaped attention mask; position id = depth), and only the positions that predict a
continuation token are projected onto the vocabulary. Every loglikelihood is the one ``HFLM``
computes, up to float rounding (the tests hold both to 1e-4 and the greedy flags equal),
for a fraction of the tokens (on the starter suite: 8.7k tokens instead of 44k).

The packing is pure (token lists in, index lists out); :class:`SharedContextHFLM` is the
lm-eval glue. Requests the packing cannot serve exactly (longer than the model's window,
a model whose attention takes no custom mask) go through ``HFLM`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

DEFAULT_ROW_TOKENS = 256  # tokens per packed row (the masked attention grows with its square)


@dataclass
class PrefixTree:
    """Distinct token prefixes: node ``i`` is token ``token[i]`` after the path to ``parent[i]``
    (-1: a first token), at position ``depth[i]``."""

    token: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)
    _index: dict[tuple[int, int], int] = field(default_factory=dict)

    def insert(self, tokens: Sequence[int]) -> list[int]:
        """The node of every prefix of ``tokens`` (added where new), root to leaf."""
        path, parent = [], -1
        for t in tokens:
            node = self._index.get((parent, t))
            if node is None:
                node = len(self.token)
                self._index[(parent, t)] = node
                self.token.append(int(t))
                self.parent.append(parent)
                self.depth.append(len(path))
                self.children.append([])
                if parent >= 0:
                    self.children[parent].append(node)
            path.append(node)
            parent = node
        return path

    def depth_first(self) -> list[int]:
        """Every node once, parents before children, siblings in insertion order."""
        order: list[int] = []
        stack = [n for n in reversed(range(len(self.token))) if self.parent[n] < 0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children[node]))
        return order


@dataclass
class PackedRow:
    """One model input: tree nodes (each after its ancestors), and where requests read.

    ``parent[i]`` is the row index of token ``i``'s parent (-1: none), ``position[i]`` its
    position id. ``reads[r]`` lists, for request ``r``, the row indices whose logits predict
    its continuation tokens ``targets[r]``, in order.
    """

    tokens: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    reads: dict[int, list[int]] = field(default_factory=dict)
    targets: dict[int, list[int]] = field(default_factory=dict)
    slot: dict[int, int] = field(default_factory=dict)  # tree node -> row index

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tree: PrefixTree, node: int) -> None:
        parent = tree.parent[node]
        self.slot[node] = len(self.tokens)
        self.tokens.append(tree.token[node])
        self.position.append(tree.depth[node])
        self.parent.append(self.slot[parent] if parent >= 0 else -1)


def pack_requests(requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  row_tokens: int = DEFAULT_ROW_TOKENS) -> list[PackedRow]:
    """Pack ``(context, continuation)`` token requests into rows of at most ``row_tokens``
    tokens (more only where one request's own input is longer), sharing every common prefix
    within a row. Every request needs a non-empty context and continuation; each request
    index appears in exactly one row's ``reads``, the row that holds its whole input."""
    tree = PrefixTree()
    ends: dict[int, list[int]] = {}  # deepest node -> requests ending there
    paths: list[list[int]] = []
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i} has an empty context or continuation")
        path = tree.insert(list(context) + list(continuation[:-1]))
        paths.append(path)
        ends.setdefault(path[-1], []).append(i)
    rows: list[PackedRow] = [PackedRow()]
    for node in tree.depth_first():
        row = rows[-1]
        missing = [node]  # the node and its ancestors not yet in this row, leaf first
        while tree.parent[missing[-1]] >= 0 and tree.parent[missing[-1]] not in row.slot:
            missing.append(tree.parent[missing[-1]])
        if len(row) + len(missing) > row_tokens and len(row):
            row = PackedRow()
            rows.append(row)
            missing = [node]
            while tree.parent[missing[-1]] >= 0:
                missing.append(tree.parent[missing[-1]])
        for n in reversed(missing):
            row.add(tree, n)
        for r in ends.get(node, ()):
            context_len = len(requests[r][0])
            row.reads[r] = [row.slot[n] for n in paths[r][context_len - 1:]]
            row.targets[r] = list(requests[r][1])
    return [r for r in rows if len(r)]


def tree_attention(rows: Sequence[PackedRow], length: int) -> torch.Tensor:
    """``(batch, 1, length, length)`` boolean mask, True where query ``i`` may attend key
    ``j``: ``j`` is ``i`` or one of its ancestors. Padding attends to itself only."""
    mask = torch.eye(length, dtype=torch.bool).repeat(len(rows), 1, 1)
    for b, row in enumerate(rows):
        for i, parent in enumerate(row.parent):
            if parent >= 0:
                mask[b, i] |= mask[b, parent]
    return mask[:, None]


def batch_rows(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of ``rows``: input ids, position ids, the attention mask, and the
    boolean ``(batch, L)`` map of the positions whose logits are read."""
    length = max(len(r) for r in rows)
    shape = (len(rows), length)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    keep = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        ids[b, :n] = torch.tensor(row.tokens)
        position[b, :n] = torch.tensor(row.position)
        for reads in row.reads.values():
            keep[b, reads] = True
    return {"input_ids": ids, "position_ids": position, "attention_mask": tree_attention(rows, length), "keep": keep}


def continuation_scores(logprobs: torch.Tensor, keep: torch.Tensor, rows: Sequence[PackedRow]
                        ) -> dict[int, tuple[float, bool]]:
    """Per request: (sum of its continuation's log-probabilities, whether every continuation
    token is the greedy one). ``logprobs`` holds one row per True entry of ``keep``
    (row-major), as the model returns them for a boolean ``logits_to_keep``."""
    flat = (torch.cumsum(keep.flatten().long(), 0) - 1).tolist()  # (b, pos) -> row of logprobs
    width = keep.shape[1]
    request_ids, read_rows, tokens = [], [], []
    for b, row in enumerate(rows):
        for r, reads in row.reads.items():
            request_ids += [r] * len(reads)
            read_rows += [flat[b * width + p] for p in reads]
            tokens += row.targets[r]
    index = torch.tensor(read_rows, dtype=torch.long, device=logprobs.device)
    target = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
    chosen = logprobs[index, target].double().cpu().tolist()
    greedy = (logprobs.argmax(-1)[index] == target).cpu().tolist()
    sums: dict[int, float] = {}
    alls: dict[int, bool] = {}
    for r, lp, g in zip(request_ids, chosen, greedy, strict=True):
        sums[r] = sums.get(r, 0.0) + lp
        alls[r] = alls.get(r, True) and bool(g)
    return {r: (sums[r], alls[r]) for r in sums}


class SharedContextHFLM(HFLM):
    """lm-eval's ``HFLM`` whose loglikelihoods compute each shared context once (see the
    module docstring). ``batch_size`` counts packed rows of ``row_tokens`` tokens."""

    def __init__(self, *args: Any, row_tokens: int = DEFAULT_ROW_TOKENS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.row_tokens = row_tokens

    def _packable(self) -> bool:
        config = getattr(self.model, "config", None)
        return (self.backend == "causal" and config is not None
                and getattr(config, "_attn_implementation", None) in ("sdpa", "eager"))

    def _window(self) -> int:
        """Longest request served packed: the model's length, and its sliding window if any
        (a custom mask replaces the window)."""
        window = self.max_length + 1
        sliding = getattr(self.model.config, "sliding_window", None)
        if isinstance(sliding, int) and sliding > 0:
            window = min(window, sliding)
        return window

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not requests or not self._packable():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        window = self._window()
        packed = [i for i, (_, c, x) in enumerate(requests) if c and x and len(c) + len(x) <= window]
        rest = [i for i in range(len(requests)) if i not in set(packed)]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if rest:
            for i, answer in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm,
                                                                     override_bs), strict=True):
                results[i] = answer
        if packed:
            pairs = [(requests[i][1], requests[i][2]) for i in packed]
            for j, answer in self._score_packed(pairs, disable_tqdm).items():
                i = packed[j]
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    def _score_packed(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool
                      ) -> dict[int, tuple[float, bool]]:
        from tqdm.auto import tqdm

        rows = pack_requests(pairs, self.row_tokens)
        batch = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 16
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eager = self.model.config._attn_implementation == "eager"
        dtype = next(self.model.parameters()).dtype
        out: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            t = {k: v.to(self.device) for k, v in batch_rows(chunk, pad).items()}
            mask = t["attention_mask"]
            if eager:  # eager attention adds its mask
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                logits = self.model(input_ids=t["input_ids"], attention_mask=mask, position_ids=t["position_ids"],
                                    logits_to_keep=t["keep"], use_cache=False).logits
            logprobs = torch.nn.functional.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1,
                                                       dtype=self.softmax_dtype)
            scores = continuation_scores(logprobs, t["keep"], chunk)
            out.update(scores)
            bar.update(len(scores))
        bar.close()
        return out
