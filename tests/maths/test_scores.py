import pytest
import torch

from seap.maths.statistics import LayerStatistics, WeightColumnNorms
from seap.errors import SeapError
from seap.maths.scores import SCORES, aggregate_heads, combine_scores, compute_scores, general_weights
from seap.maths.moments import ChannelMoments


def fake_stats(seed=0):
    """ActivationStatistics-like object with known numbers (2 heads x 2 dims, 3 channels)."""
    from seap.maths.statistics import ActivationStatistics
    from seap.maths.geometry import LayerGeometry, ModelGeometry

    g = torch.Generator().manual_seed(seed)
    attn = ChannelMoments.from_samples(torch.randn(50, 4, generator=g, dtype=torch.float64))
    mlp = ChannelMoments.from_samples(torch.randn(50, 3, generator=g, dtype=torch.float64))
    o = WeightColumnNorms.of(torch.randn(6, 4, generator=g))
    d = WeightColumnNorms.of(torch.randn(6, 3, generator=g))
    geo = ModelGeometry(6, (LayerGeometry(2, 2, 2, 3),))
    return ActivationStatistics([LayerStatistics(attn, mlp, o, d)], geo,
                                {"task": f"t{seed}", "model_fingerprint": "sha256:x", "corpus_digest": "c"})


def test_score_formulas() -> None:
    st = fake_stats()
    layer = st.layers[0]
    var, q = layer.mlp.variance, layer.mlp.mean_sq
    c2, c1, rows = layer.down_proj.sq_l2, layer.down_proj.l1, layer.down_proj.out_features
    expected = {
        "seap-sf": var * c2,
        "seap-sw-paper": q * c1,
        "seap-sw-code": q.sqrt() * c2,
        "wanda-sp": q.sqrt() * c1 / rows,
        "flap": var * c2,
    }
    for name, value in expected.items():
        torch.testing.assert_close(compute_scores(st, name).layers[0].channels, value)


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
