"""The pure functions of expert pruning: routing, the router sums, scores, kept counts, masks."""

from __future__ import annotations

import pytest
import torch

from seap.errors import ArtifactError, SeapError
from seap.maths.expert_selection import (ExpertMask, LayerRouterStatistics, expert_scores, keep_top, kept_count,
                                         nearest_pattern, route, router_sums, validate_expert_mask)


def test_route_renormalises_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, index, weights = route(logits, 2, normalise=False)
    assert index.tolist() == [[0, 1]] and torch.allclose(weights, probs[:, :2])
    _, _, normalised = route(logits, 2, normalise=True)
    assert torch.allclose(normalised.sum(-1), torch.ones(1, dtype=torch.float64))


def test_router_sums_and_scores_by_hand() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.5]])
    s = router_sums(logits, 1, normalise=True, output_norms=torch.tensor([[2.0, 9, 9], [9, 4.0, 9], [1.0, 9, 9]]))
    assert s.tokens == 3 and s.selected.tolist() == [2, 1, 0]
    assert s.top1_logit_sum.tolist() == [4.0, 2.0, 0.0]  # PreMoe: the top-1 raw logit, summed
    assert s.reap_sum.tolist() == [3.0, 4.0, 0.0]  # weight 1 (top-1, renormalised) x the routed expert's norm
    assert expert_scores(s, "tcess").tolist() == pytest.approx([4 / 3, 2 / 3, 0])
    assert expert_scores(s, "frequency").tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert expert_scores(s, "reap").tolist() == pytest.approx([1.5, 4.0, 0.0])
    with pytest.raises(SeapError, match="unknown expert score"):
        expert_scores(s, "magic")
    merged = s.merge(s)
    assert merged.tokens == 6 and merged.selected.tolist() == [4, 2, 0]
    with pytest.raises(SeapError):
        s.merge(LayerRouterStatistics.zeros(4))


def test_kept_counts_and_ties() -> None:
    assert kept_count(8, 2, 0.5) == 4 and kept_count(8, 2, 0.0) == 8 and kept_count(64, 8, 0.75) == 16
    with pytest.raises(SeapError, match="at most 0.75"):
        kept_count(8, 2, 0.9)
    assert kept_count(8, 2, 0.9, allow_k_reduction=True) == 1
    with pytest.raises(SeapError, match="outside"):
        kept_count(8, 2, 1.0)
    assert keep_top(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [False, True, True, False]
    assert keep_top(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [True, False, False]  # ties: lower index


def test_a_mask_keeps_at_least_top_k_and_matches_the_model() -> None:
    mask = ExpertMask({0: torch.tensor([True, False, True, True])}, {0: 2}, {"base_fingerprint": "sha256:x",
                                                                             "expert_params": {"0": 10}})
    validate_expert_mask(mask, {0: 4})
    assert mask.realised_sparsity() == pytest.approx(0.25)
    with pytest.raises(Exception, match="covers MoE layers"):
        validate_expert_mask(mask, {0: 4, 1: 4})
    with pytest.raises(Exception, match="has 4 experts, the model 8"):
        validate_expert_mask(mask, {0: 8})
    with pytest.raises(ArtifactError, match="keeps 1 experts for a top-2"):
        validate_expert_mask(ExpertMask({0: torch.tensor([True, False])}, {0: 2}, {}))


def test_nearest_pattern() -> None:
    stored = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    task, confidence, distances = nearest_pattern(torch.tensor([0.9, 0.2]), stored)
    assert task == "a" and 0.5 < confidence < 1 and distances["a"] < distances["b"]
    assert nearest_pattern(torch.tensor([1.0, 0.0]), stored)[1] == 1.0  # an exact match
    assert nearest_pattern(torch.tensor([0.5, 0.5]), stored)[1] == 0.0  # a tie
    with pytest.raises(SeapError, match="no stored expert patterns"):
        nearest_pattern(torch.zeros(2), {})


def test_the_logistic_expert_schedule_prunes_later_layers_more_and_meets_the_target() -> None:
    from seap.maths.expert_selection import expert_allocation

    layers = {i: 16 for i in range(12)}
    top_k = {i: 2 for i in layers}
    kept = expert_allocation(layers, top_k, 0.5, "logistic", protect_first=2, protect_last=1)
    assert kept[0] == kept[1] == kept[11] == 16  # protected
    active = [kept[i] for i in range(2, 11)]
    assert active == sorted(active, reverse=True) and min(active) >= 2
    assert 1 - sum(kept.values()) / (16 * 12) == pytest.approx(0.5, abs=1 / (16 * 12) + 0.02)
    assert expert_allocation(layers, top_k, 0.5, "uniform") == {i: 8 for i in layers}
    with pytest.raises(SeapError, match="unreachable"):
        expert_allocation({0: 4, 1: 4, 2: 4}, {0: 2, 1: 2, 2: 2}, 0.6, "logistic", protect_first=1, protect_last=1)


def test_the_channel_allocation_of_unit_neurons_follows_the_schedule_and_meets_the_target() -> None:
    from seap.maths.expert_selection import channel_allocation

    layers = {i: 256 for i in range(12)}
    widths = channel_allocation(layers, 0.5, "logistic", protect_first=2, protect_last=1)
    assert widths[0] == widths[1] == widths[11] == 256  # protected
    active = [widths[i] for i in range(2, 11)]
    assert active == sorted(active, reverse=True) and all(w % 8 == 0 and w >= 8 for w in active)
    assert 1 - sum(widths.values()) / (256 * 12) == pytest.approx(0.5, abs=0.02)
    assert channel_allocation(layers, 0.5, "uniform") == {i: 128 for i in layers}
    with pytest.raises(SeapError, match="unreachable"):
        channel_allocation({0: 64, 1: 64, 2: 64}, 0.6, "logistic", protect_first=1, protect_last=1)
