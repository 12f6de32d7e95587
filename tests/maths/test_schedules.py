import warnings

import pytest

from seap.errors import SeapError
from seap.maths.geometry import LayerGeometry, ModelGeometry
from seap.maths.schedules import allocate, check_sparsity, logistic_allocation, logistic_shape, uniform_allocation

# SmolLM2-135M-like geometry (30 layers, GQA 9/3 heads, head_dim 64, intermediate 1536)
SMOL = ModelGeometry(576, tuple(LayerGeometry(9, 3, 64, 1536) for _ in range(30)))
# Llama-2-7B geometry (MHA 32 heads)
LLAMA7B = ModelGeometry(4096, tuple(LayerGeometry(32, 32, 128, 11008) for _ in range(32)))


@pytest.mark.parametrize("geometry", [SMOL, LLAMA7B], ids=["smollm2", "llama2-7b"])
@pytest.mark.parametrize("target", [0.1, 0.2, 0.35, 0.5, 0.7])
@pytest.mark.parametrize("schedule", ["logistic", "uniform"])
def test_schedules_hit_target_within_half_a_point(geometry, target, schedule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alloc = allocate(schedule, geometry, target)
    assert abs(alloc.realised - target) <= 0.005
    assert alloc.target == target


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_logistic_protects_layers_and_rises(gqa_mode) -> None:
    alloc = logistic_allocation(SMOL, 0.5, gqa_mode, k=1.0, x0=0.3, protect_first=2, protect_last=2)
    ratios = [layer.ratio for layer in alloc.layers]
    assert ratios[:2] == [0, 0] and ratios[-2:] == [0, 0]
    active = ratios[2:-2]
    assert all(a < b for a, b in zip(active, active[1:]))
    assert abs(alloc.realised - 0.5) <= 0.005
    assert alloc.params["lambda"] > 0


def test_logistic_shape_matches_paper_formula() -> None:
    import math

    shape = logistic_shape(6, k=1.0, x0=0.3, protect_first=1, protect_last=1)
    xs = [0, 1 / 3, 2 / 3, 1]
    assert shape[0] == shape[-1] == 0
    for s, x in zip(shape[1:-1], xs):
        assert s == pytest.approx(1 / (1 + math.exp(-(x - 0.3))))


def test_uniform_same_ratio_everywhere() -> None:
    alloc = uniform_allocation(LLAMA7B, 0.2)
    assert len({layer.ratio for layer in alloc.layers}) == 1
    assert len({layer.attn_pruned for layer in alloc.layers}) == 1


def test_zero_sparsity_prunes_nothing() -> None:
    alloc = allocate("logistic", SMOL, 0.0)
    assert alloc.realised == 0 and all(layer.attn_pruned == layer.mlp_pruned == 0 for layer in alloc.layers)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_sparsity_outside_range(bad) -> None:
    with pytest.raises(SeapError, match="sparsity"):
        check_sparsity(bad)


def test_unknown_schedule_and_unreachable_target() -> None:
    with pytest.raises(SeapError, match="unknown schedule 'zigzag'"):
        allocate("zigzag", SMOL, 0.5)
    with pytest.raises(SeapError, match="all 4 layers are protected"):
        allocate("logistic", ModelGeometry(64, tuple(LayerGeometry(4, 4, 16, 64) for _ in range(4))), 0.5)
    with pytest.raises(SeapError, match="unreachable"):
        allocate("logistic", SMOL, 0.95)


@pytest.mark.parametrize("multiple", [8, 32, 64, 128])
@pytest.mark.parametrize("schedule", ["logistic", "flap-adaptive"])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_channel_multiple_rounds_widths_and_keeps_the_target(schedule, target, multiple) -> None:
    scores = _smol_scores() if schedule == "flap-adaptive" else None
    free = allocate(schedule, SMOL, target, channel_multiple=1, scores=scores)
    rounded = allocate(schedule, SMOL, target, channel_multiple=multiple, scores=scores)
    for f, r, g in zip(free.layers, rounded.layers, SMOL.layers, strict=True):
        kept = g.intermediate_size - r.mlp_pruned
        assert kept % multiple == 0 or kept == g.intermediate_size
        assert abs(r.mlp_pruned - f.mlp_pruned) < multiple  # each layer moves by less than one multiple
        assert r.attn_pruned == f.attn_pruned
        if f.mlp_pruned == 0:
            assert r.mlp_pruned == 0  # layers left whole stay whole
    assert abs(rounded.realised - target) <= 0.005
    assert rounded.params["channel_multiple"] == multiple


def _smol_scores():
    """Random scores with SmolLM2's geometry (FLAP's global ranking needs scores)."""
    import torch

    from seap.maths.scores import ImportanceScores, LayerScores

    g = torch.Generator().manual_seed(0)
    layers = [LayerScores(heads=torch.rand(9, generator=g, dtype=torch.float64),
                          channels=torch.rand(1536, generator=g, dtype=torch.float64),
                          attn_channels=torch.rand(9 * 64, generator=g, dtype=torch.float64)) for _ in range(30)]
    return ImportanceScores(layers, SMOL, {"model_fingerprint": "sha256:x", "task": "toy", "score": "flap"})


@pytest.mark.parametrize("target", [0.1, 0.2, 0.5])
def test_uniform_schedule_keeps_one_width_for_all_layers(target) -> None:
    alloc = allocate("uniform", SMOL, target)
    assert len({(a.attn_pruned, a.mlp_pruned) for a in alloc.layers}) == 1
    assert (1536 - alloc.layers[0].mlp_pruned) % alloc.params["channel_multiple"] == 0
    assert abs(alloc.realised - target) <= 0.005 and "same_width" not in alloc.params


def test_channel_multiple_leaves_narrow_layers_and_defaults_to_64() -> None:
    narrow = ModelGeometry(64, tuple(LayerGeometry(8, 4, 8, 96) for _ in range(6)))
    assert allocate("uniform", narrow, 0.3).layers == allocate("uniform", narrow, 0.3, channel_multiple=1).layers
    assert allocate("logistic", SMOL, 0.5).params["channel_multiple"] == 64
    with pytest.raises(SeapError, match="channel_multiple"):
        allocate("logistic", SMOL, 0.5, channel_multiple=0)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("schedule", ["logistic", "flap-adaptive", "uniform"])
def test_same_width_gives_every_layer_one_width_on_target(schedule, target) -> None:
    alloc = allocate(schedule, SMOL, target, same_width=True, scores=object())
    widths = {(a.attn_pruned, a.mlp_pruned) for a in alloc.layers}
    assert len(widths) == 1
    multiple = alloc.params["channel_multiple"]
    assert (1536 - alloc.layers[0].mlp_pruned) % multiple == 0 and multiple <= 64
    assert abs(alloc.realised - target) <= 0.005
    assert alloc.params["same_width"] is True and alloc.params["schedule_replaced"] == schedule


def test_the_reachable_sparsity_is_the_schedules_limit() -> None:
    from seap.maths.schedules import reachable_sparsity

    limit = reachable_sparsity("logistic", SMOL, "kv-groups")
    assert 0.7 < limit < 0.95
    assert allocate("logistic", SMOL, limit - 0.001).realised <= limit + 1e-9  # just below it builds
    with pytest.raises(SeapError, match="unreachable"):
        allocate("logistic", SMOL, limit + 0.01)
    assert reachable_sparsity("logistic", SMOL, "kv-groups", protect_first=10, protect_last=10) < limit
    assert reachable_sparsity("uniform", SMOL) == 1.0
