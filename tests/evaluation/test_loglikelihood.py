"""Shared-prefix loglikelihoods: the packing is lossless, and the numbers are lm-eval's."""

from __future__ import annotations

import random

import pytest
import torch

from seap.evaluation.harness import hflm
from seap.evaluation.loglikelihood import batch_rows, pack_requests
from seap.model.masking import apply_mask
from tests.helpers import make_tiny_model
from tests.model.test_surgery import mask_for


def _requests(seed: int, vocab: int, groups: int = 25) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    stem = [rng.randrange(3, vocab) for _ in range(4)]
    out = []
    for _ in range(groups):
        context = (stem[: rng.randint(0, 4)] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 10))])
        for _ in range(rng.randint(1, 4)):
            out.append((context, [rng.randrange(3, vocab) for _ in range(rng.randint(1, 5))]))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("row_tokens", [8, 32, 256])
def test_every_request_reads_its_own_input_once(row_tokens: int) -> None:
    requests = _requests(0, 50)
    rows = pack_requests(requests, row_tokens)
    seen = [r for row in rows for r in row.reads]
    assert sorted(seen) == list(range(len(requests)))
    for row in rows:
        assert len(row) <= max(row_tokens, max(len(c) + len(x) - 1 for c, x in requests))
        for r, reads in row.reads.items():
            context, continuation = requests[r]
            path, node = [], reads[-1]  # walk the ancestors of the last read: the request's input
            while node >= 0:
                path.append(row.tokens[node])
                assert row.position[node] == len(context) + len(continuation) - 2 - (len(path) - 1)
                node = row.parent[node]
            assert path[::-1] == context + continuation[:-1]
            assert row.targets[r] == continuation and len(reads) == len(continuation)


def test_shared_prefixes_are_computed_once() -> None:
    requests = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([5, 6, 11], [12, 13])]
    (row,) = pack_requests(requests)
    assert row.tokens == [5, 6, 7, 8, 11, 12]  # inputs 5 6 7 8 / 5 6 7 / 5 6 11 12: 6 tokens, not 11
    mask = batch_rows([row], pad_id=0)["attention_mask"][0, 0]
    for i, parent in enumerate(row.parent):  # each token sees exactly itself and its ancestors
        expected, node = set(), i
        while node >= 0:
            expected.add(node)
            node = row.parent[node]
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected
    with pytest.raises(ValueError, match="empty context or continuation"):
        pack_requests([([], [1])])


def _greedy_continuations(loaded, requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Some requests whose continuation is the model's own greedy output (is_greedy True)."""
    out = []
    for context, _ in requests[:8]:
        with torch.no_grad():
            ids = loaded.model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False,
                                        pad_token_id=0, attention_mask=torch.ones(1, len(context), dtype=torch.long))
        out.append((context, ids[0, len(context):].tolist()))
    return out


@pytest.mark.parametrize("arch,attention,pruned", [("llama-gqa", "sdpa", False), ("llama-gqa", "sdpa", True),
                                                   ("llama-gqa", "eager", True), ("qwen2", "sdpa", False),
                                                   ("mistral", "sdpa", True)])
def test_same_loglikelihoods_and_greedy_flags_as_lm_eval(arch: str, attention: str, pruned: bool) -> None:
    loaded = make_tiny_model(arch)
    if pruned:
        loaded = apply_mask(loaded, mask_for(loaded, 0.4), "hard")
    loaded.model.set_attn_implementation(attention)
    pairs = _requests(1, loaded.model.config.vocab_size)
    pairs += _greedy_continuations(loaded, pairs)
    pairs.append(([5] * 250, [6, 7, 8]))  # longer than the model's 256 positions: served by HFLM itself
    requests = [((None, None), c, x) for c, x in pairs]
    plain = hflm(loaded, 8, shared_context=False)._loglikelihood_tokens(requests, disable_tqdm=True)
    shared = hflm(loaded, 8)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(shared) == len(plain)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(plain, shared, strict=True):
        assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b
    assert sum(g for _, g in shared) >= 8  # the greedy continuations were recognised
