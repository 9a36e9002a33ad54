"""The parameter covariance of exact MSE polynomial fits, from their moment tables (numpy).

A row's least-squares fit in its frame has the Chebyshev coefficients' covariance
``s^2 G^-1``, ``G = sum w T_i T_j`` (from the row's sums ``S[m]``, ``layout``); the raw
coefficients' is ``s^2 M G^-1 M^T`` with ``M`` the frame-to-raw map (``models.to_raw_map``'s,
here in numpy). The solve (native or its twin) already gives the standard errors, the square
roots of that diagonal, and a refinement step changes ``s`` but never ``G``. So the covariance
is the correlation of ``M G^-1 M^T`` (float64, each row of M divided by its largest entry
first, as ``diagnostics.coefficient_errors`` does) scaled by the standard errors: its
diagonal is ``stderr**2`` exactly, for refined rows too. Torch is not imported here.
"""

from __future__ import annotations

from math import comb

import numpy as np

from batchfit.moments.layout import CENTRE, HALF, cheb_to_mono
from batchfit.moments.shared import HEADER


def _correlation(table: np.ndarray, k: int, fitted: np.ndarray) -> np.ndarray:
    """(R, k, k): the correlation of the raw coefficients (lowest power first) of degree
    k - 1 fits of the table's rows (``fitted``: the rows that have one; NaN elsewhere)."""
    sums = table[:, HEADER:HEADER + 2 * k - 1]
    index = np.arange(k)
    gram = (sums[:, index[:, None] + index] + sums[:, abs(index[:, None] - index)]) / 2
    centre = table[:, CENTRE]
    half = np.where(table[:, HALF] > 0, table[:, HALF], 1.0)
    # t**j = (x - centre)**j / half**j expanded in powers of x, then T_j in powers of t
    shift = np.zeros((len(table), k, k))
    for j in range(k):
        for i in range(j + 1):
            shift[:, i, j] = comb(j, i) * (-centre) ** (j - i) / half**j
    to_raw = shift @ cheb_to_mono(k)
    big = np.abs(to_raw).max(axis=2, keepdims=True)
    unit = to_raw / np.where((big > 0) & np.isfinite(big), big, 1.0)
    fitted = fitted & np.isfinite(gram).all(axis=(1, 2)) & np.isfinite(unit).all(axis=(1, 2))
    gram[~fitted], unit[~fitted] = np.eye(k), np.nan  # (one inverse for the whole batch)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        spread = unit @ np.linalg.inv(gram) @ unit.transpose(0, 2, 1)
        scale = np.sqrt(np.diagonal(spread, axis1=1, axis2=2))
        return spread / scale[:, :, None] / scale[:, None, :]


def covariance(table: np.ndarray, record: dict) -> np.ndarray:
    """(R, k, k) float64: each row's coefficient covariance in the order of the record's
    ``params`` (highest power first), NaN where the standard errors are. ``record``: the
    solve's (``native.solve``'s, refined or not; with ``degrees`` when each row's degree was
    chosen, its missing higher coefficients NaN)."""
    stderr = np.asarray(record["stderr"], np.float64)
    rows, k = stderr.shape
    degrees = record.get("degrees", np.full(rows, k - 1))
    out = np.full((rows, k, k), np.nan)
    for degree in np.unique(degrees):
        at = np.flatnonzero(degrees == degree)
        low = k - 1 - int(degree)  # (the padded higher coefficients come first)
        s = stderr[at, low:]
        correlation = _correlation(table[at], int(degree) + 1,
                                   np.isfinite(s).all(axis=1))[:, ::-1, ::-1]
        out[np.ix_(at, range(low, k), range(low, k))] = correlation * s[:, :, None] * \
            s[:, None, :]
    diagonal = np.arange(k)
    out[:, diagonal, diagonal] = stderr**2
    return out
