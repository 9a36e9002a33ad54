"""The fast formulations against the torch.func paths they replace.

Built-in losses use closed-form derivatives (no autograd), GD/Adam on MSE run as a few
batched ops per epoch on the moment sums, models get their Jacobian by reverse mode per
point and their parameters as a tuple. A user callable that computes the same thing takes
the generic torch.func path (vmap of grad, Jacobians, Hessians), so each fast path is
checked against it: same answers to rounding, same statuses and iteration counts.
"""

import numpy as np
import pytest
import torch
from torch.func import grad, vmap
from zoo import seed_data

import batchfit
from batchfit.fitting.losses import RHO, resolve_loss
from batchfit.fitting.nonlinear import call_form, point_jacobian, predict

ROBUST = ["huber", "soft_l1", "cauchy", "arctan"]


def scipy_style(name, f_scale):
    """The loss as a user callable, from scipy's rho: the torch.func path differentiates it."""
    rho = RHO[name]

    def loss(pred, y):
        return f_scale**2 * rho(((y - pred) / f_scale) ** 2)
    return loss


@pytest.mark.parametrize("name", ["linear", *ROBUST])
def test_closed_form_derivatives_equal_autograd_of_the_definition(name):
    loss = resolve_loss(name)
    r = torch.linspace(-6, 6, 241, dtype=torch.float64)
    f = torch.tensor(0.7, dtype=torch.float64)

    def definition(ri):
        return f**2 * RHO[name]((ri / f) ** 2)

    value, slope, bend = loss.derivatives(r, f)
    torch.testing.assert_close(value, vmap(definition)(r), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(slope, vmap(grad(definition))(r), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(bend, vmap(grad(grad(definition)))(r), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss.point_loss(r, f), value, rtol=0, atol=0)


def outliers(rng, batch=24, points=40):
    x, y = seed_data(batch, points, rng, noise=0.3)
    bad = rng.random(x.shape) < 0.1
    return x, np.where(bad, y + rng.choice([-1, 1], x.shape) * 20, y)


@pytest.mark.parametrize("name", ROBUST)
def test_robust_newton_equals_the_torch_func_path(name, rng):
    x, y = outliers(rng)
    # (tol far below the default: both paths then stop at the same minimum, where the
    # default stops them anywhere in its 1e-6 band)
    kwargs = dict(f_scale=0.5, dtype="float64", tol=1e-14, compile=False)
    closed = batchfit.fit(x, y, loss=name, **kwargs)
    generic = batchfit.fit(x, y, loss=scipy_style(name, 0.5), **kwargs)
    # (a series stops once every parameter moves by under sqrt(eps) of itself, so two
    # roundings of one path may stop that far apart: 1e-9 seen for arctan, 0 for the others)
    np.testing.assert_allclose(closed.params, generic.params, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(closed.loss, generic.loss, rtol=1e-12)
    assert torch.equal(closed.status, generic.status)
    assert torch.equal(closed.iterations, generic.iterations)


@pytest.mark.parametrize("solver,lr,dtype,tolerance",
                         [("gd", 1e-3, "float64", 1e-10),
                          # (the other two in the slow tier: 4-5 s each, eager)
                          pytest.param("adam", 1e-2, "float64", 1e-9, marks=pytest.mark.slow),
                          pytest.param("gd", 1e-3, "float32", 2e-5, marks=pytest.mark.slow)])
def test_moment_descent_equals_the_torch_func_path(solver, lr, dtype, tolerance, rng):
    """The seed's protocol (lr 1e-3; 3,000 of its 15,000 epochs, to keep the generic path's
    time short) and Adam, batched on the sums, against vmap(grad) of the same MSE over the
    points (a user callable takes that path)."""
    x, y = seed_data(16, 50, rng)
    p0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kwargs = dict(solver=solver, lr=lr, init=p0, dtype=dtype, epochs=3000, compile=False)
    moments = batchfit.fit(x, y, **kwargs)
    points = batchfit.fit(x, y, loss=lambda pred, y: (pred - y) ** 2, **kwargs)
    np.testing.assert_allclose(moments.params, points.params, rtol=tolerance, atol=tolerance)
    assert torch.equal(moments.status, points.status)
    np.testing.assert_allclose(moments.history.loss_quantiles, points.history.loss_quantiles,
                               rtol=100 * tolerance)


def peaks(x, b):
    return (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
            + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2))


def peaks_as_a_whole(x, b):
    """The same model (on x >= 1) written so that the probe must refuse both fast forms: it
    reads its parameters as a vector and x as a whole."""
    b = b.reshape(-1)
    return peaks(x - x.min() + 1, b.unbind())


@pytest.fixture
def two_peaks(rng):
    x = np.arange(1.0, 101.0)
    truth = np.array([98.8, 0.0105, 100.5, 33.7, 11.6, 72.0, 71.5, 9.2])
    truth = truth * (1 + 0.03 * rng.uniform(-1, 1, (30, 8)))
    clean = peaks(torch.from_numpy(x), torch.from_numpy(truth.T[:, :, None])).numpy()
    y = clean + rng.normal(0, 2.0, clean.shape)
    return x, y, truth * (1 + 0.05 * rng.uniform(-1, 1, truth.shape))


def test_the_probe_picks_the_forms_a_model_allows(two_peaks):
    x, _, p0 = two_peaks
    xt, pt = torch.from_numpy(x), torch.from_numpy(p0[0])
    fast = call_form(batchfit.fitting.models.resolve_model(peaks, 2, [f"b{i}" for i in range(8)]),
                     xt, pt)
    assert fast.tuple_params and fast.pointwise
    slow = call_form(batchfit.fitting.models.resolve_model(peaks_as_a_whole, 2,
                                                   [f"b{i}" for i in range(8)]), xt, pt)
    assert not slow.tuple_params and not slow.pointwise
    pred, columns = point_jacobian(fast, xt, tuple(pt.unbind()))
    want = torch.func.jacrev(lambda p: peaks(xt, p))(pt)
    torch.testing.assert_close(pred, predict(fast, xt, tuple(pt.unbind())))
    torch.testing.assert_close(torch.stack(columns, dim=1), want, rtol=1e-12, atol=1e-12)


def test_lm_fast_forms_equal_the_generic_path(two_peaks):
    """Per-point Jacobians, tuple parameters and closed-form loss slopes (peaks) against
    forward-mode Jacobians of the stacked contract (peaks_as_a_whole)."""
    x, y, p0 = two_peaks
    fast = batchfit.fit(x, y, model=peaks, p0=p0, dtype="float64", compile=False)
    slow = batchfit.fit(x, y, model=peaks_as_a_whole, p0=p0, dtype="float64", compile=False)
    assert (fast.status_labels() == "ok").mean() > 0.9
    np.testing.assert_allclose(fast.params, slow.params, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fast.stderr, slow.stderr, rtol=1e-6)
    assert torch.equal(fast.status, slow.status)


def test_robust_lm_closed_form_equals_autograd_of_the_loss(two_peaks):
    x, y, p0 = two_peaks
    y = y.copy()
    y[:, ::9] += 40  # outliers
    closed = batchfit.fit(x, y, model=peaks, p0=p0, loss="soft_l1", f_scale=3.0,
                          dtype="float64", compile=False)
    generic = batchfit.fit(x, y, model=peaks, p0=p0, loss=scipy_style("soft_l1", 3.0),
                           f_scale=3.0, dtype="float64", compile=False)
    np.testing.assert_allclose(closed.params, generic.params, rtol=1e-8, atol=1e-10)
    assert torch.equal(closed.status, generic.status)
