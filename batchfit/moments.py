"""Per-series moment tables: the statistics of polynomial MSE fits, and their layout.

For MSE (weighted or not) a series' polynomial fit, its loss, standard errors, rmse and r2
follow from a few sums over its points. batchfit keeps them per series in one float64 row,
in the series' own frame ``t = (x - centre) / half`` (x's range mapped onto [-1, 1]) and the
Chebyshev basis ``T_m(t)``, with y shifted by a fixed reference ``yref``:

    CENTRE, HALF, INVH, YREF, LO, HI, NPTS,
    S[m] = sum w T_m(t) (m = 0..2D), R[j] = sum w (y - yref) T_j(t) (j = 0..D),
    Y2 = sum w (y - yref)^2, and in weighted tables the same three again with w = 1.

The frame keeps float64's digits for any offset of x (Unix timestamps); the rows of two parts
of a series merge exactly (each part's sums mapped onto a frame that holds both, then added),
so a series can be spread over row groups, files, batches or Ray tasks, in any order. The
native kernel (``batchfit/native/aggregate.c``) gathers and solves these tables on the CPU;
``batchfit.stats`` is its torch twin. Torch is not imported here.
"""

from __future__ import annotations

import numpy as np

# Row layout (the same in aggregate.c): a header, then one block of sums, and for weighted
# tables a second block with unit weights (the unweighted rmse needs it).
CENTRE, HALF, INVH, YREF, LO, HI, NPTS = range(7)
HEADER = 7
TRUST_PIVOT = 0.25  # below this relative Cholesky pivot, one refinement step on the points
# The residual sum of squares follows from the sums as Y2 - q.R, which loses digits when it is
# small next to Y2 (a fit explaining almost all of the spread): trusted only when it is at
# least this many eps of Y2 (then it keeps ~12 digits, the row-order promise); below, the
# series gets one refinement step with its points. (The same constants are in aggregate.c.)
CANCELLATION_MARGIN = 2.0**42


def block_size(degree: int) -> int:
    """S[0..2D], R[0..D], Y2."""
    return 2 * degree + 1 + degree + 1 + 1


def width(degree: int, weighted: bool) -> int:
    return HEADER + block_size(degree) * (2 if weighted else 1)


def new_table(rows: int, degree: int, weighted: bool) -> np.ndarray:
    """``rows`` empty series: no points, an empty range."""
    table = np.zeros((rows, width(degree, weighted)))
    table[:, LO], table[:, HI] = np.inf, -np.inf
    return table


