"""Fits of labelled stacks (xarray): a DataArray's series along one dimension fitted in one
batch, or block by block when it is dask-backed, into a Dataset named as xarray's own
``DataArray.curvefit`` names its output (``polyfit``'s on request), so either swaps in.

Public as ``batchfit.xarray``, which registers the ``da.batchfit`` accessor."""

from __future__ import annotations

import json
import threading

import numpy as np

try:
    import xarray as xr
except ImportError as error:  # an optional extra: say which one
    raise ImportError("batchfit.xarray needs xarray: pip install 'batchfit[xarray]'") from error

from batchfit._version import __version__
from batchfit.core.names import STATUS_LABELS
from batchfit.core.options import resolve
from batchfit.engine.front import config
from batchfit.engine.front import fit as fit_arrays

STYLES = ("curvefit", "polyfit")
# FitResult field -> (variable, its own dims after the batch's, its attributes)
VARIABLES = {
    "params": ("curvefit_coefficients", ("param",), "the coefficients of the best fit"),
    "stderr": ("curvefit_stderr", ("param",), "standard errors of the coefficients"),
    "covariance": ("curvefit_covariance", ("cov_i", "cov_j"),
                   "covariance matrix of the coefficients"),
    "n_points": ("n_points", (), "points used"),
    "loss": ("loss", (), "final loss (mean over the series' points)"),
    "rmse": ("rmse", (), "root mean squared residual"),
    "r2": ("r2", (), "coefficient of determination"),
    "iterations": ("iterations", (), "solver steps taken"),
    "status": ("status", (), "fit outcome"),
    "degrees": ("degree_chosen", (), "polynomial degree chosen by BIC"),
    "converged_starts": ("converged_starts", (), "starts that converged"),
}
_DTYPES = {"n_points": np.int64, "iterations": np.int64, "status": np.int8,
           "degrees": np.int64, "converged_starts": np.int64}  # the rest: float64
POLYFIT_NAMES = {"curvefit_coefficients": "polyfit_coefficients",
                 "curvefit_stderr": "polyfit_stderr",
                 "curvefit_covariance": "polyfit_covariance"}
X_UNITS = {"M": "nanoseconds since 1970-01-01", "m": "nanoseconds"}  # as xarray's polyfit
# One fit at a time: each already uses every core, and torch.compile is not thread-safe,
# while dask's threads may still load the next blocks meanwhile.
_FIT_LOCK = threading.Lock()


