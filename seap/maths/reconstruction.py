"""Training-free reconstruction: refit a layer that lost input channels, in closed form (pure).

A mask removes input channels of the attention output projection and the MLP down
projection. With the layer ``y = W x`` (``W``: ``[d_out, d_in]``), the kept channels ``S``
and the second moments of its input on calibration tokens (:class:`SecondMoments`), the
refit solves, for new weights ``W'`` (``[d_out, |S|]``) and optionally a bias ``b``::

    minimise  E_t || W x_t - (W' x_t[S] + b) ||^2  +  lambda || W' - P ||^2

where the prior ``P`` is the plain slice ``W[:, S]`` (``prior="slice"``: a strong
regulariser falls back to plain slicing) or zero (``prior="zero"``: the plain ridge, which a
strong regulariser drives towards a dead layer). ``lambda = alpha * mean(diag(G[S, S]))``.
Without a bias (``G`` the uncentred second moment)::

    W' = (W G[:, S] + lambda P) (G[S, S] + lambda I)^-1

With a bias, the same with the centred covariance ``C`` in place of ``G``, and
``b = W mu - W' mu[S]``. One Cholesky factorisation of the ``|S| x |S|`` system serves every
output row; everything is computed in float64. FLAP's bias compensation (``W' = W[:, S]``,
``b = W[:, ~S] mu[~S]``) is the special case ``lambda -> infinity`` with a bias. See
``docs/reconstruction.md`` of the method notes for the derivation and the choices.

**Sequential** fitting (:func:`refit_from_cross`) refits a layer on the inputs the already
pruned layers before it produce, ``x'``, with the dense layer's output ``y = W x`` as the
target: the same solve with the cross moment ``E[y x'[S]^T]`` in place of ``W G[:, S]`` and
``E[x'[S] x'[S]^T]`` in place of ``G[S, S]``. Both come from one second-moment matrix of the
concatenation ``[y, x'[S]]`` (:func:`target_input_moments`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seap.maths.moments import SecondMoments

PRIORS = ("slice", "zero")


@dataclass(frozen=True)
class RefitOptions:
    """How a layer is refitted: relative regularisation ``alpha``, the ``prior`` the
    regulariser pulls towards, and whether a bias term is fitted. The defaults are the setting
    the quality study chose on held-out train items (``docs/results.md``, section 4)."""

    alpha: float = 1e-2
    prior: str = "slice"
    bias: bool = True
    sequential: bool = False  # (for the glue: refit each layer on the pruned model's inputs, layer by layer)

    def __post_init__(self) -> None:
        if not isinstance(self.sequential, bool) or not isinstance(self.bias, bool):
            raise ValueError("bias and sequential must be true or false")
        if self.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.prior!r}; choose one of {', '.join(PRIORS)}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be at least 0, got {self.alpha}")


@dataclass
class Refit:
    """Refitted weights of the kept input columns (``[d_out, |S|]``), the bias (or None), the
    damping used, and the layer's output error on the calibration tokens relative to its
    dense output energy, with the plain slice (``error_sliced``) and with the refit
    (``error_refit``); :func:`output_error` computes the same errors independently."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    damping: float
    error_sliced: float = float("nan")
    error_refit: float = float("nan")


