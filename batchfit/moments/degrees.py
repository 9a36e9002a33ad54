"""The polynomial degree chosen per series (``degree="auto"``, ``--degree auto[:D]``).

Each series gets the degree d in 0..D that minimises the Bayesian information criterion of
its least-squares fit, ``BIC = n log(loss) + (d + 1) log n``. BIC's penalty grows with n, so
with more points it does not drift to higher degrees on noise (AIC's fixed penalty of 2 per
coefficient does), yet a real term soon pays for itself. Two guards make it dependable:

* the loss is floored at float64 rounding of the series' y, so on exact polynomial data every
  degree at or above the true one ties and the penalty picks the true one;
* a degree is a candidate only when its fit is ``ok`` and leaves a residual (n > d + 1), so a
  series of 3 points is not "explained" by an interpolating quadratic.

Every degree is solved from the degree-D moment table itself: a lower degree's statistics
are a subset of it (``truncated``), so the choice costs D + 1 small solves and no extra pass
over the data. Torch is not imported here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batchfit.core.names import Status
from batchfit.moments.layout import HEADER, YREF, YSCALE, block_size

# Relative rounding of a loss computed from float64 sums: below it, losses are noise.
LOSS_FLOOR = 256 * np.finfo(np.float64).eps


def truncated(table: np.ndarray, degree: int, weighted: bool, lower: int) -> np.ndarray:
    """The moment table of degree ``lower`` within a degree-``degree`` table: the header,
    then per block S[0..2 lower], R[0..lower] and Y2."""
    if lower == degree:
        return table
    blocks = [table[:, :HEADER]]
    for start in [HEADER + b * block_size(degree) for b in range(2 if weighted else 1)]:
        sums = start + 2 * degree + 1
        blocks += [table[:, start:start + 2 * lower + 1], table[:, sums:sums + lower + 1],
                   table[:, sums + degree + 1:sums + degree + 2]]
    return np.ascontiguousarray(np.concatenate(blocks, axis=1))


def mean_square_y(table: np.ndarray, degree: int) -> np.ndarray:
    """Each row's weighted mean of y^2, from its sums (S0, R0 and Y2 are about yref), in
    the row's scale of y (that of the losses compared with it)."""
    s0 = table[:, HEADER]
    r0 = table[:, HEADER + 2 * degree + 1]
    y2 = table[:, HEADER + 3 * degree + 2]
    yref = table[:, YREF] * table[:, YSCALE]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (y2 + 2 * yref * r0 + yref**2 * s0) / s0


def bic(record: dict, degree: int, floor: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """BIC of each row's fit of ``degree`` (inf where it is not a candidate), from its
    ``loss`` in the row's scale of y (as ``floor``)."""
    n = record["n_points"].astype(np.float64)
    loss = np.maximum(loss, floor)
    candidate = (record["status"] == int(Status.OK)) & ((n > degree + 1) | (degree == 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = n * np.log(loss) + (degree + 1) * np.log(n)
    return np.where(candidate & np.isfinite(value), value, np.inf)


def padded(record: dict, lower: int, degree: int) -> dict:
    """A degree-``lower`` record laid out as a degree-``degree`` one: the missing higher
    coefficients are 0 (their stderr undefined), ``q`` (lowest first) padded with zeros."""
    extra = degree - lower
    rows = len(record["status"])
    out = dict(record)
    # (a series without a fit has no coefficients at all: null, not 0)
    unfitted = np.isin(record["status"], (int(Status.TOO_FEW_POINTS), int(Status.SINGULAR)))
    for name, fill in (("params", 0.0), ("frame_params", 0.0), ("stderr", np.nan)):
        if name in record:
            pad = np.where(unfitted[:, None], np.nan, np.full((rows, extra), fill))
            out[name] = np.concatenate([pad, record[name]], axis=1)
    if "q" in record:
        out["q"] = np.concatenate([record["q"], np.zeros((rows, extra))], axis=1)
    if "covariance" in record:  # (the missing coefficients' entries undefined)
        out["covariance"] = np.full((rows, degree + 1, degree + 1), np.nan)
        out["covariance"][:, extra:, extra:] = record["covariance"]
    out["degrees"] = np.full(rows, lower, np.int64)
    return out


def choose(table: np.ndarray, degree: int, weighted: bool,
           solve: Callable[[np.ndarray, int], dict]) -> dict:
    """The record of each row's best degree in 0..``degree`` (with ``degrees``);
    ``solve(table, d)`` solves a degree-d table (``native.solve``'s record)."""
    floor = LOSS_FLOOR * np.nan_to_num(mean_square_y(table, degree), nan=0.0) + 1e-300
    records = [padded(solve(truncated(table, degree, weighted, d), d), d, degree)
               for d in range(degree + 1)]
    # Losses compared in each row's scale of y: for |y| beyond ~1e154 the true loss is
    # beyond float64 (inf) at every degree. Rows scaled are solved again as if unscaled.
    scaled = np.flatnonzero(table[:, YSCALE] != 1)
    as_unscaled = table[scaled].copy()
    as_unscaled[:, YSCALE] = 1
    losses = []
    for d, record in enumerate(records):
        loss = record["loss"].copy()
        if len(scaled):
            loss[scaled] = solve(truncated(as_unscaled, degree, weighted, d), d)["loss"]
        losses.append(loss)
    scores = np.stack([bic(record, d, floor, loss)
                       for d, (record, loss) in enumerate(zip(records, losses))], axis=1)
    best = np.where(np.isfinite(scores).any(1), scores.argmin(1), 0)
    chosen = {name: values.copy() for name, values in records[0].items()}
    for d, record in enumerate(records[1:], start=1):
        rows = best == d
        for name, values in chosen.items():
            values[rows] = record[name][rows]
    return chosen