def fit(da, dim, model=None, *, weights=None, style: str = "curvefit", covariance: bool = True,
        **fit_options):
    """Fit every series of ``da`` along ``dim`` with ``batchfit.fit``; a Dataset over the
    other dims.

    ``dim``: a dimension of ``da`` (x: its coordinate, else 0..N-1) or a 1-D coordinate (x:
    its values, along its dimension). Datetimes count nanoseconds since 1970-01-01 and
    timedeltas nanoseconds, as in xarray's ``polyfit``/``polyval``. ``weights``: a DataArray
    that broadcasts against ``da``. ``model`` and ``fit_options`` are ``batchfit.fit``'s
    (``degree``, ``p0``, ``loss``, ``dtype``, ...). A dask-backed ``da`` stays lazy: each
    block (the fitted dim in one chunk) is fitted when computed; compute the Dataset as a
    whole (``.compute()``) so each block is fitted once.

    ``style="curvefit"``: ``curvefit_coefficients`` (..., param) and ``curvefit_covariance``
    (..., cov_i, cov_j; ``covariance=False`` leaves it out) as ``DataArray.curvefit`` has
    them, with ``curvefit_stderr`` and the diagnostics ``status`` (codes, with CF
    ``flag_values``/``flag_meanings``), ``n_points``, ``loss``, ``rmse``, ``r2``,
    ``iterations``. ``style="polyfit"`` (polynomials):
    ``polyfit_coefficients`` (degree, ...) as ``DataArray.polyfit`` has them, for
    ``xarray.polyval``.
    """
    if not isinstance(da, xr.DataArray):
        raise ValueError(f"da must be an xarray.DataArray, got {type(da).__name__}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    for name in ("x", "y", "lengths", "mask", "axis"):
        if name in fit_options:
            raise ValueError(f"{name} comes from da and dim; batchfit.xarray.fit does not "
                             "take it")
    if isinstance(model, list | tuple) or (isinstance(model, str) and model.startswith("auto:")):
        raise ValueError("model: batchfit.xarray.fit takes one model (no choice among "
                         "candidates yet)")
    core, x, x_kind = _fitted_axis(da, dim)
    fit_options["covariance"] = covariance
    opts = resolve(model=model, **fit_options)
    if style == "polyfit" and not opts.is_poly:
        raise ValueError("style 'polyfit' is for polynomial fits (model=None)")
    names = config(opts).model.param_names
    fields = [f for f in VARIABLES
              if not (f == "covariance" and not opts.covariance)
              and not (f == "degrees" and not opts.auto_degree)
              and not (f == "converged_starts" and not opts.restarts)]
    inputs = [_numeric(da, "da")]
    if weights is not None:
        if not isinstance(weights, xr.DataArray):
            raise ValueError("weights must be an xarray.DataArray that broadcasts against da")
        inputs.append(_numeric(weights, "weights").broadcast_like(da))
    if any(value.chunks is not None for value in inputs):
        inputs = [value.chunk({core: -1}) for value in inputs]  # each block: whole series
    k = len(names)  # the size of every per-parameter dim
    outputs = xr.apply_ufunc(
        _fit_block, *inputs, kwargs=dict(x=x, fields=fields, model=model, options=fit_options),
        input_core_dims=[[core]] * len(inputs),
        output_core_dims=[list(VARIABLES[f][1]) for f in fields],
        exclude_dims={core}, dask="parallelized",
        output_dtypes=[_DTYPES.get(f, np.float64) for f in fields],
        dask_gufunc_kwargs={"output_sizes": {d: k for f in fields for d in VARIABLES[f][1]}})
    variables = {}
    for field, value in zip(fields, outputs):  # (status is always one of several)
        name, _, meaning = VARIABLES[field]
        variables[name] = value.assign_attrs(long_name=meaning)
    variables["status"].attrs.update(flag_values=np.arange(len(STATUS_LABELS), dtype=np.int8),
                                     flag_meanings=" ".join(STATUS_LABELS))
    out = xr.Dataset(variables).assign_coords(param=list(names))
    if "curvefit_covariance" in out:
        out = out.assign_coords(cov_i=list(names), cov_j=list(names))
    out.attrs = _attrs(opts, core, x_kind)
    return _polyfit_style(out, opts.degree) if style == "polyfit" else out


def _fit_block(y, *weights, x, fields, model, options):
    """The fits of one block (..., N): its series flattened into one batch."""
    shape, n = y.shape[:-1], y.shape[-1]
    with _FIT_LOCK:
        result = fit_arrays(x, y.reshape(-1, n), weights[0].reshape(-1, n) if weights else None,
                            model=model, **options)
    values = (getattr(result, f).cpu().numpy() for f in fields)
    return tuple(np.asarray(value, dtype=_DTYPES.get(f, np.float64)).reshape(
        shape + value.shape[1:]) for f, value in zip(fields, values))


def _fitted_axis(da, dim) -> tuple[str, np.ndarray, str]:
    """(the dimension fitted along, x as float64, x's dtype kind)."""
    if dim in da.coords:
        coord = da.coords[dim]
        if coord.ndim != 1:
            raise ValueError(f"dim {dim!r} must be a dimension or a 1-D coordinate of da; "
                             f"it spans {coord.dims}")
        core, values = coord.dims[0], np.asarray(coord.values)
    elif dim in da.dims:
        core, values = dim, np.arange(da.sizes[dim], dtype=np.float64)
    else:
        raise ValueError(f"dim {dim!r} is not a dimension or coordinate of da "
                         f"(dims: {', '.join(map(str, da.dims))})")
    kind = values.dtype.kind
    if kind == "M":
        values = (values - np.datetime64("1970-01-01", "ns")) / np.timedelta64(1, "ns")
    elif kind == "m":
        values = values / np.timedelta64(1, "ns")
    elif kind not in "iuf":
        raise ValueError(f"the values of dim {dim!r} must be numbers or datetimes, got "
                         f"dtype {values.dtype}")
    return core, np.asarray(values, dtype=np.float64), kind


def _numeric(value, name: str):
    kind = value.dtype.kind
    if kind == "f":
        return value
    if kind in "iu":
        return value.astype(np.float64)
    raise ValueError(f"{name} must hold numbers, got dtype {value.dtype}")


def _attrs(opts, core: str, x_kind: str) -> dict:
    """What the Dataset records about its fit (netCDF-safe: strings and numbers)."""
    described = {"version": __version__, **opts.describe(), "dim": core,
                 "x_unit": X_UNITS.get(x_kind)}
    return {"batchfit_version": __version__, "batchfit_model": opts.model_name,
            "batchfit_loss": opts.loss_name, "batchfit_solver": opts.solver,
            "batchfit_dim": core, "batchfit": json.dumps(described, default=str)}


def _polyfit_style(out, degree: int):
    """``out`` named and laid out as ``DataArray.polyfit``'s: coefficients (degree, ...)
    with the powers as the ``degree`` coordinate, covariance (cov_i, cov_j, ...)."""
    out = out.rename({name: new for name, new in POLYFIT_NAMES.items() if name in out})
    out = out.rename({"param": "degree"}).assign_coords(degree=np.arange(degree, -1, -1))
    out = out.drop_vars([c for c in ("cov_i", "cov_j") if c in out.coords])
    return out.transpose("degree", "cov_i", "cov_j", ..., missing_dims="ignore")