def _solve(cross: torch.Tensor, g_ss: torch.Tensor, mu_y: torch.Tensor, mu_s: torch.Tensor, w_kept: torch.Tensor,
           options: RefitOptions) -> tuple[torch.Tensor, torch.Tensor | None, float, torch.Tensor, bool]:
    """The solve both refits share, from the target-input cross moment ``E[y x_S^T]``, the kept
    inputs' ``G[S, S]``, the means of ``y`` and ``x_S`` and the prior's slice ``W[:, S]``: the
    new weights, the bias (or None), the damping, the right-hand side and whether Cholesky
    solved it. With a bias, the centred moments replace the uncentred ones."""
    if options.bias:  # the centred covariance C = G - mu mu^T in place of G
        fit_rhs, fit_ss = cross - torch.outer(mu_y, mu_s), torch.outer(mu_s, mu_s)
        torch.sub(g_ss, fit_ss, out=fit_ss)  # g_ss - mu_s mu_s^T, in the outer product's own matrix
    else:
        fit_rhs, fit_ss = cross, g_ss
    width = g_ss.shape[0]
    damping = options.alpha * float(fit_ss.diagonal().mean()) if width else 0.0
    rhs = fit_rhs + damping * w_kept if options.prior == "slice" else fit_rhs
    # fit_ss + damping I, adding on the diagonal only (no identity and no scaled copy of it: the
    # same numbers, two k x k matrices fewer); the centred fit_ss is this function's own
    system = fit_ss if options.bias else fit_ss.clone()
    system.diagonal().add_(damping)
    del fit_ss
    factor, info = torch.linalg.cholesky_ex(system)
    solved = int(info) == 0
    if solved:
        new = torch.cholesky_solve(rhs.T, factor).T
    else:  # singular (too few tokens, no damping): least squares on the symmetric system
        new = torch.linalg.lstsq(system, rhs.T).solution.T
    return new, (mu_y - new @ mu_s) if options.bias else None, damping, rhs, solved


def refit_layer(weight: torch.Tensor, moments: SecondMoments, keep: torch.Tensor,
                options: RefitOptions = RefitOptions()) -> Refit:
    """The closed-form refit of ``weight`` (``[d_out, d_in]``) to its kept input columns
    ``keep`` (indices) on the inputs summarised by ``moments``; returned in ``weight``'s dtype.

    Cost: one product ``W G[:, S]`` (``d_out x d_in x |S|``), the Cholesky factorisation and
    solve; the error reports reuse them (``tr(D G D^T) = <W G W^T> - 2 <W', (W G)[:, S]> +
    <W' G[S, S], W'>``, where the solve gives ``W' (G[S, S] + lambda I) = rhs``, and the
    plain slice's error is ``<W[:, R] G[R, R], W[:, R]>`` over the removed columns ``R``)."""
    if moments.width != weight.shape[1]:
        raise ValueError(f"moments of width {moments.width} for a layer with {weight.shape[1]} inputs")
    if moments.count == 0:
        raise ValueError("no calibration tokens: cannot refit")
    keep = keep.to(torch.long).cpu()
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[keep] = False
    w = weight.detach().to(torch.float64).cpu()
    # blocks of the uncentred G = gram / N, each divided on its own (never a second whole matrix)
    gram, n = moments.gram.to(torch.float64).cpu(), max(moments.count, 1)
    mu = moments.mean.to(torch.float64).cpu()
    w_kept, w_removed = w[:, keep], w[:, removed]
    g_ss = gram[keep[:, None], keep]  # (gathered at once: no k x d_in intermediate)
    g_ss.div_(n)  # (in place: one k x k matrix at a time)
    rows_removed = gram[removed]
    g_rr = rows_removed[:, removed] / n
    g_rs = rows_removed[:, keep] / n
    del rows_removed
    removed_kept = w_removed @ g_rs  # W_R G_RS, used by (W G)[:, S] and the energy
    wg_kept = w_kept @ g_ss + removed_kept  # (W G)[:, S]
    mu_s = mu[keep]
    w_mu = w @ mu
    new, bias, damping, rhs, solved = _solve(wg_kept, g_ss, w_mu, mu_s, w_kept, options)

    # <W G, W> = <W_S G_SS, W_S> + 2 <W_R G_RS, W_S> + <W_R G_RR, W_R>
    sliced = float(((w_removed @ g_rr) * w_removed).sum())
    energy = max(float((wg_kept * w_kept).sum() + (removed_kept * w_kept).sum()) + sliced, 1e-30)
    if solved:  # new G_SS = rhs - lambda new (+ (new mu_S) mu_S^T with a bias: the system used C_SS)
        new_g = rhs - damping * new
        if options.bias:
            new_g = new_g + torch.outer(new @ mu_s, mu_s)
    else:
        new_g = new @ g_ss
    refit = energy - 2.0 * float((new * wg_kept).sum()) + float((new_g * new).sum())
    if bias is not None:  # ||b||^2 - 2 b^T D mu, where D mu = W mu - W' mu_S is b itself
        refit -= float(bias @ bias)
    return Refit(new.to(weight.dtype), None if bias is None else bias.to(weight.dtype), damping,
                 max(sliced, 0.0) / energy, max(refit, 0.0) / energy)


