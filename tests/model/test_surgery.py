import pytest
import torch

from seap.model.calibration import collect_statistics
from seap.data.corpus import build_corpus
from seap.errors import ModelMismatchError, SeapError
from seap.maths.masks import build_mask
from seap.model.masking import apply_mask
from tests.helpers import SENTENCES, make_tiny_model


def mask_for(loaded, sparsity=0.4, schedule="logistic", gqa_mode="kv-groups", **kw):
    stats = collect_statistics(loaded, build_corpus([{"text": t} for t in SENTENCES], "toy", None), progress=False)
    from seap.maths.scores import compute_scores

    opts = {"protect_first": 1, "protect_last": 1} if schedule == "logistic" else {}
    return build_mask(compute_scores(stats, kw.pop("score", "seap-sf")), sparsity, schedule, gqa_mode,
                      bias_compensation_stats=stats, **opts)


def logits(loaded, texts=SENTENCES[:4], tokenizer=None):
    batch = (tokenizer or loaded.tokenizer)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**batch).logits


@pytest.mark.parametrize("bias_compensation", [False, True])
@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_soft_equals_hard(tiny, gqa_mode, bias_compensation) -> None:
    mask = mask_for(tiny, gqa_mode=gqa_mode)
    soft = apply_mask(tiny, mask, "soft", bias_compensation=bias_compensation)
    hard = apply_mask(tiny, mask, "hard", bias_compensation=bias_compensation)
    torch.testing.assert_close(logits(soft), logits(hard), atol=1e-4, rtol=0)
    assert not torch.allclose(logits(hard), logits(tiny))  # it did prune something
    geo = hard.adapter.geometry(hard.model)
    assert 1 - geo.total_params() / tiny.adapter.geometry(tiny.model).total_params() == pytest.approx(
        mask.realised_sparsity())
    widths = {(g.num_heads, g.num_kv_heads, g.intermediate_size) for g in geo.layers}
    assert len(widths) > 1  # a different width per layer


def test_zero_mask_is_identity() -> None:
    loaded = make_tiny_model("llama-gqa")
    mask = mask_for(loaded, sparsity=0.0)
    torch.testing.assert_close(logits(apply_mask(loaded, mask, "hard")), logits(loaded))


def test_a_mask_made_to_keep_everything_is_the_dense_model() -> None:
    """(What an expert becomes when no sparsity keeps within its accuracy budget.)"""
    loaded = make_tiny_model("llama-gqa")
    dense = mask_for(loaded, sparsity=0.4).keep_all()
    assert dense.realised_sparsity() == 0 and not dense.has_bias_compensation and not dense.is_reconstructed
    torch.testing.assert_close(logits(apply_mask(loaded, dense, "hard")), logits(loaded), atol=0, rtol=0)


def test_base_model_untouched_unless_inplace() -> None:
    loaded = make_tiny_model("llama-gqa")
    before = logits(loaded)
    apply_mask(loaded, mask_for(loaded), "hard")
    torch.testing.assert_close(logits(loaded), before)


def test_generate_on_hard_pruned(tiny) -> None:
    hard = apply_mask(tiny, mask_for(tiny, 0.5), "hard")
    batch = tiny.tokenizer(["the capital of"], return_tensors="pt")
    out = hard.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, batch["input_ids"].shape[1] + 6)


def test_mask_from_other_model_refused() -> None:
    a, b = make_tiny_model("llama-gqa", seed=1), make_tiny_model("llama-gqa", seed=2)
    with pytest.raises(ModelMismatchError, match="built for base model"):
        apply_mask(b, mask_for(a), "hard")


def test_bad_mode_and_double_pruning() -> None:
    loaded = make_tiny_model("llama-gqa")
    mask = mask_for(loaded)
    with pytest.raises(SeapError, match="unknown pruning mode"):
        apply_mask(loaded, mask, "medium")
    pruned = apply_mask(loaded, mask, "hard")
    pruned.fingerprint = loaded.fingerprint  # even with a forged fingerprint it refuses
    with pytest.raises(SeapError, match="already pruned"):
        apply_mask(pruned, mask, "hard")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_implementations(attn_implementation) -> None:
    loaded = make_tiny_model("llama-gqa")
    loaded.model.set_attn_implementation(attn_implementation)
    mask = mask_for(loaded, 0.5)
    torch.testing.assert_close(logits(apply_mask(loaded, mask, "soft")), logits(apply_mask(loaded, mask, "hard")),
                               atol=1e-4, rtol=0)


def test_experts_share_unpruned_tensors_with_base() -> None:
    loaded = make_tiny_model("llama-gqa")
    hard = apply_mask(loaded, mask_for(loaded), "hard")
    assert hard.model.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight
    assert hard.model.lm_head.weight is loaded.model.lm_head.weight
    base_q = loaded.model.model.layers[3].self_attn.q_proj
    assert hard.model.model.layers[3].self_attn.q_proj is not base_q
