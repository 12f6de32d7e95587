import pytest
import torch

from seap.maths.statistics import LayerStatistics, WeightColumnNorms
from seap.errors import SeapError
from seap.maths.scores import SCORES, aggregate_heads, combine_scores, compute_scores, general_weights
from seap.maths.moments import ChannelMoments


def fake_stats(seed=0, with_weights=False):
    """ActivationStatistics-like object with known numbers (2 heads x 2 dims, 3 channels); with
    ``with_weights`` also the raw o_proj and down_proj weights the norms were taken of."""
    from seap.maths.statistics import ActivationStatistics
    from seap.maths.geometry import LayerGeometry, ModelGeometry

    g = torch.Generator().manual_seed(seed)
    attn = ChannelMoments.from_samples(torch.randn(50, 4, generator=g, dtype=torch.float64))
    mlp = ChannelMoments.from_samples(torch.randn(50, 3, generator=g, dtype=torch.float64))
    o_weight, down_weight = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    o, d = WeightColumnNorms.of(o_weight), WeightColumnNorms.of(down_weight)
    geo = ModelGeometry(6, (LayerGeometry(2, 2, 2, 3),))
    stats = ActivationStatistics([LayerStatistics(attn, mlp, o, d)], geo,
                                 {"task": f"t{seed}", "model_fingerprint": "sha256:x", "corpus_digest": "c"})
    return (stats, o_weight, down_weight) if with_weights else stats


def expected_channel_scores(inputs: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each score of the input channels of a linear layer, from its input activations [tokens, in]
    and its weight [out, in] alone (the method notes' formulas; torch.linalg norms of the columns)."""
    x, w = inputs.to(torch.float64), weight.detach().to(torch.float64)
    variance, mean_sq = x.var(dim=0, unbiased=False), (x * x).mean(dim=0)
    l2 = torch.linalg.vector_norm(w, ord=2, dim=0)
    l1 = torch.linalg.vector_norm(w, ord=1, dim=0)
    return {"seap-sf": variance * l2 ** 2, "seap-sw-paper": mean_sq * l1, "seap-sw-code": mean_sq.sqrt() * l2 ** 2,
            "wanda-sp": mean_sq.sqrt() * l1 / w.shape[0], "flap": variance * l2 ** 2}


def test_score_formulas() -> None:
    st, _, down_weight = fake_stats(with_weights=True)
    mlp = st.layers[0].mlp
    w = down_weight.to(torch.float64)
    l2_sq, l1 = (w * w).sum(dim=0), w.abs().sum(dim=0)  # column norms of the weight itself
    expected = {
        "seap-sf": mlp.variance * l2_sq,
        "seap-sw-paper": mlp.mean_sq * l1,
        "seap-sw-code": mlp.mean_sq.sqrt() * l2_sq,
        "wanda-sp": mlp.mean_sq.sqrt() * l1 / 6,
        "flap": mlp.variance * l2_sq,
    }
    for name, value in expected.items():
        torch.testing.assert_close(compute_scores(st, name).layers[0].channels, value)


@pytest.mark.parametrize("score", list(SCORES))
def test_scores_of_a_real_model_equal_its_weights_and_activations(score) -> None:
    """Collected statistics of a tiny model, scored: every layer's channel and head scores equal
    the formulas applied to the o_proj / down_proj weights of its modules and to the inputs
    those modules saw (captured one text at a time)."""
    from seap.data.corpus import build_corpus
    from seap.model.calibration import collect_statistics
    from tests.helpers import SENTENCES, make_tiny_model
    from tests.model.test_calibration import direct_inputs

    loaded = make_tiny_model("llama-gqa")
    texts = SENTENCES[:6]
    scores = compute_scores(collect_statistics(loaded, build_corpus([{"text": t} for t in texts], "toy", None),
                                               batch_size=4, progress=False), score)
    seen = direct_inputs(loaded, texts)
    how = SCORES[score].head_aggregation
    for i, mods in enumerate(loaded.adapter.all_layer_modules(loaded.model)):
        got = scores.layers[i]
        channels = expected_channel_scores(torch.from_numpy(seen[(i, "mlp")]), mods.down_proj.weight)[score]
        torch.testing.assert_close(got.channels, channels, rtol=1e-4, atol=1e-10)
        attn = expected_channel_scores(torch.from_numpy(seen[(i, "attn")]), mods.o_proj.weight)[score]
        attn = attn * attn if how == "square-sum" else attn
        per_head = attn.reshape(8, 8)  # 8 heads of head_dim 8
        heads = per_head.mean(dim=1) if how == "mean" else per_head.sum(dim=1)
        torch.testing.assert_close(got.attn_channels, attn, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(got.heads, heads, rtol=1e-4, atol=1e-10)


def test_head_aggregation() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert aggregate_heads(x, 2, "sum")[1].tolist() == [3.0, 7.0]
    assert aggregate_heads(x, 2, "mean")[1].tolist() == [1.5, 3.5]
    assert aggregate_heads(x, 2, "square-sum")[1].tolist() == [5.0, 25.0]
    st = fake_stats()
    flap = compute_scores(st, "flap").layers[0]
    sf = compute_scores(st, "seap-sf").layers[0]
    torch.testing.assert_close(flap.attn_channels, sf.attn_channels ** 2)


def test_unknown_score() -> None:
    with pytest.raises(SeapError, match="unknown score 'nope'") as err:
        compute_scores(fake_stats(), "nope")
    assert all(name in str(err.value) for name in SCORES)


def test_general_weights_and_combination() -> None:
    assert general_weights(["boolq", "wikitext"]) == {"boolq": 2.0, "wikitext": 3.0}
    assert general_weights(["a", "b"], {"a": 5}) == {"a": 5.0, "b": 2.0}
    with pytest.raises(SeapError, match="unknown task"):
        general_weights(["a"], {"zzz": 1})
    s0, s1 = compute_scores(fake_stats(0)), compute_scores(fake_stats(1))
    mixed = combine_scores([s0, s1])
    torch.testing.assert_close(mixed.layers[0].channels, 2 * s0.layers[0].channels + 2 * s1.layers[0].channels)
    assert mixed.task == "general" and mixed.meta["tasks"] == {"t0": 2.0, "t1": 2.0}
