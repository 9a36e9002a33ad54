"""Evaluating fits: ``batchfit.predict(fit_or_table, x)``.

A polynomial is evaluated in the frame it was fitted in, ``t = (x - x_centre) / x_scale``,
whenever the fit carries it (every polynomial ``FitResult`` and output file does): with x far
from 0 (Unix timestamps) the raw form ``a x^2 + b x + c`` cancels catastrophically, whereas
the frame keeps float64's digits. Families are evaluated with their functions (torch, loaded
then). Polynomials from a file need no torch.

``interval=0.95`` adds confidence bands of the fitted curve by the delta method: at each x,
``var f = g^T C g`` with ``C`` the fit's parameter covariance (``fit(..., covariance=True)``,
or a table's ``cov_<i>_<j>`` columns) and ``g = df/dparams`` there (polynomials: the powers
of t in the frame, C mapped to the frame's coefficients; models: ``torch.func.jacrev``), and
half-width ``q sqrt(var)``. ``q`` is Student's t quantile on ``n_points - k`` degrees of
freedom where the covariance carries an estimated residual variance (MSE and the robust
losses, as statsmodels' ``get_prediction``), the normal quantile for ``poisson`` (whose
Fisher information has no scale to estimate); both computed without scipy
(``quantiles``). With x far from 0 (timestamps) the raw covariance itself has cancelled
digits, and so has the band.
"""

from __future__ import annotations

import os
from math import comb
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from batchfit import io
from batchfit.core.names import FAMILY_PARAMS, FAMILY_X_COLUMNS, LIKELIHOOD_LOSSES
from batchfit.fitting.quantiles import t_quantile


class Band(NamedTuple):
    """``predict(..., interval=...)``: the fitted curves and their confidence band."""

    value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def predict(fit, x, interval: float | None = None):
    """The fitted curves at ``x``, as float64.

    ``fit``: a ``FitResult``, an output table of ``batchfit run`` / ``FitResult.to_arrow``
    (a pyarrow Table, a pandas or polars DataFrame) or the path of an output file.
    ``x``: (N,) shared by every series, or one row per series ((B, N); for a FitResult of
    batch shape (..., ) also (..., N)); for a model of x with d columns (``gauss2d``)
    (N, d) shared, or (B, N, d) (or (..., N, d)); numpy ``datetime64``/``timedelta64``
    are read as float seconds, as ``fit`` reads them. Returns (B, N) (or (..., N)); NaN for series
    without a fit. ``interval`` (e.g. 0.95): a ``Band(value, lower, upper)`` of such arrays
    instead, the pointwise confidence band at that level (module doc), NaN where the
    covariance is undefined; it needs the covariance (fit with ``covariance=True``).
    """
    if interval is not None and not (isinstance(interval, float | int) and 0 < interval < 1):
        raise ValueError(f"interval must be a level between 0 and 1, e.g. 0.95, got "
                         f"{interval!r}")
    if hasattr(fit, "candidates"):  # a ChoiceResult: every series with its chosen fit
        if interval is not None:
            raise ValueError("predict's interval is for one model's fits, not a model choice")
        return _predict_choice(fit, x)
    if hasattr(fit, "params") and hasattr(fit, "status"):
        value = _predict_result(fit, x)
        return value if interval is None else _band(value, _result_spread(fit, x), interval)
    if isinstance(fit, str | os.PathLike):
        table, meta = io.read_coefficients(os.fspath(fit))
    else:
        table, meta = io.coefficient_table(io.arrow_table(fit), "the table")
    value = _predict_table(table, meta, x)
    return value if interval is None else _band(value, _table_spread(table, meta, x), interval)


class _Spread(NamedTuple):
    """What a band needs besides the curve: the variance of the fitted curve at each point
    (B, N), and per series the points and parameters (B,) and whether the loss is a
    likelihood (normal quantiles)."""

    variance: np.ndarray
    n_points: np.ndarray
    k: int
    likelihood: bool


def _band(value: np.ndarray, spread: _Spread, interval: float) -> Band:
    if spread.likelihood:
        q = np.full(len(spread.n_points), NormalDist().inv_cdf((1 + interval) / 2))
    else:
        q = t_quantile((1 + interval) / 2, np.maximum(spread.n_points - spread.k, 0))
    half = (q[:, None] * np.sqrt(np.clip(spread.variance, 0, None))).reshape(value.shape)
    return Band(value, value - half, value + half)


