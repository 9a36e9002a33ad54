"""Synthetic datasets: the seed's generate_dataset at batch scale, with the truth beside it.

Each series' true coefficients are drawn around the seed's ``20x^2 + 5x - 3`` (for other
degrees: standard normal), its x are ``linspace(0, 1, n)`` (or sorted uniform draws), and
``y = f(x) + N(0, noise^2)``, with an optional fraction of outliers. For a built-in nonlinear
family (``model``), parameters and x range come from ``FAMILY_EXAMPLES``. Series are made and
written a block at a time, so any number of them fits in bounded memory; a block's random
numbers depend only on the seed and the block's index, so output is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from batchfit import io
from batchfit.fitting.models import FAMILIES, output_columns, polynomial

SEED_COEFFICIENTS = (20.0, 5.0, -3.0)  # a, b, c: the seed's y = 20x^2 + 5x - 3
SEED_SPREAD = (2.0, 1.0, 0.5)  # standard deviation of each true coefficient across series
BLOCK = 100_000  # series made and written at a time
# Per family: the x range, and each parameter's uniform range across series.
FAMILY_EXAMPLES = {
    "exp": ((0.0, 5.0), ((2.0, 6.0), (0.5, 1.5), (-1.0, 1.0))),
    "gauss": ((-5.0, 5.0), ((2.0, 6.0), (-2.0, 2.0), (0.5, 1.5), (-1.0, 1.0))),
    "logistic": ((-6.0, 6.0), ((2.0, 6.0), (0.5, 2.0), (-2.0, 2.0), (-1.0, 1.0))),
    "power": ((0.1, 5.0), ((1.0, 3.0), (0.5, 2.0), (-1.0, 1.0))),
    # (hill4: x is a dose, 10**u for u in the range: doses spread evenly on a log scale)
    "hill4": ((-3.0, 2.0), ((0.0, 1.0), (4.0, 6.0), (-1.5, 0.5), (0.7, 2.0))),
    "biexp": ((0.0, 10.0), ((20.0, 40.0), (0.5, 1.0), (10.0, 20.0), (3.0, 5.0), (-0.5, 0.5))),
    "lorentz": ((-5.0, 5.0), ((2.0, 6.0), (-2.0, 2.0), (0.3, 1.0), (-1.0, 1.0))),
    "pvoigt": ((-5.0, 5.0), ((2.0, 6.0), (-2.0, 2.0), (0.8, 2.0), (0.2, 0.8), (-1.0, 1.0))),
}
LOG_X_FAMILIES = ("hill4",)  # families whose FAMILY_EXAMPLES x range is log10(x)


@dataclass(frozen=True)
class Block:
    """Series ``first .. first + n - 1`` stored back to back, with their truth."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    coefficients: np.ndarray  # (n, k): the model's parameters (polynomial: highest power first)
    model: str = "poly"


