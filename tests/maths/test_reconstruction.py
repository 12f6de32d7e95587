"""Closed-form refitting and the second moments it reads (pure tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from seap.maths.moments import SecondMoments
from seap.maths.reconstruction import (RefitOptions, compensation_bias, output_energy, output_error,
                                       refit_from_cross, refit_layer, target_input_moments)


def _inputs(n: int = 400, width: int = 12, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a non-zero mean (what a refit can exploit)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, width, generator=g, dtype=torch.float64)
    return base @ mix + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64) + 0.5


def _weight(d_out: int = 6, width: int = 12) -> torch.Tensor:
    return torch.randn(d_out, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _sample_error(w, x, keep, new, bias=None) -> float:
    y = x @ w.T
    fit = x[:, keep] @ new.T + (bias if bias is not None else 0)
    return float(((y - fit) ** 2).sum(dim=1).mean())


def test_second_moments_merge_exactly_and_exclude_padding() -> None:
    x = _inputs()
    whole = SecondMoments.from_masked(x, None, x.shape[0])
    parts = [SecondMoments.from_masked(x[i:i + 97], None, len(x[i:i + 97])) for i in range(0, len(x), 97)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.gram, whole.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.second_moment, x.T @ x / len(x))
    torch.testing.assert_close(merged.covariance, torch.cov(x.T, correction=0))
    padded = torch.cat([x[:10], torch.full((5, x.shape[1]), 99.0, dtype=torch.float64)])
    weights = torch.cat([torch.ones(10), torch.zeros(5)])
    masked = SecondMoments.from_masked(padded, weights, 10)
    torch.testing.assert_close(masked.gram, x[:10].T @ x[:10])
    acc = SecondMoments.empty(x.shape[1])
    acc.update_(whole)
    assert acc.count == whole.count
    with pytest.raises(ValueError, match="width"):
        whole.merge(SecondMoments.empty(3))


@pytest.mark.parametrize("options", [RefitOptions(alpha=0.0, bias=False), RefitOptions(alpha=1e-2, bias=False), RefitOptions(alpha=1e-2, bias=True),
                                     RefitOptions(alpha=1.0, prior="slice", bias=False)])
def test_refit_never_worse_than_slicing_and_exact_when_nothing_is_pruned(options: RefitOptions) -> None:
    x, w = _inputs(), _weight()
    moments = SecondMoments.from_masked(x, None, len(x))
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    refit = refit_layer(w, moments, keep, options)
    sliced = output_error(w, moments, keep, w[:, keep])
    assert refit.weight.shape == (6, 7)
    error = output_error(w, moments, keep, refit.weight, refit.bias)
    assert error <= sliced + 1e-9
    assert error == pytest.approx(_sample_error(w, x, keep, refit.weight, refit.bias), rel=1e-6, abs=1e-9)
    energy = output_energy(w, moments)  # the errors the refit reports agree with the independent computation
    assert refit.error_sliced == pytest.approx(sliced / energy, rel=1e-6, abs=1e-9)
    assert refit.error_refit == pytest.approx(error / energy, rel=1e-6, abs=1e-9)
    everything = torch.arange(12)
    full = refit_layer(w, moments, everything, options)
    torch.testing.assert_close(full.weight, w, rtol=1e-6, atol=1e-6)
    assert output_error(w, moments, everything, full.weight, full.bias) < 1e-10


def test_unregularised_refit_is_least_squares_and_bias_beats_compensation() -> None:
    x, w = _inputs(), _weight()
    moments = SecondMoments.from_masked(x, None, len(x))
    keep = torch.tensor([1, 4, 6, 9])
    refit = refit_layer(w, moments, keep, RefitOptions(alpha=0.0, bias=False))
    direct = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(refit.weight, direct, rtol=1e-6, atol=1e-8)
    flap = compensation_bias(w, moments, keep)
    with_bias = refit_layer(w, moments, keep, RefitOptions(alpha=1e-3, bias=True))
    flap_error = output_error(w, moments, keep, w[:, keep], flap)
    assert output_error(w, moments, keep, with_bias.weight, with_bias.bias) <= flap_error
    assert flap_error <= output_error(w, moments, keep, w[:, keep])  # the mean alone already helps
    assert output_energy(w, moments) == pytest.approx(float(((x @ w.T) ** 2).sum(1).mean()))


def test_the_slice_prior_falls_back_to_slicing_and_the_zero_prior_to_nothing() -> None:
    x, w = _inputs(), _weight()
    moments = SecondMoments.from_masked(x, None, len(x))
    keep = torch.tensor([0, 1, 2, 3, 4, 5])
    strong_slice = refit_layer(w, moments, keep, RefitOptions(alpha=1e6, prior="slice", bias=False))
    strong_zero = refit_layer(w, moments, keep, RefitOptions(alpha=1e6, prior="zero", bias=False))
    torch.testing.assert_close(strong_slice.weight, w[:, keep], rtol=1e-4, atol=1e-4)
    assert strong_zero.weight.abs().max() < 1e-4


def test_bad_refit_input() -> None:
    x, w = _inputs(), _weight()
    with pytest.raises(ValueError, match="width"):
        refit_layer(w, SecondMoments.from_masked(x[:, :5], None, len(x)), torch.tensor([0]))
    with pytest.raises(ValueError, match="no calibration tokens"):
        refit_layer(w, SecondMoments.empty(12), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown prior"):
        RefitOptions(prior="ones")
    few = SecondMoments.from_masked(x[:3], None, 3)  # fewer tokens than kept columns, no damping: still solved
    refit = refit_layer(w, few, torch.arange(8), RefitOptions(alpha=0.0, bias=False))
    assert torch.isfinite(refit.weight).all()


def test_blocked_accumulation_equals_one_sum() -> None:
    from seap.maths.moments import SecondMomentAccumulator

    x = _inputs(n=1000).to(torch.float32)
    acc = SecondMomentAccumulator(x.shape[1], block_tokens=64)
    for start in range(0, len(x), 37):  # batches that do not line up with the blocks
        acc.add(x[start:start + 37], None, len(x[start:start + 37]))
    result = acc.result()
    exact = x.double()
    assert result.count == 1000 and result.gram.dtype == torch.float64
    torch.testing.assert_close(result.gram, exact.T @ exact, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(result.total, exact.sum(0), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("options", [RefitOptions(alpha=1e-2, bias=False), RefitOptions(alpha=1e-2, bias=True),
                                     RefitOptions(alpha=0.0, prior="zero", bias=True)])
def test_cross_refit_equals_the_one_shot_refit_when_the_inputs_are_the_dense_ones(options: RefitOptions) -> None:
    x, w = _inputs(), _weight()
    keep = torch.tensor([1, 2, 4, 6, 9, 10])
    one_shot = refit_layer(w, SecondMoments.from_masked(x, None, len(x)), keep, options)
    joint = target_input_moments(x @ w.T, x[:, keep])
    cross = refit_from_cross(w, keep, SecondMoments.from_masked(joint, None, len(x)), options)
    torch.testing.assert_close(cross.weight, one_shot.weight)
    if options.bias:
        torch.testing.assert_close(cross.bias, one_shot.bias)
    assert cross.error_refit == pytest.approx(one_shot.error_refit, rel=1e-6, abs=1e-12)
    assert cross.error_sliced == pytest.approx(one_shot.error_sliced, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_sequential_refit_fits_the_dense_output_from_the_pruned_inputs(bias: bool) -> None:
    """The inputs the pruned model produces differ from the dense ones: the refit is the least-
    squares map from them to the dense output (the normal equations hold on the samples), and
    its reported errors are those measured on the samples."""
    x, w = _inputs(), _weight()
    drifted = x + 0.2 * _inputs(seed=5) - 0.1  # what upstream pruning did to this layer's input
    keep = torch.tensor([0, 3, 4, 5, 8, 11])
    joint = target_input_moments(x @ w.T, drifted[:, keep])
    refit = refit_from_cross(w, keep, SecondMoments.from_masked(joint, None, len(x)), RefitOptions(alpha=0.0, bias=bias))
    y, xs = x @ w.T, drifted[:, keep]
    residual = y - xs @ refit.weight.T - (refit.bias if bias else 0)
    features = torch.cat([xs, torch.ones(len(x), 1, dtype=xs.dtype)], dim=1) if bias else xs
    torch.testing.assert_close(features.T @ residual / len(x), torch.zeros(features.shape[1], w.shape[0], dtype=xs.dtype),
                               atol=1e-8, rtol=0)
    energy = float((y ** 2).sum(dim=1).mean())
    assert refit.error_refit == pytest.approx(float((residual ** 2).sum(dim=1).mean()) / energy, rel=1e-6)
    plain = y - xs @ w[:, keep].T
    assert refit.error_sliced == pytest.approx(float((plain ** 2).sum(dim=1).mean()) / energy, rel=1e-6)
    assert refit.error_refit <= refit.error_sliced
    with pytest.raises(ValueError, match="kept inputs"):
        refit_from_cross(w, keep[:-1], SecondMoments.from_masked(joint, None, len(x)))
