"""The polynomial family, in a basis that stays well conditioned.

Inside batchfit every series is fitted in its own frame ``t = (x - centre) / half``, which maps
the series' x range onto [-1, 1], in the Chebyshev basis ``T_j(t)``. Two facts make this pay:

* ``T_i * T_j = (T_{i+j} + T_{|i-j|}) / 2``, so the weighted Gram matrix of the basis comes from
  the 2*degree + 1 sums ``sum w T_m(t)`` with positive coefficients only (no cancellation), just
  as the monomial Gram matrix comes from power sums; the sums add up across chunks;
* on [-1, 1] the Chebyshev Gram matrix is close to diagonal, so the small per-series solve loses
  few digits even at degree 6 (monomials there lose several).

Users see coefficients of ``x**i`` in the units of the input; ``to_raw_map`` and
``from_raw_map`` convert, per series, in float64 because with offset x (timestamps) that map is
ill-conditioned and float32 would ruin it.

All functions here work on ONE series (see linalg.py for the tuple layout) and are vmapped.
"""

from __future__ import annotations

from math import comb
from typing import NamedTuple

import numpy as np
import torch
from numpy.polynomial import chebyshev

from .linalg import Mat, Vec, mat_mat


class Sums(NamedTuple):
    """What one pass over a series leaves behind: its frame and its weighted sums.

    Everything an MSE fit needs (solution, loss at any parameters, gradient, Hessian) follows
    from these O(k^2) numbers, so iterative MSE solvers never touch the points again.
    """

    centre: torch.Tensor  # working dtype; t = (x - centre) / half
    half: torch.Tensor
    centre_raw: torch.Tensor  # float64 centre in the units of the input x (adds x_offset)
    gram: Mat  # sum w T_i(t) T_j(t)
    rhs: Vec  # sum w T_j(t) y
    wsum: torch.Tensor  # sum w
    n: torch.Tensor  # number of points used (int64)
    ybar: torch.Tensor  # weighted mean of y


def chebyshev_terms(t: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """``[T_0(t), ..., T_degree(t)]``, kept as a list so sums over them fuse into one pass."""
    terms = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        terms.append(2 * t * terms[-1] - terms[-2])
    return terms[: degree + 1]


def chebyshev_eval(t: torch.Tensor, q: Vec) -> torch.Tensor:
    """``sum_j q_j T_j(t)`` for one series."""
    return sum(qj * tj for qj, tj in zip(q, chebyshev_terms(t, len(q) - 1)))


def gram_from_sums(cheb_sums, k: int) -> Mat:
    """``sum w T_i T_j`` from the 2k - 1 sums ``sum w T_m``."""
    return tuple(tuple((cheb_sums[i + j] + cheb_sums[abs(i - j)]) / 2 for j in range(k))
                 for i in range(k))


def weighted_gram(t: torch.Tensor, w: torch.Tensor, k: int) -> Mat:
    return gram_from_sums([(w * tm).sum() for tm in chebyshev_terms(t, 2 * k - 2)], k)


def _cheb_to_mono_table(k: int) -> np.ndarray:
    """Column j holds the monomial coefficients of T_j (exact small integers)."""
    columns = [chebyshev.cheb2poly(np.eye(k)[j]) for j in range(k)]  # cheb2poly trims zeros
    return np.stack([np.pad(col, (0, k - len(col))) for col in columns], axis=1)


# Plain nested tuples of floats, made once at import, so torch.compile sees constants.
MAX_TERMS = 11
_CHEB_TO_MONO = {k: tuple(map(tuple, _cheb_to_mono_table(k).tolist()))
                 for k in range(1, MAX_TERMS + 1)}
_MONO_TO_CHEB = {k: tuple(map(tuple, np.linalg.inv(_cheb_to_mono_table(k)).tolist()))
                 for k in range(1, MAX_TERMS + 1)}


def _frame(centre, half):
    return centre.to(torch.float64), half.to(torch.float64)


def to_raw_map(centre_raw: torch.Tensor, half: torch.Tensor, k: int) -> Mat:
    """Float64 matrix M with raw coefficients ``p = M q``.

    ``q`` are Chebyshev coefficients in t = (x - centre) / half; ``p_i`` multiplies ``x**i``.
    """
    centre, half = _frame(centre_raw, half)
    zero = torch.zeros_like(centre)
    # t**j = (x - centre)**j / half**j, expanded in powers of x.
    shift = tuple(tuple(comb(j, i) * (-centre) ** (j - i) / half**j if j >= i else zero
                        for j in range(k)) for i in range(k))
    return mat_mat(shift, _CHEB_TO_MONO[k])


def from_raw_map(centre_raw: torch.Tensor, half: torch.Tensor, k: int) -> Mat:
    """Float64 matrix A with ``q = A p``: the inverse of ``to_raw_map``."""
    centre, half = _frame(centre_raw, half)
    zero = torch.zeros_like(centre)
    # x**i = (centre + half t)**i, expanded in powers of t.
    shift = tuple(tuple(comb(i, j) * centre ** (i - j) * half**j if i >= j else zero
                        for i in range(k)) for j in range(k))
    return mat_mat(_MONO_TO_CHEB[k], shift)


def scaled_x(x: torch.Tensor, w: torch.Tensor, centre, half) -> torch.Tensor:
    return torch.where(w > 0, (x - centre) * (1 / half), 0)  # one division per series


def prepare(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, x_offset, degree: int):
    """One series' frame and sums; returns ``(sums, t)``.

    ``x``, ``y``, ``w`` are one series with unused points at weight 0 (and finite values).
    The frame maps the used x range onto [-1, 1]; a series with one distinct x gets half = 1,
    so its Gram matrix is singular and the solve flags it.
    """
    k = degree + 1
    used = w > 0
    lo = torch.where(used, x, torch.inf).amin()
    hi = torch.where(used, x, -torch.inf).amax()
    centre = torch.where(used.any(), (lo + hi) / 2, 0)
    half = torch.where(hi > lo, (hi - lo) / 2, 1)
    t = scaled_x(x, w, centre, half)
    terms = chebyshev_terms(t, 2 * degree)
    cheb_sums = [(w * tm).sum() for tm in terms]
    rhs = tuple((w * y * tm).sum() for tm in terms[:k])
    wsum = cheb_sums[0]
    centre_raw = centre.to(torch.float64)
    if x_offset is not None:
        centre_raw = centre_raw + x_offset
    sums = Sums(centre=centre, half=half, centre_raw=centre_raw,
                gram=gram_from_sums(cheb_sums, k), rhs=rhs, wsum=wsum, n=used.sum(),
                ybar=torch.where(wsum > 0, rhs[0] / wsum, 0))
    return sums, t


def total_squares(y: torch.Tensor, w: torch.Tensor, ybar) -> torch.Tensor:
    """``sum w (y - ybar)^2``: the spread r2 is measured against."""
    return (w * (y - ybar) ** 2).sum()


def polyval(x: torch.Tensor, p: Vec) -> torch.Tensor:
    """Raw polynomial ``sum_i p_i x**i`` by Horner's rule (the seed's ``f(x, params)``)."""
    out = torch.zeros_like(x) + p[-1]
    for coef in reversed(p[:-1]):
        out = out * x + coef
    return out