def make_block(first: int, n: int, *, points: int, noise: float, seed: int, x_kind: str,
               min_points: int | None, max_points: int | None, outliers: float,
               degree: int, model: str = "poly") -> Block:
    rng = np.random.default_rng([seed, first // BLOCK])
    if model != "poly":
        (x_lo, x_hi), ranges = FAMILY_EXAMPLES[model]
        low, high = np.array(ranges).T
        coefficients = rng.uniform(low, high, (n, len(ranges)))
    elif degree == 2:  # (drawn lowest power first, so that datasets stay as they were)
        coefficients = rng.normal(SEED_COEFFICIENTS[::-1], SEED_SPREAD[::-1], (n, 3))[:, ::-1]
    else:
        coefficients = rng.normal(0.0, 1.0, (n, degree + 1))[:, ::-1]
    if min_points is None and max_points is None:
        lengths = np.full(n, points)
    else:
        low = points if min_points is None else min_points
        high = points if max_points is None else max_points
        lengths = rng.integers(low, high + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    series = np.repeat(np.arange(n), lengths)
    position = np.arange(offsets[-1]) - offsets[series]
    if x_kind == "linspace":
        x = position / np.maximum(lengths[series] - 1, 1)
    else:  # sorted uniform draws, so plots read left to right
        x = rng.uniform(0.0, 1.0, offsets[-1])
        x = x[np.lexsort((x, series))]
    if model != "poly":
        x = x_lo + (x_hi - x_lo) * x
        if model in LOG_X_FAMILIES:
            x = 10.0**x
        y = FAMILIES[model].f(torch.from_numpy(x), torch.from_numpy(
            coefficients[series].T)).numpy()
    else:
        y = np.zeros_like(x)
        for index in range(degree + 1):  # Horner, highest power first
            y = y * x + coefficients[series, index]
    y += rng.normal(0.0, noise, len(y))
    if outliers > 0:
        hit = rng.random(len(y)) < outliers
        size = max(noise, 1.0) * rng.uniform(10.0, 30.0, hit.sum())
        y[hit] += rng.choice([-1.0, 1.0], hit.sum()) * size
    return Block(np.arange(first, first + n, dtype=np.int64), x.astype(np.float32),
                 y.astype(np.float32), offsets, coefficients, model)


def truth_path(path: str) -> str:
    """``data.parquet`` -> ``data.truth.parquet``."""
    stem = path.removesuffix(".parquet")
    return f"{stem}.truth.parquet"


def _data_table(block: Block, fmt: str) -> pa.Table:
    if fmt == "list":
        offsets = pa.array(block.offsets.astype(np.int32) if block.offsets[-1] < 2**31
                           else block.offsets)
        return pa.table({"series_id": block.ids,
                         "x": pa.ListArray.from_arrays(offsets, pa.array(block.x)),
                         "y": pa.ListArray.from_arrays(offsets, pa.array(block.y))})
    lengths = np.diff(block.offsets)
    return pa.table({"series_id": np.repeat(block.ids, lengths), "x": block.x, "y": block.y})


def _truth_table(block: Block, noise: float) -> pa.Table:
    columns = {"series_id": block.ids}
    model = polynomial(block.coefficients.shape[1] - 1) if block.model == "poly" \
        else FAMILIES[block.model]
    for name, index in output_columns(model):
        columns[name] = block.coefficients[:, index]
    columns["n_points"] = np.diff(block.offsets)
    columns["noise"] = np.full(len(block.ids), noise)
    return pa.table(columns)


def generate(path: str, *, series: int, points: int = 100, noise: float | None = None,
             seed: int = 0,
             fmt: str = "long", x_kind: str = "linspace", min_points: int | None = None,
             max_points: int | None = None, outliers: float = 0.0, degree: int = 2,
             model: str = "poly") -> dict:
    """Write ``path`` (the data) and ``truth_path(path)`` (the true coefficients) atomically.
    ``noise``: the Gaussian noise's sd (default 1.0 for poly, 0.1 for the other families)."""
    if model != "poly" and model not in FAMILY_EXAMPLES:
        raise ValueError(f"unknown model {model!r}; choose poly, {', '.join(FAMILY_EXAMPLES)}")
    if noise is None:
        noise = 1.0 if model == "poly" else 0.1
    if series < 1 or points < 1:
        raise ValueError("series and points must be at least 1")
    if noise < 0 or not 0 <= outliers <= 1:
        raise ValueError("noise must be >= 0 and outliers a fraction in [0, 1]")
    if fmt not in ("long", "list") or x_kind not in ("linspace", "uniform"):
        raise ValueError("fmt must be long or list, x_kind linspace or uniform")
    if not 0 <= degree <= 10:
        raise ValueError("degree must be between 0 and 10")
    low = points if min_points is None else min_points
    high = points if max_points is None else max_points
    if low < 0 or high < low:
        raise ValueError("need 0 <= min_points <= max_points")
    options = dict(points=points, noise=noise, seed=seed, x_kind=x_kind, min_points=min_points,
                   max_points=max_points, outliers=outliers, degree=degree, model=model)
    first = make_block(0, min(series, BLOCK), **options)
    truth = truth_path(path)
    rows = 0
    with io.AtomicParquetWriter(path, _data_table(first, fmt).schema) as data, \
            io.AtomicParquetWriter(truth, _truth_table(first, noise).schema) as true:
        for start in range(0, series, BLOCK):
            block = first if start == 0 else make_block(start, min(BLOCK, series - start),
                                                        **options)
            data.write(_data_table(block, fmt))
            true.write(_truth_table(block, noise))
            rows += int(block.offsets[-1])
    return {"path": path, "truth": truth, "series": series, "points": rows, "format": fmt}
