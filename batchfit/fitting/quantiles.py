"""Student's t quantiles without scipy (a test dependency only), for confidence intervals.

For integer degrees of freedom up to ``EXPANSION_DF`` the t distribution's CDF has a closed
form in ``theta = atan(t / sqrt(df))`` (Abramowitz & Stegun 26.7.3), which is inverted by
bisection on theta to float64 resolution; beyond, the Cornish-Fisher expansion around the
normal quantile (A&S 26.7.5), whose error there is below 1e-12.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

EXPANSION_DF = 200


def _central_mass(theta: np.ndarray, df: int) -> np.ndarray:
    """``P(|T| < sqrt(df) tan(theta))`` for T with ``df`` (an integer) degrees of freedom."""
    s, c = np.sin(theta), np.cos(theta)
    if df == 1:
        return 2 * theta / math.pi
    odd = df % 2
    term = c if odd else np.ones_like(c)  # cos^j theta times the product of ratios
    total = term.copy()
    for j in range(1 + odd, df - 1, 2):  # (j: the power of cos reached before this term)
        term = term * c * c * (j / (j + 1))
        total = total + term
    return 2 / math.pi * (theta + s * total) if odd else s * total


def _expansion(q: float, df: np.ndarray) -> np.ndarray:
    x = NormalDist().inv_cdf(q)
    g = ((x**3 + x) / 4, (5 * x**5 + 16 * x**3 + 3 * x) / 96,
         (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384,
         (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160)
    return x + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def t_quantile(q: float, df) -> np.ndarray:
    """The ``q`` quantile (``0.5 < q < 1``) of Student's t with ``df`` degrees of freedom
    (an array of integers; NaN where df < 1)."""
    df = np.asarray(df, dtype=np.int64)
    out = np.full(df.shape, np.nan)
    large = df > EXPANSION_DF
    out[large] = _expansion(q, df[large].astype(np.float64))
    mass = 2 * q - 1
    for nu in np.unique(df[(df >= 1) & ~large]):
        lo, hi = np.zeros(()), np.full((), math.pi / 2)
        for _ in range(64):  # (bisection on theta: the mass rises monotonically with it)
            mid = (lo + hi) / 2
            below = _central_mass(mid, int(nu)) < mass
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        out[df == nu] = math.sqrt(nu) * math.tan((lo + hi) / 2)
    return out
