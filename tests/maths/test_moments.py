import numpy as np
import pytest
import torch

from seap.maths.moments import ChannelMoments, merge_all


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x.mean(0), x.var(0), (x ** 2).mean(0)


def test_single_batch_matches_numpy() -> None:
    x = torch.randn(500, 17) * 3 + 5
    m = ChannelMoments.from_samples(x)
    mean, var, q = reference(x.double().numpy())
    assert m.count == 500
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(m.variance.numpy(), var, rtol=1e-10)
    np.testing.assert_allclose(m.mean_sq.numpy(), q, rtol=1e-12)


def test_streaming_equals_single_pass_with_uneven_batches() -> None:
    x = torch.randn(1000, 9, dtype=torch.float64) * 1e3 + 1e6  # large offset: naive sum of squares would cancel
    acc = ChannelMoments.empty(9)
    for chunk in torch.split(x, [1, 7, 300, 2, 690]):
        acc.update_(chunk)
    mean, var, q = reference(x.numpy())
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(acc.variance.numpy(), var, rtol=1e-8)
    np.testing.assert_allclose(acc.mean_sq.numpy(), q, rtol=1e-12)


def test_merge_is_order_independent_and_handles_empty_parts() -> None:
    parts = [ChannelMoments.from_samples(torch.randn(n, 4)) for n in (3, 50, 11)]
    parts.append(ChannelMoments.empty(4))
    a = merge_all(parts)
    b = merge_all(list(reversed(parts)))
    for field in ("mean", "m2", "mean_sq"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-12)
    assert a.count == b.count == 64


def test_float32_accumulation_is_close() -> None:
    x = torch.randn(2000, 5)
    acc = ChannelMoments.empty(5, dtype=torch.float32)
    for chunk in torch.split(x, 128):
        acc.update_(chunk)
    mean, var, _ = reference(x.double().numpy())
    np.testing.assert_allclose(acc.variance.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(acc.mean.numpy(), mean, atol=1e-6)


def test_width_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        ChannelMoments.empty(3).merge(ChannelMoments.empty(4))
