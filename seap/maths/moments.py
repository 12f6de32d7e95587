"""Per-channel activation moments: exact, streaming and mergeable (pure tensor code).

For a channel j over N tokens the engine keeps

* ``mean``    mu_j  = (1/N) sum_t a_tj
* ``m2``      M2_j  = sum_t (a_tj - mu_j)^2         (population variance = M2/N)
* ``mean_sq`` q_j   = (1/N) sum_t a_tj^2

Within a batch the moments are computed in one two-pass sweep over the real tokens (in
float32, or float64 for float64 input); batches are folded in with the pairwise update of Chan, Golub and LeVeque (1979), which is
numerically stable and associative up to rounding, so statistics computed on shards and
merged equal a single pass over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACCUMULATION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class ChannelMoments:
    """Count, mean, sum of squared deviations and mean of squares for each channel."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    mean_sq: torch.Tensor

    @classmethod
    def empty(cls, width: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> ChannelMoments:
        zeros = torch.zeros(width, dtype=dtype, device=device)
        return cls(0, zeros.clone(), zeros.clone(), zeros.clone())

    @classmethod
    def from_samples(cls, samples: torch.Tensor, dtype: torch.dtype = torch.float64) -> ChannelMoments:
        """Moments of a ``[n_tokens, width]`` tensor (two-pass, exact)."""
        x = samples.detach().reshape(-1, samples.shape[-1]).to(dtype)
        n = x.shape[0]
        if n == 0:
            return cls.empty(x.shape[1], dtype, x.device)
        mean = x.mean(dim=0)
        centred = x - mean
        return cls(n, mean, (centred * centred).sum(dim=0), (x * x).mean(dim=0))

    @classmethod
    def from_masked(
        cls,
        activations: torch.Tensor,
        token_weights: torch.Tensor | None,
        count: int,
        dtype: torch.dtype = torch.float64,
    ) -> ChannelMoments:
        """Moments over the real tokens of a ``[..., width]`` batch, without gathering them.

        ``token_weights`` is 1.0 for real tokens and 0.0 for padding (flattened to the
        leading dimensions), ``count`` its sum. The batch moments are computed in one
        two-pass sweep (float32, or float64 for float64 input) with matrix-vector
        products, which is several times cheaper than indexing out the real rows.
        """
        flat = activations.detach().reshape(-1, activations.shape[-1])
        compute = torch.float64 if flat.dtype == torch.float64 else torch.float32
        flat = flat.to(compute)
        if count == 0:
            return cls.empty(flat.shape[1], dtype, flat.device)
        if token_weights is None:
            mean = flat.sum(dim=0) / count
            centred = flat - mean
            m2 = (centred * centred).sum(dim=0)
            mean_sq = (flat * flat).sum(dim=0) / count
        else:
            w = token_weights.reshape(-1).to(compute)
            mean = (w @ flat) / count
            centred = flat - mean
            m2 = w @ (centred * centred)
            mean_sq = (w @ (flat * flat)) / count
        return cls(count, mean.to(dtype), m2.to(dtype), mean_sq.to(dtype))

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (M2 / N); zero for an empty accumulator."""
        return self.m2 / max(self.count, 1)

    @property
    def sample_variance(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Moments of the union of both token sets (returns a new object)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge moments of width {self.width} and {other.width}")
        if other.count == 0:
            return ChannelMoments(self.count, self.mean.clone(), self.m2.clone(), self.mean_sq.clone())
        if self.count == 0:
            return ChannelMoments(other.count, other.mean.clone(), other.m2.clone(), other.mean_sq.clone())
        other_mean = other.mean.to(self.mean)
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other_mean - self.mean
        mean = self.mean + delta * (n_b / n)
        m2 = self.m2 + other.m2.to(self.m2) + delta * delta * (n_a * n_b / n)
        mean_sq = self.mean_sq + (other.mean_sq.to(self.mean_sq) - self.mean_sq) * (n_b / n)
        return ChannelMoments(n, mean, m2, mean_sq)

    def update_(self, samples: torch.Tensor | ChannelMoments) -> None:
        """Fold a ``[n_tokens, width]`` batch (or its moments) into this accumulator in place."""
        batch = samples if isinstance(samples, ChannelMoments) else ChannelMoments.from_samples(samples, self.mean.dtype)
        merged = self.merge(batch)
        self.count, self.mean, self.m2, self.mean_sq = merged.count, merged.mean, merged.m2, merged.mean_sq

    def to(self, device: torch.device | str) -> ChannelMoments:
        return ChannelMoments(self.count, self.mean.to(device), self.m2.to(device), self.mean_sq.to(device))


def merge_all(parts: list[ChannelMoments]) -> ChannelMoments:
    """Merge several accumulators (e.g. one per shard)."""
    if not parts:
        raise ValueError("nothing to merge")
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return out


@dataclass
class SecondMoments:
    """Uncentred second moments of a layer input over N tokens: ``sum_t x_t x_t^T`` and
    ``sum_t x_t`` (float64), so ``G = gram / count`` and ``mu = total / count``.

    Plain sums are exact to merge (shards add), and float64 accumulation keeps them precise over
    millions of tokens (the rounding of float32 sums grows with their number). What
    reconstruction needs (``../docs/reconstruction.md``): ``G``, and the centred covariance
    ``C = G - mu mu^T`` when the fit has a bias term.
    """

    count: int
    gram: torch.Tensor  # [width, width]
    total: torch.Tensor  # [width]

    @classmethod
    def empty(cls, width: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> SecondMoments:
        return cls(0, torch.zeros(width, width, dtype=dtype, device=device), torch.zeros(width, dtype=dtype, device=device))

    @classmethod
    def from_masked(cls, activations: torch.Tensor, token_weights: torch.Tensor | None, count: int,
                    dtype: torch.dtype = torch.float64) -> SecondMoments:
        """Second moments over the real tokens of a ``[..., width]`` batch (``token_weights``
        1.0 for real tokens, 0.0 for padding; ``count`` their sum). Like the moments, one batch
        is summed in float32 (float64 for float64 input), and batches are added in ``dtype``."""
        flat = activations.detach().reshape(-1, activations.shape[-1])
        flat = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        if token_weights is not None:
            flat = flat * token_weights.reshape(-1, 1).to(flat.dtype)  # padding rows become zero
        return cls(count, (flat.T @ flat).to(dtype), flat.sum(dim=0).to(dtype))

    @property
    def width(self) -> int:
        return int(self.total.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``G = (1/N) sum_t x_t x_t^T``."""
        return self.gram / max(self.count, 1)

    @property
    def covariance(self) -> torch.Tensor:
        """Centred (population) covariance ``G - mu mu^T``."""
        mu = self.mean
        return self.second_moment - torch.outer(mu, mu)

    def merge(self, other: SecondMoments) -> SecondMoments:
        """Second moments of the union of both token sets (returns a new object)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge second moments of width {self.width} and {other.width}")
        return SecondMoments(self.count + other.count, self.gram + other.gram.to(self.gram),
                             self.total + other.total.to(self.total))

    def to(self, device: torch.device | str) -> SecondMoments:
        return SecondMoments(self.count, self.gram.to(device), self.total.to(device))

    def update_(self, batch: SecondMoments) -> None:
        """Fold a batch's second moments into this accumulator in place."""
        if batch.width != self.width:
            raise ValueError(f"cannot merge second moments of width {self.width} and {batch.width}")
        self.count += batch.count
        self.gram += batch.gram.to(self.gram.device)  # (a float32 block is widened element by element, no copy)
        self.total += batch.total.to(self.total.device)


class SecondMomentAccumulator:
    """Streaming :class:`SecondMoments` with blocked summation: batches are added in float32
    (``addmm`` into one buffer; float64 for float64 input) until ``block_tokens`` tokens, then
    the block is folded into the ``dtype`` (float64) totals. Folding a large matrix into
    float64 after every small batch costs more than the product itself; within a block the
    float32 rounding stays that of a few thousand terms."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 block_tokens: int = 4096) -> None:
        self.totals = SecondMoments.empty(width, dtype, device)
        self.block_tokens = block_tokens
        self._gram: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._pending = 0

    def add(self, activations: torch.Tensor, token_weights: torch.Tensor | None, count: int) -> None:
        """Add the real tokens of a ``[..., width]`` batch (see :meth:`SecondMoments.from_masked`)."""
        flat = activations.detach().reshape(-1, activations.shape[-1])
        flat = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        if token_weights is not None:
            flat = flat * token_weights.reshape(-1, 1).to(flat.dtype)
        if self._gram is None or self._gram.dtype != flat.dtype:
            self.flush()
            self._gram = torch.zeros(flat.shape[1], flat.shape[1], dtype=flat.dtype, device=flat.device)
            self._sum = torch.zeros(flat.shape[1], dtype=flat.dtype, device=flat.device)
        self._gram.addmm_(flat.T, flat)
        self._sum += flat.sum(dim=0)
        self._pending += count
        if self._pending >= self.block_tokens:
            self.flush()

    def flush(self) -> None:
        """Fold the current block into the totals."""
        if self._gram is not None and self._sum is not None and self._pending:
            self.totals.update_(SecondMoments(self._pending, self._gram, self._sum))
        self._gram = self._sum = None  # a new block buffer on the next add (may run outside inference mode)
        self._pending = 0

    def result(self) -> SecondMoments:
        """The second moments of every token added so far."""
        self.flush()
        return self.totals
