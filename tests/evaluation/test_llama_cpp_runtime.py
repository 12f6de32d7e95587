"""GGUF exports run in a real, unmodified llama.cpp (the pinned release of scripts/build_llama_cpp.sh).

Skipped, with the reason, when that build is absent (CI runs the fast tests only). To run them:

    bash scripts/build_llama_cpp.sh            # once, about 10 minutes on 2 cores
    bash scripts/test.sh tests/evaluation/test_llama_cpp_runtime.py

The embedded default (SmolLM2-135M) is exported dense and pruned at 20% and 50% (logistic
schedule, reconstruction on, so refitted biases are exercised) in float32; llama.cpp must
tokenize the prompt as transformers does, agree on the next-token logits within
:data:`LOGIT_ATOL` at every position (with the same argmax), and generate the same 32 greedy tokens.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from seap.evaluation.llama_cpp_runtime import BUILD_COMMAND, find_llama_cpp, llama_bench, llama_cpp_model
from seap.export.to_gguf import export_gguf
from seap.model.checkpoint import load_pruned
from seap.model.loading import load_model
from seap.run.oneshot import prune

# float32 export: llama.cpp and PyTorch differ only by accumulation order and llama.cpp's own
# exp/silu kernels; measured 0.015-0.022 on logits of magnitude ~27 (2026-12-03)
LOGIT_ATOL = 0.05
GREEDY_TOKENS = 32
PROMPT = "The capital of France is Paris. The capital of Italy is"


def _build():
    # the tests run with an isolated SEAP_CACHE_DIR: look where the build script puts it for the user too
    return find_llama_cpp() or find_llama_cpp(os.path.expanduser("~/.cache/seap/llama.cpp/0.3.36"))


BUILD = _build()
pytestmark = [pytest.mark.external, pytest.mark.usefixtures("all_cores"),  # a llama.cpp build and the built-in SmolLM2
              pytest.mark.skipif(BUILD is None, reason=f"no llama.cpp build: run `{BUILD_COMMAND}` once to run these")]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu", dtype="float32")


def _hf_greedy(loaded, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):  # plain argmax, no stopping at the end-of-text token (llama.cpp does not stop either)
            seq.append(int(loaded.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5])
def test_llama_cpp_agrees_with_seap(smollm, tmp_path, sparsity) -> None:
    if sparsity:
        prune(smollm, "builtin", sparsity, tmp_path / "pruned", samples=16, progress=False, workdir=str(tmp_path / "work"))
        loaded = load_pruned(tmp_path / "pruned", device="cpu", dtype="float32")
    else:
        loaded = smollm
    path = export_gguf(loaded, tmp_path / "model.gguf", dtype="f32")
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        want = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with llama_cpp_model(BUILD, path) as llm:
        assert llm.tokenize(PROMPT) == ids  # the tokenizer travelled with the file
        got = llm.logits(ids)
        greedy = llm.greedy(ids, GREEDY_TOKENS)
    diff = float(np.abs(got - want).max())
    print(f"\nsparsity {sparsity}: {loaded.adapter.geometry(loaded.model).total_params()} prunable weights, "
          f"max |logit difference| {diff:.4f} (largest logit {np.abs(want).max():.1f}), greedy {greedy[:8]}...")
    assert diff <= LOGIT_ATOL
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert greedy == _hf_greedy(loaded, ids, GREEDY_TOKENS)


def test_llama_bench_reports_both_phases(smollm, tmp_path) -> None:
    path = export_gguf(smollm, tmp_path / "dense.gguf")
    (row,) = llama_bench(BUILD, [path], prompt_tokens=32, gen_tokens=8, repetitions=1)
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["params"] == sum(p.numel() for p in smollm.model.parameters())



def test_a_speed_target_timed_in_llama_cpp_takes_the_smallest_candidate_that_reaches_it(tmp_path) -> None:
    """``--speedup-engine llama.cpp``: every candidate shape exported to GGUF and timed against
    dense in one llama-bench run; alone, the speed target takes the smallest candidate that
    reaches it (every larger one too), read off those timings."""
    import json

    from seap.maths.budget import speed_sparsity

    work = tmp_path / "work"
    result = prune("smollm2-135m", None, None, tmp_path / "pruned", tasks=["sentiment"], progress=False,
                   workdir=str(work), min_speedup=1.15, speedup_engine="llama.cpp", budget_grid=[0.1, 0.5],
                   selection_items=20, samples=16, bench_llama_cpp=str(BUILD.root), bench_repeats=2)
    timed = json.loads(next(work.glob("candidate-speed/*/bench.json")).read_text())
    assert timed["setup"]["runtime"] == "llama.cpp" and timed["setup"]["tool"] == "llama-bench"
    curve = {float(k.split("@")[1].split(":")[0]): v["prefill_speedup"] for k, v in timed["models"].items()}
    record = json.loads(next(work.glob("budget/budget-*/budget.json")).read_text())["tasks"]["sentiment"]
    print(f"\nllama.cpp prefill speed-up by candidate: {curve}; chosen {record['chosen']}")
    assert record["speed"]["curve"] == {f"{s:g}": v for s, v in sorted(curve.items())}
    assert record["chosen"] == (speed_sparsity(curve, 1.15) or 0.0)
    assert curve[0.5] > curve[0.1]  # (half the prunable weights gone: faster in llama.cpp)
    assert result.out_dir.exists()
