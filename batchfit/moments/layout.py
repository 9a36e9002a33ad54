"""Per-series moment tables: the statistics of polynomial MSE fits, and their layout.

For MSE (weighted or not) a series' polynomial fit, its loss, standard errors, rmse and r2
follow from a few sums over its points. batchfit keeps them per series in one float64 row,
in the series' own frame ``t = (x - centre) / half`` (x's range mapped onto [-1, 1]) and the
Chebyshev basis ``T_m(t)``, with y shifted by a fixed reference ``yref`` and, for series far from float64's comfortable
range, y and the weights scaled by powers of two (``yscale``, ``wscale``; else 1):

    CENTRE, HALF, INVH, YREF, LO, HI, NPTS, YSCALE, WSCALE,
    with u = (y - yref) yscale and v = w wscale:
    S[m] = sum v T_m(t) (m = 0..2D), R[j] = sum v u T_j(t) (j = 0..D),
    Y2 = sum v u^2, and in weighted tables the same three again with v = 1.

The frame keeps float64's digits for any offset of x (Unix timestamps); the rows of two parts
of a series merge exactly (each part's sums mapped onto a frame that holds both, then added),
so a series can be spread over row groups, files, batches or Ray tasks, in any order. The
native kernel (``batchfit/moments/native/aggregate.c``) gathers and solves these tables on the CPU;
``batchfit.fitting.moment_twin`` is its torch twin. Torch is not imported here.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev

from batchfit.core.names import Status
from batchfit.moments.shared import HEADER, Field

# The row's header fields (their numbers are batchfit.moments.shared's, as aggregate.c's), then
# one block of sums, and for weighted tables a second block with unit weights (the unweighted
# rmse needs it).
CENTRE, HALF, INVH, YREF, LO, HI, NPTS, YSCALE, WSCALE = (int(field) for field in Field)


def cheb_to_mono(k: int) -> np.ndarray:
    """(k, k): column j holds the monomial coefficients of T_j, lowest power first (exact small
    integers)."""
    columns = [chebyshev.cheb2poly(np.eye(k)[j]) for j in range(k)]  # cheb2poly trims zeros
    return np.stack([np.pad(col, (0, k - len(col))) for col in columns], axis=1)


def frame_coefficients(table: np.ndarray, q: np.ndarray) -> dict:
    """The fits of a solved table in their frames (what ``batchfit.predict`` evaluates): the
    centre and scale of each row's x, and the coefficients of ``t = (x - centre) / scale``,
    highest power first, from the Chebyshev coefficients ``q`` of y - yref (rows, k)."""
    # (einsum: a BLAS matmul of a tall, 4-column matrix takes 6x longer here)
    q = q / table[:, YSCALE, None]  # (q is in the row's scale of y)
    mono = np.einsum("rk,jk->rj", q, cheb_to_mono(q.shape[1])[::-1])
    mono[:, -1] += table[:, YREF]
    return {"x_centre": table[:, CENTRE].copy(), "x_scale": table[:, HALF].copy(),
            "frame_params": mono}


def exact_r2(record: dict) -> dict:
    """A solved table's record with the r2 of degree-0 fits exactly 0: the fit is the mean,
    so 1 - sse / sst is 0 by definition, and computing it leaves rounding noise whose sign
    and size depend on the order of the points."""
    if record["params"].shape[1] == 1:
        record["r2"] = np.where(np.isnan(record["r2"]), np.nan, 0.0)
    return record


def exact_iterations(status: np.ndarray) -> np.ndarray:
    """The iterations of exact fits, as an iterative solver counts them: one step for a
    solved or a diverged fit, none for one that is not identified."""
    return np.isin(status, (int(Status.OK), int(Status.DIVERGED))).astype(np.int64)


def block_size(degree: int) -> int:
    """S[0..2D], R[0..D], Y2."""
    return 2 * degree + 1 + degree + 1 + 1


def width(degree: int, weighted: bool) -> int:
    return HEADER + block_size(degree) * (2 if weighted else 1)


def new_table(rows: int, degree: int, weighted: bool) -> np.ndarray:
    """``rows`` empty series: no points, an empty range."""
    table = np.zeros((rows, width(degree, weighted)))
    table[:, LO], table[:, HI] = np.inf, -np.inf
    table[:, YSCALE], table[:, WSCALE] = 1.0, 1.0
    return table


