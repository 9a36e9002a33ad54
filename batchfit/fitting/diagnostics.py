"""Per-series diagnostics of a finished fit: loss, rmse, r2, standard errors, status.

Formulas (weights w, used points n, coefficients k, residuals r = y - f(x)):

* ``loss``: weighted mean of the per-point loss; ``rmse = sqrt(mean r^2)`` over used points
  (unweighted, in y units); ``r2 = 1 - sum w r^2 / sum w (y - ybar_w)^2`` (statsmodels' WLS
  ``rsquared``), NaN when y is constant.
* Standard errors, MSE: weighted least squares, ``cov = s^2 (X^T W X)^-1`` with
  ``s^2 = sum w r^2 / (n - k)``, as statsmodels' WLS and ``numpy.polyfit(..., cov=True)`` with
  ``w = sqrt(weights)``. Robust losses: Huber's M-estimator form with ``psi(r) = l'(r) / 2``
  (l the per-point loss), ``cov = s^2 A^-1``, ``A = X^T diag(w psi'(r)) X``,
  ``s^2 = sum w psi^2 / (n - k) / mean_w(psi')^2``, which reduces to the MSE formula for MSE.
  Undefined (NaN) when n <= k, for user loss callables, and where A is not positive definite
  (possible for the non-convex cauchy and arctan).
* Covariance (``covariance=True``): the same ``cov`` in full, mapped from the frame to the raw
  coefficients as ``M cov M^T`` in float64 (``models.to_raw_map``), its diagonal the
  stderr squared. Nonlinear models: ``s^2 (J^T W J)^-1`` and the sandwich likewise;
  ``poisson``: the inverse Fisher information ``(J^T diag(w / mu) J)^-1``, unscaled.
"""

from __future__ import annotations

import functools

import torch

from batchfit.fitting import linalg
from batchfit.fitting.data import Status
from batchfit.fitting.losses import Loss
from batchfit.fitting.models import (
    Sums,
    chebyshev_terms,
    gram_from_sums,
    monomial_coefficients,
    to_raw_map,
    total_squares,
)

# An internal status, never returned by ``batchfit.fit``: a float32 fit whose residuals are
# within PRECISION_MARGIN rounding errors of the data's size (exact or nearly exact data, or y
# far from 0 compared with its spread). Float32 rounding, not the data's noise, then limits
# the coefficients (they can be off by many of their standard errors), so the engine refits
# those series in float64.
PRECISION_LIMITED = -1
PRECISION_MARGIN = 100


def coefficient_errors(sums: Sums, curvature, spread, pivot_tol, covariance: bool = False):
    """``(errors, covariance)``: raw-unit standard errors from the frame's curvature matrix
    and residual spread, and with ``covariance`` the raw coefficients' covariance
    ``M C M^T`` (a Mat, lowest power first, its diagonal the errors squared; else None)."""
    k = len(curvature)
    dof = sums.n - k
    cov_frame, ok = linalg.inverse(curvature, pivot_tol)
    sigma2 = (spread / dof.clamp(min=1)).to(torch.float64)
    to_raw = to_raw_map(sums.centre_raw, sums.half, k)
    cov_frame = tuple(tuple(c.to(torch.float64) * sigma2 for c in row) for row in cov_frame)
    defined = ok & (dof > 0)
    errors, units, bigs = [], [], []
    for row in to_raw:  # var p_i = M_i C M_i^T, M_i divided by its largest entry first: for
        # x ~ 1e100 or 1e-80 the entries' squares would leave float64's range
        big = functools.reduce(torch.maximum, [m.abs() for m in row])
        big = torch.where((big > 0) & torch.isfinite(big), big, 1)
        unit = tuple(m / big for m in row)
        var = linalg.dot(unit, linalg.mat_vec(cov_frame, unit))
        errors.append(torch.where(defined, torch.sqrt(var.clamp(min=0)) * big, torch.nan))
        units.append(unit)
        bigs.append(big)
    if not covariance:
        return tuple(errors), None
    cov = tuple(tuple(errors[i] ** 2 if i == j else torch.where(
        defined, linalg.dot(units[i], linalg.mat_vec(cov_frame, units[j])) * bigs[i] * bigs[j],
        torch.nan) for j in range(k)) for i in range(k))
    return tuple(errors), cov


def frame_of(centre_raw, half, q) -> dict:
    """A polynomial fit in its own frame (``FitResult.x_centre``, ``x_scale``,
    ``frame_params``): ``q`` Chebyshev coefficients of y in ``t = (x - centre) / half``."""
    return {"x_centre": centre_raw.to(torch.float64), "x_scale": half.to(torch.float64),
            "frame_params": monomial_coefficients(q)}


