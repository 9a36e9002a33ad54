"""Fits of series of different lengths: ``fit_ragged`` groups them by length and fits each
group as a dense batch."""

from __future__ import annotations

import numpy as np

from batchfit.core.options import Options, parse_models, resolve
from batchfit.engine.choice import fit_choice
from batchfit.engine.front import fit_in_groups, solve
from batchfit.fitting.data import (
    FitResult,
)


def _gather(values: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Equal-length series stored at ``starts`` -> a (len(starts), length) array (x of d
    columns: (len(starts), length, d)); adjacent series are a reshape (no copy)."""
    count = len(starts)
    if count and (np.diff(starts) == length).all():
        return values[starts[0]:starts[0] + count * length].reshape(count, length,
                                                                    *values.shape[1:])
    return values[starts[:, None] + np.arange(length)]


def fit_ragged(x: np.ndarray, y: np.ndarray, offsets: np.ndarray, weights=None,
               **options) -> FitResult:
    """``fit`` for series stored back to back: series i is ``x[offsets[i]:offsets[i + 1]]``.

    Series are fitted in groups of equal length, so nothing is padded (equal-length data
    takes the fast path) and a series' numbers depend only on its own points, never on
    which other series share its batch. Results come back in series order, with the groups'
    training histories merged (``track`` and ``history_sample`` refer to the whole batch).
    """
    if parse_models(options.get("model")) is not None:
        return fit_choice(lambda **one: fit_ragged(x, y, offsets, weights, **one), options)
    opts = resolve(**options, y=y)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths, starts = np.diff(offsets), offsets[:-1]
    groups = [np.flatnonzero(lengths == length) for length in np.unique(lengths)]
    if not groups:
        return solve(np.zeros((0, 1)), np.zeros((0, 1)), None, None, None, opts)

    def fit_group(rows, group: Options):
        at, length = starts[rows], lengths[rows[0]]
        return solve(_gather(x, at, length), _gather(y, at, length),
                     None if weights is None else _gather(weights, at, length), None, None,
                     group)

    return fit_in_groups(groups, len(lengths), fit_group, opts)
