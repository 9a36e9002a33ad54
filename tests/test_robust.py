"""Newton (MSE and robust losses) against the exact solver and scipy.optimize.least_squares."""

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from zoo import SEED_TRUTH, seed_data

import batchfit
from batchfit.fitting.losses import RHO

ROBUST = ["huber", "soft_l1", "cauchy", "arctan"]


def test_newton_mse_is_exact_in_one_step(rng):
    x, y = seed_data(50, 30, rng)
    exact = batchfit.fit(x, y, dtype="float64", compile=False)
    newton = batchfit.fit(x, y, solver="newton", dtype="float64", compile=False)
    np.testing.assert_allclose(newton.params, exact.params, rtol=1e-10)
    np.testing.assert_allclose(newton.stderr, exact.stderr, rtol=1e-8)
    assert (newton.iterations == 1).all()
    assert (newton.status_labels() == "ok").all()


@pytest.mark.parametrize("loss", ["linear"] + ROBUST)
def test_rho_matches_scipy_definitions(loss):
    """scipy.optimize._lsq.least_squares' rho, written out: z, then rho(z)."""
    z = torch.tensor([0.0, 0.25, 1.0, 4.0, 100.0], dtype=torch.float64)
    want = {"linear": z, "huber": torch.where(z <= 1, z, 2 * z.sqrt() - 1),
            "soft_l1": 2 * ((1 + z).sqrt() - 1), "cauchy": torch.log1p(z),
            "arctan": torch.arctan(z)}[loss]
    torch.testing.assert_close(RHO[loss](z), want)


def outlier_data(rng, batch=12, points=40):
    x, y = seed_data(batch, points, rng, noise=0.3)
    bad = rng.random(x.shape) < 0.1
    y = np.where(bad, y + rng.choice([-1, 1], x.shape) * rng.uniform(10, 30, x.shape), y)
    return x, y


@pytest.mark.parametrize("loss", ROBUST)
def test_robust_matches_scipy_least_squares(loss, rng):
    x, y = outlier_data(rng)
    f_scale = 0.5
    fit = batchfit.fit(x, y, loss=loss, f_scale=f_scale, dtype="float64", tol=1e-12,
                       compile=False)
    assert (fit.status_labels() == "ok").all(), fit.status_counts()
    for i in range(len(y)):
        start = np.polyfit(x[i], y[i], 2)  # batchfit starts robust fits from MSE too

        def residuals(p, i=i):
            return p[0] * x[i] ** 2 + p[1] * x[i] + p[2] - y[i]

        ref = least_squares(residuals, start, loss=loss, f_scale=f_scale, method="trf",
                            xtol=1e-15, ftol=1e-15, gtol=1e-15)
        np.testing.assert_allclose(fit.params[i], ref.x, rtol=1e-5, atol=1e-7)
        # batchfit's loss is scipy's cost as a mean: f^2 rho / n versus 0.5 f^2 sum rho
        np.testing.assert_allclose(fit.loss[i], 2 * ref.cost / len(y[i]), rtol=1e-6)


@pytest.mark.parametrize("loss", ROBUST)
def test_robust_lands_closer_to_truth_than_mse_with_outliers(loss, rng):
    x, y = outlier_data(rng, batch=200)
    mse = batchfit.fit(x, y, dtype="float64", compile=False)
    robust = batchfit.fit(x, y, loss=loss, f_scale=0.5, dtype="float64", compile=False)
    err_mse = np.abs(mse.params.numpy() - SEED_TRUTH).mean()
    err_robust = np.abs(robust.params.numpy() - SEED_TRUTH).mean()
    assert err_robust < 0.5 * err_mse


def test_robust_stderr_reduce_to_wls_for_small_residuals(rng):
    """Huber with every residual inside f_scale is MSE: same fit, same standard errors."""
    x, y = seed_data(20, 30, rng, noise=0.01)
    mse = batchfit.fit(x, y, dtype="float64", compile=False)
    huber = batchfit.fit(x, y, loss="huber", f_scale=10.0, dtype="float64", compile=False)
    np.testing.assert_allclose(huber.params, mse.params, rtol=1e-9)
    np.testing.assert_allclose(huber.stderr, mse.stderr, rtol=1e-6)


@pytest.mark.slow  # (compiles kernels: minutes on 2 cores with a cold cache)
def test_newton_compiled_matches_eager(rng):
    x, y = outlier_data(rng, batch=32, points=24)
    eager = batchfit.fit(x, y, loss="huber", dtype="float64", compile=False)
    compiled = batchfit.fit(x, y, loss="huber", dtype="float64", compile=True)
    np.testing.assert_allclose(compiled.params, eager.params, rtol=1e-9)
    assert (compiled.iterations == eager.iterations).all()


def test_newton_on_device(device, rng):
    x, y = outlier_data(rng, batch=8)
    cpu = batchfit.fit(x, y, loss="soft_l1", dtype="float64", device="cpu", compile=False)
    here = batchfit.fit(x, y, loss="soft_l1", dtype="float64", device=device, compile=False)
    np.testing.assert_allclose(here.params.cpu(), cpu.params, rtol=1e-9)


def test_ragged_and_job_fits_start_from_the_exact_fit_like_fit(rng):
    """fit_ragged (the job's path) once gave robust Newton the GD/Adam random start, and some
    series stopped not_converged where fit() converged: both start from the exact fit."""
    x, y = outlier_data(rng, batch=30, points=40)
    whole = batchfit.fit(x, y, degree=3, loss="huber", f_scale=2.0, compile=False)
    offsets = np.arange(0, x.size + 1, x.shape[1])
    ragged = batchfit.fit_ragged(x.ravel(), y.ravel(), offsets, degree=3, loss="huber",
                                 f_scale=2.0, compile=False)
    assert (ragged.status_labels() == "ok").all()
    assert torch.equal(ragged.params, whole.params) and torch.equal(ragged.status, whole.status)