def summarise(t, y, w, sums: Sums, q, loss: Loss, f_scale, pivot_tol,
              covariance: bool = False) -> dict:
    """Diagnostics of one series fitted with Chebyshev coefficients ``q`` in its frame
    (``covariance``: also the raw coefficients' covariance, NaN for user losses).

    For a built-in robust loss the same pass also gives the loss's gradient and Hessian in
    the frame at ``q`` (``gradient``, ``curvature``: what the last convergence check needs),
    from the sums ``sum w l''(r) T_m`` that its standard errors need anyway."""
    k = len(q)
    robust = loss.user is None and not loss.is_mse
    terms = chebyshev_terms(t, 2 * k - 2 if robust else k - 1)
    pred = sum(qj * tj for qj, tj in zip(q, terms))
    r = y - pred
    sse = (w * r * r).sum()
    sst = total_squares(y, w, sums.ybar)
    out = {
        "level": torch.sqrt(sums.ybar**2 + sst / sums.wsum),  # root mean square of y
        "rmse": torch.sqrt(torch.where(w > 0, r * r, 0).sum() / sums.n),
        "r2": torch.where(sst > 0, 1 - sse / sst, torch.nan),
        "params": linalg.mat_vec(to_raw_map(sums.centre_raw, sums.half, k),
                                 tuple(qj.to(torch.float64) for qj in q)),
        "frame": frame_of(sums.centre_raw, sums.half, q),
    }
    if not robust:
        out["loss"] = loss.series_loss(pred, y, w, f_scale)
        if loss.user is not None:
            nan = tuple(torch.full_like(p, torch.nan) for p in out["params"])
            errors = nan, (tuple(nan for _ in nan) if covariance else None)
        else:
            errors = coefficient_errors(sums, sums.gram, sse, pivot_tol, covariance)
        return _with_errors(out, errors)
    value, slope, bend = loss.derivatives(r, f_scale)  # l, l' = 2 psi, l'' = 2 psi'
    wsum = w.sum()
    bend_sums = [(w * bend * tm).sum() for tm in terms]
    out["loss"] = (w * value).sum() / wsum
    out["gradient"] = tuple(-(w * slope * tj).sum() / wsum for tj in terms[:k])
    out["curvature"] = gram_from_sums([b / wsum for b in bend_sums], k)
    # Huber's sandwich in psi: A = sum w psi' T T^T, s^2 from sum w psi^2 / mean_w(psi')^2
    spread = (w * slope * slope).sum() / 4 / (bend_sums[0] / 2 / sums.wsum) ** 2
    return _with_errors(out, coefficient_errors(
        sums, gram_from_sums([b / 2 for b in bend_sums], k), spread, pivot_tol, covariance))


def _with_errors(out: dict, errors) -> dict:
    """``out`` with ``coefficient_errors``' answer: stderr, and the covariance if any."""
    out["stderr"], covariance = errors
    if covariance is not None:
        out["covariance"] = covariance
    return out


def finalize(summary: dict, n, solvable, converged, diverged, params=None,
             check_precision: bool = False) -> dict:
    """One series' final record: its status (most fundamental failure first), and NaN in
    place of every number that means nothing for a series whose fit is not identified.
    ``check_precision``: flag float32 fits limited by rounding (PRECISION_LIMITED)."""
    params = summary["params"] if params is None else tuple(p.to(torch.float64) for p in params)
    k = len(params)
    finite = torch.isfinite(summary["loss"])
    for p in params:
        finite = finite & torch.isfinite(p)
    code = torch.where(converged, int(Status.OK), int(Status.NOT_CONVERGED))
    code = torch.where(diverged | ~finite, int(Status.DIVERGED), code)
    code = torch.where(solvable, code, int(Status.SINGULAR))
    code = torch.where(n < k, int(Status.TOO_FEW_POINTS), code)
    rmse = summary["rmse"]
    if check_precision and rmse.dtype == torch.float32:
        rounding = PRECISION_MARGIN * torch.finfo(rmse.dtype).eps * summary["level"]
        # (Newton cannot converge when rounding blurs the loss: not_converged counts too.)
        fitted = (code == int(Status.OK)) | (code == int(Status.NOT_CONVERGED))
        code = torch.where(fitted & (rmse < rounding), PRECISION_LIMITED, code)
    unidentified = (n < k) | ~solvable

    def blank(value):
        return torch.where(unidentified, torch.nan, value)

    out = {"params": tuple(map(blank, params)), "stderr": tuple(map(blank, summary["stderr"])),
           "loss": blank(summary["loss"]), "rmse": blank(summary["rmse"]),
           "r2": blank(summary["r2"]), "n_points": n, "status": code.to(torch.int8)}
    if "frame" in summary:
        frame = summary["frame"]
        out.update(x_centre=frame["x_centre"], x_scale=frame["x_scale"],
                   frame_params=tuple(map(blank, frame["frame_params"])))
    if "covariance" in summary:
        out["covariance"] = tuple(tuple(map(blank, row)) for row in summary["covariance"])
    return out