def refit_from_cross(weight: torch.Tensor, keep: torch.Tensor, moments: SecondMoments,
                     options: RefitOptions = RefitOptions()) -> Refit:
    """The closed-form refit of ``weight`` (``[d_out, d_in]``) from the second moments of the
    concatenation ``[y, x'[S]]`` (:func:`target_input_moments`): ``y`` the dense layer's output
    (its target, without the layer's own bias), ``x'[S]`` the kept columns of the input the
    refitted layer will actually see (the sequential fit). Same objective, prior, bias and
    error reports as :func:`refit_layer`, whose one-shot case it equals when ``x' = x``."""
    d_out, width = weight.shape[0], int(keep.numel())
    if moments.width != d_out + width:
        raise ValueError(f"moments of width {moments.width} for {d_out} outputs and {width} kept inputs")
    if moments.count == 0:
        raise ValueError("no calibration tokens: cannot refit")
    w_kept = weight.detach().to(torch.float64).cpu()[:, keep.to(torch.long).cpu()]
    g = moments.second_moment.to(torch.float64).cpu()
    mu = moments.mean.to(torch.float64).cpu()
    g_yy, cross, g_ss = g[:d_out, :d_out], g[:d_out, d_out:], g[d_out:, d_out:]
    mu_y, mu_s = mu[:d_out], mu[d_out:]
    new, bias, damping, _, _ = _solve(cross, g_ss, mu_y, mu_s, w_kept, options)
    energy = max(float(g_yy.trace()), 1e-30)

    def error(kept: torch.Tensor, b: torch.Tensor | None) -> float:  # E ||y - kept x'_S - b||^2
        value = energy - 2.0 * float((kept * cross).sum()) + float(((kept @ g_ss) * kept).sum())
        if b is not None:
            value += float(b @ b) - 2.0 * float(b @ (mu_y - kept @ mu_s))
        return max(value, 0.0) / energy

    return Refit(new.to(weight.dtype), None if bias is None else bias.to(weight.dtype), damping,
                 error(w_kept, None), error(new, bias))


def target_input_moments(target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The ``[..., d_out + |S|]`` concatenation whose second moments :func:`refit_from_cross` reads."""
    return torch.cat([target, inputs], dim=-1)


def output_error(weight: torch.Tensor, moments: SecondMoments, keep: torch.Tensor, new_weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> float:
    """``E_t || W x_t - (W' x_t[S] + b) ||^2`` over the tokens of ``moments``, from the moments
    alone (no samples): ``tr(D G D^T) - 2 b^T D mu + ||b||^2`` with ``D = W - W'`` (``W'``
    placed at the kept columns)."""
    w = weight.detach().to(torch.float64).cpu()
    delta = w.clone()
    delta[:, keep.to(torch.long).cpu()] -= new_weight.detach().to(torch.float64).cpu()
    g = moments.second_moment.to(torch.float64).cpu()
    error = float(torch.einsum("ij,jk,ik->", delta, g, delta))
    if bias is not None:
        b = bias.detach().to(torch.float64).cpu()
        error += float(b @ b) - 2.0 * float(b @ (delta @ moments.mean.to(torch.float64).cpu()))
    return max(error, 0.0)


def output_energy(weight: torch.Tensor, moments: SecondMoments) -> float:
    """``E_t || W x_t ||^2``: what :func:`output_error` is relative to."""
    w = weight.detach().to(torch.float64).cpu()
    return float(torch.einsum("ij,jk,ik->", w, moments.second_moment.to(torch.float64).cpu(), w))


def compensation_bias(weight: torch.Tensor, moments: SecondMoments, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the removed columns' mean contribution ``W[:, ~S] mu[~S]``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[keep.to(torch.long).cpu()] = False
    w = weight.detach().to(torch.float64).cpu()
    return (w[:, removed] @ moments.mean.to(torch.float64).cpu()[removed]).to(weight.dtype)


__all__ = ["PRIORS", "Refit", "RefitOptions", "compensation_bias", "output_energy", "output_error", "refit_from_cross",
           "refit_layer", "target_input_moments"]
