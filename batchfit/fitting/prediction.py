"""Evaluating fits: ``batchfit.predict(fit_or_table, x)``.

A polynomial is evaluated in the frame it was fitted in, ``t = (x - x_centre) / x_scale``,
whenever the fit carries it (every polynomial ``FitResult`` and output file does): with x far
from 0 (Unix timestamps) the raw form ``a x^2 + b x + c`` cancels catastrophically, whereas
the frame keeps float64's digits. Families are evaluated with their functions (torch, loaded
then). Polynomials from a file need no torch.
"""

from __future__ import annotations

import os

import numpy as np

from batchfit import io
from batchfit.core.names import FAMILY_PARAMS


def predict(fit, x) -> np.ndarray:
    """The fitted curves at ``x``, as float64.

    ``fit``: a ``FitResult``, an output table of ``batchfit run`` / ``FitResult.to_arrow``
    (a pyarrow Table, a pandas or polars DataFrame) or the path of an output file.
    ``x``: (N,) shared by every series, or one row per series ((B, N); for a FitResult of
    batch shape (..., ) also (..., N)); numpy ``datetime64``/``timedelta64`` are read as
    float seconds, as ``fit`` reads them. Returns (B, N) (or (..., N)); NaN for series
    without a fit.
    """
    if hasattr(fit, "params") and hasattr(fit, "status"):
        return _predict_result(fit, x)
    if isinstance(fit, str | os.PathLike):
        table, meta = io.read_coefficients(os.fspath(fit))
    else:
        table, meta = io.coefficient_table(io.arrow_table(fit), "the table")
    return _predict_table(table, meta, x)


def _points(x, batch: int) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind in "mM":
        from batchfit.fitting.data import datetime_seconds

        x = datetime_seconds(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x must be numbers or datetimes, got {x.dtype}")
    x = x.astype(np.float64)
    if x.ndim == 0:
        x = x.reshape(1)
    if x.ndim == 1:
        return np.broadcast_to(x, (batch, len(x)))
    if x.ndim != 2 or x.shape[0] != batch:
        raise ValueError(f"x must be (N,) or ({batch}, N) for {batch} series, got shape "
                         f"{x.shape}")
    return x


def horner(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B, k) coefficients, highest power first, at (B, N) points."""
    out = np.zeros_like(x) + coefficients[:, :1]
    for j in range(1, coefficients.shape[1]):
        out = out * x + coefficients[:, j:j + 1]
    return out


def polynomial(params, centre, scale, x: np.ndarray) -> np.ndarray:
    """(B, k) coefficients, highest power first, at (B, N) points: in the frames ``centre``
    and ``scale`` (B,) when given, else raw (an older file: raw coefficients only)."""
    if centre is None:
        return horner(params, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return horner(params, (x - centre[:, None]) / scale[:, None])


def _family(f, params: np.ndarray, x: np.ndarray) -> np.ndarray:
    import torch

    out = torch.func.vmap(f)(torch.tensor(x, dtype=torch.float64),
                             torch.tensor(params, dtype=torch.float64))
    return out.numpy()


def _predict_result(fit, x) -> np.ndarray:
    batch_shape, k = tuple(fit.status.shape), fit.params.shape[-1]
    batch = int(np.prod(batch_shape))
    x = np.asarray(x)
    if x.ndim > 2:
        x = x.reshape(batch, x.shape[-1])
    points = _points(x, batch)
    model = fit.output_model
    if model.is_poly:
        if fit.frame_params is not None:
            params = fit.frame_params.cpu().numpy().reshape(batch, k)
            centre = fit.x_centre.cpu().numpy().reshape(batch)
            scale = fit.x_scale.cpu().numpy().reshape(batch)
        else:
            params, centre, scale = fit.params.cpu().numpy().reshape(batch, k), None, None
        out = polynomial(params, centre, scale, points)
    else:
        out = _family(model.f, fit.params.cpu().numpy().reshape(batch, k), points)
    return out.reshape(*batch_shape, points.shape[-1])


def _predict_table(table, meta: dict, x) -> np.ndarray:
    columns = [name for name, _ in meta["columns"]]

    def values(name):
        return table[name].to_numpy(zero_copy_only=False).astype(np.float64)

    points = _points(x, table.num_rows)
    if meta["model"] == "poly":
        framed = all(name in table.column_names
                     for name in ("x_centre", "x_scale", *map(io.frame_name, columns)))
        if framed:
            params = np.stack([values(io.frame_name(name)) for name in columns], axis=1)
            return polynomial(params, values("x_centre"), values("x_scale"), points)
        return polynomial(np.stack([values(name) for name in columns], 1), None, None,
                           points)
    if meta["model"] in FAMILY_PARAMS:
        from batchfit.fitting.models import FAMILIES

        params = np.stack([values(name) for name in columns], axis=1)
        return _family(FAMILIES[meta["model"]].f, params, points)
    raise ValueError("predict evaluates polynomials and the built-in families; a custom "
                     "model's function is not stored in its table (evaluate it yourself)")