def _no_covariance():
    return ValueError("predict's interval needs the parameters' covariance: fit with "
                      "covariance=True (batchfit run --covariance)")


def _frame_variance(cov: np.ndarray, centre, scale, x: np.ndarray) -> np.ndarray:
    """``g^T C g`` of polynomials (raw covariance ``cov`` (B, k, k), highest power first),
    in each series' frame: C mapped to the coefficients of ``t = (x - centre) / scale``
    (``x^i = sum_j comb(i, j) centre^(i-j) scale^j t^j``), g the powers of t."""
    batch, k = cov.shape[0], cov.shape[-1]
    if centre is None:  # (an older table without its frame: raw powers of x)
        centre, scale = np.zeros(batch), np.ones(batch)
    to_frame = np.zeros((batch, k, k))  # [power of t, power of x], lowest first
    for i in range(k):
        for j in range(i + 1):
            to_frame[:, j, i] = comb(i, j) * centre ** (i - j) * scale**j
    to_frame = to_frame[:, ::-1, ::-1]  # (highest power first, as cov)
    framed = to_frame @ cov @ to_frame.transpose(0, 2, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (x - centre[:, None]) / scale[:, None]
    powers = t[:, :, None] ** np.arange(k - 1, -1, -1)
    return np.einsum("bni,bij,bnj->bn", powers, framed, powers)


def _model_variance(f, params: np.ndarray, cov: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``g^T C g`` of a model, g its Jacobian in the parameters (torch.func), in float64."""
    import torch

    jac = torch.func.vmap(torch.func.jacrev(f, argnums=1))(
        torch.tensor(x, dtype=torch.float64), torch.tensor(params, dtype=torch.float64)).numpy()
    return np.einsum("bni,bij,bnj->bn", jac, cov, jac)


def _result_spread(fit, x) -> _Spread:
    if fit.covariance is None:
        raise _no_covariance()
    batch_shape, k = tuple(fit.status.shape), fit.params.shape[-1]
    batch = int(np.prod(batch_shape))
    model = fit.output_model
    points = _points(x, batch, _x_columns(model, x, batch_shape))
    cov = fit.covariance.cpu().numpy().reshape(batch, k, k)
    if model.is_poly:
        framed = fit.x_centre is not None
        variance = _frame_variance(
            cov, fit.x_centre.cpu().numpy().reshape(batch) if framed else None,
            fit.x_scale.cpu().numpy().reshape(batch) if framed else None, points)
    else:
        variance = _model_variance(model.f, fit.params.cpu().numpy().reshape(batch, k), cov,
                                   points)
    return _Spread(variance, fit.n_points.cpu().numpy().reshape(batch), k,
                   fit.loss_name in LIKELIHOOD_LOSSES)


def _table_spread(table, meta: dict, x) -> _Spread:
    if meta["model"] == "auto":
        raise ValueError("predict's interval is for one model's fits, not a model choice")
    columns = meta["columns"]
    names = io.covariance_columns(columns)
    if not all(name in table.column_names for name, _, _ in names):
        raise _no_covariance()

    def values(name):
        return table[name].to_numpy(zero_copy_only=False).astype(np.float64)

    k = len(columns)
    cov = np.full((table.num_rows, k, k), np.nan)
    for name, i, j in names:
        cov[:, i, j] = cov[:, j, i] = values(name)
    model = _table_model(meta)
    points = _points(x, table.num_rows, model.x_columns if model else 1)
    if meta["model"] == "poly":
        framed = all(name in table.column_names for name in ("x_centre", "x_scale"))
        variance = _frame_variance(cov, values("x_centre") if framed else None,
                                   values("x_scale") if framed else None, points)
    elif model is not None:
        params = np.stack([values(name) for name, _ in columns], axis=1)
        variance = _model_variance(model.f, params, cov, points)
    else:  # (predict itself says why)
        raise ValueError("predict's interval evaluates polynomials, the built-in families "
                         "and formulas")
    return _Spread(variance, values("n_points"), k, meta.get("loss") in LIKELIHOOD_LOSSES)


def _x_columns(model, x, batch_shape: tuple) -> int:
    """The columns of the x a fit is evaluated at: the model's (``Model.x_columns``); for a
    user's model, x's last axis where x has one beyond (..., N) or is (N, d) shared."""
    if model.x_columns is not None:
        return model.x_columns
    x = np.asarray(x)
    shared = x.ndim == 2 and x.shape[0] != int(np.prod(batch_shape))
    return x.shape[-1] if x.ndim == len(batch_shape) + 2 or shared else 1


def _points(x, batch: int, columns: int = 1) -> np.ndarray:
    """(B, N) points, or (B, N, d) for x with ``columns`` d > 1: from (N, d) shared, (B, N,
    d), or (..., N, d) for a batch shape (...)."""
    x = np.asarray(x)
    if x.dtype.kind in "mM":
        from batchfit.fitting.data import datetime_seconds

        x = datetime_seconds(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x must be numbers or datetimes, got {x.dtype}")
    x = x.astype(np.float64)
    if columns > 1:
        if x.ndim > 3:
            x = x.reshape(batch, *x.shape[-2:])
        if x.ndim == 2 and x.shape[-1] == columns:
            return np.broadcast_to(x, (batch, *x.shape))
        if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] != columns:
            raise ValueError(f"x must be (N, {columns}) or ({batch}, N, {columns}) for "
                             f"{batch} series of this {columns}-column model, got shape "
                             f"{x.shape}")
        return x
    if x.ndim > 2:
        x = x.reshape(batch, x.shape[-1])
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
    model = fit.output_model
    points = _points(x, batch, _x_columns(model, x, batch_shape))
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
    return out.reshape(*batch_shape, points.shape[1])


def _predict_choice(fit, x) -> np.ndarray:
    """A model choice's curves: each candidate's fit, kept where it was chosen."""
    curves = np.stack([_predict_result(one, x) for one in fit.fits], axis=-1)
    return np.take_along_axis(curves, fit.choice.numpy()[..., None, None], axis=-1)[..., 0]


def _predict_choice_table(table, meta: dict, x) -> np.ndarray:
    """A model choice's table: each row by its own model (``model``), from that candidate's
    columns (polynomials in raw form: a choice's table keeps no frame)."""
    from batchfit.core.options import candidate_degree
    from batchfit.fitting.models import FAMILIES

    chosen = table["model"].to_numpy(zero_copy_only=False)
    points = _points(x, table.num_rows, 1)
    out = np.full(points.shape, np.nan)
    for name, columns in meta["candidate_columns"].items():
        rows = np.flatnonzero(chosen == name)
        if not len(rows):
            continue
        params = np.stack([table[column].take(rows).to_numpy(zero_copy_only=False)
                           .astype(np.float64) for column in columns], axis=1)
        out[rows] = horner(params, points[rows]) if candidate_degree(name) is not None \
            else _family(FAMILIES[name].f, params, points[rows])
    return out


def _predict_table(table, meta: dict, x) -> np.ndarray:
    if meta["model"] == "auto":
        if FAMILY_X_COLUMNS.keys() & set(meta["candidate_columns"]):
            raise ValueError("predict evaluates model choices of 1-D x")
        return _predict_choice_table(table, meta, x)
    columns = [name for name, _ in meta["columns"]]

    def values(name):
        return table[name].to_numpy(zero_copy_only=False).astype(np.float64)

    model = _table_model(meta)
    points = _points(x, table.num_rows, model.x_columns if model else 1)
    if meta["model"] == "poly":
        framed = all(name in table.column_names
                     for name in ("x_centre", "x_scale", *map(io.frame_name, columns)))
        if framed:
            params = np.stack([values(io.frame_name(name)) for name in columns], axis=1)
            return polynomial(params, values("x_centre"), values("x_scale"), points)
        return polynomial(np.stack([values(name) for name in columns], 1), None, None,
                           points)
    if model is not None:
        params = np.stack([values(name) for name in columns], axis=1)
        return _family(model.f, params, points)
    raise ValueError("predict evaluates polynomials, the built-in families and formulas; "
                     "a custom model's function is not stored in its table (evaluate it "
                     "yourself)")


def _table_model(meta: dict):
    """The model of an output table's family or formula (a formula's text is in the
    metadata: parsed, never run as code), or None (a polynomial, a user's function)."""
    if meta["model"] in FAMILY_PARAMS:
        from batchfit.fitting.models import FAMILIES

        return FAMILIES[meta["model"]]
    if meta["model"] == "formula":
        from batchfit.fitting.user_models import table_model

        return table_model(meta)
    return None
