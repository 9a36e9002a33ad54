"""A zoo of batched problems with known answers, and independent float64 oracles."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, vmap

SEED_TRUTH = np.array([20.0, 5.0, -3.0])  # a, b, c of the seed's 20x^2 + 5x - 3


def seed_data(batch: int, points: int, rng, noise: float = 1.0, dtype=np.float64):
    """The seed's problem at batch scale: x in [0, 1], y = 20x^2 + 5x - 3 + noise."""
    x = rng.uniform(0, 1, (batch, points))
    y = SEED_TRUTH[0] * x**2 + SEED_TRUTH[1] * x + SEED_TRUTH[2] + rng.normal(0, noise, x.shape)
    return x.astype(dtype), y.astype(dtype)


def random_polys(batch: int, points: int, degree: int, rng, noise=0.1, offset=0.0, span=1.0):
    coefs = rng.normal(0, 3, (batch, degree + 1))
    x = offset + span * rng.uniform(-1, 1, (batch, points))
    t = (x - offset) / span
    y = sum(coefs[:, [j]] * t**j for j in range(degree + 1)) + rng.normal(0, noise, x.shape)
    return x, y


def polyfit_rows(x, y, degree, w=None):
    """numpy.polyfit per row in float64; coefficients in its native order, highest power
    first (batchfit's ``params`` order), plus stderr in the same order.

    ``w`` are batchfit weights (multiplying squared residuals); polyfit wants their sqrt.
    """
    params, errors = [], []
    for i in range(len(y)):
        keep = np.isfinite(x[i]) & np.isfinite(y[i])
        wi = None if w is None else np.sqrt(w[i][keep])
        if keep.sum() > degree + 1:
            p, cov = np.polyfit(x[i][keep], y[i][keep], degree, w=wi, cov=True)
            errors.append(np.sqrt(np.diag(cov)))
        else:  # exactly determined: polyfit cannot scale a covariance
            p = np.polyfit(x[i][keep], y[i][keep], degree, w=wi)
            errors.append(np.full(degree + 1, np.nan))
        params.append(p)
    return np.array(params), np.array(errors)


def naive_descent(x, y, p0, lr, epochs, adam=False):
    """The seed's loop, batched the obvious way: vmap(grad) of the MSE over the raw points.

    ``p0`` (B, k): coefficients highest power first (batchfit's ``init`` order). Returns the
    final parameters (in that order) and the loss of every series at every epoch.
    """
    def loss(p, x, y):
        degree = p.shape[0] - 1
        pred = sum(p[i] * x**(degree - i) for i in range(degree + 1))
        return ((pred - y) ** 2).mean()

    step = vmap(grad(loss))
    losses = vmap(loss)
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    curve = [losses(p, x, y)]
    for epoch in range(1, epochs + 1):
        g = step(p, x, y)
        if adam:  # torch.optim.Adam's update, written out
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - lr * (m / (1 - 0.9**epoch)) / (torch.sqrt(v / (1 - 0.999**epoch)) + 1e-8)
        else:
            p = p - lr * g
        curve.append(losses(p, x, y))
    return p, torch.stack(curve)


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its case builders and checks are shared)."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"batchfit_benchmark_{name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The row-order promise of MSE fits (README, "Row order never changes the numbers"): the same
# series in the same order with the same counts and statuses, coefficients within REORDER_RTOL
# of their series' largest, the other numbers within REORDER_RTOL of themselves (an exactly
# fitted series' rmse and standard errors: within REORDER_RTOL of its largest coefficient,
# its loss within the square of that: both are rounding noise then). A polynomial's fits in
# their frames (x_centre, x_scale, <name>_frame) keep the same promise.
REORDER_RTOL = 1e-12
FRAME_COLUMNS = ("x_centre", "x_scale")  # a polynomial's frame (FitResult.x_centre, x_scale)


def assert_same_fits(a, b, rtol: float = REORDER_RTOL):
    """Two output tables (pyarrow) that may differ only by float64 rounding in that sense."""
    assert a.schema.equals(b.schema, check_metadata=False)
    for name in ("series_id", "n_points", "iterations", "status"):
        assert a[name].equals(b[name]), name
    names = a.column_names
    fitted = names[1:names.index("n_points")]
    coefficients = [n for n in fitted if not n.endswith(("_stderr", "_frame"))
                    and n not in FRAME_COLUMNS]
    # A polynomial's fits in their frames: coefficients in t, in the same sense as the raw ones;
    # the frame's centre and scale within REORDER_RTOL of themselves.
    framed = [n for n in fitted if n.endswith("_frame")]

    def values(table, column):
        return table[column].to_numpy(zero_copy_only=False).astype(float)

    def close(group):
        """Coefficients within rtol of their series' largest; returns that largest (B, 1)."""
        pa_, pb = (np.stack([values(t, n) for n in group], 1) for t in (a, b))
        assert np.array_equal(np.isnan(pa_), np.isnan(pb)), group
        largest = np.nanmax(np.abs(pa_), axis=1, keepdims=True)
        assert np.all(np.nan_to_num(np.abs(pa_ - pb)) <= rtol * np.nan_to_num(largest) + 1e-300), \
            group
        return largest

    scale = close(coefficients)
    if framed:
        close(framed)
    for name in [n for n in FRAME_COLUMNS if n in fitted]:
        x, y = values(a, name), values(b, name)
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        assert np.all(np.nan_to_num(np.abs(x - y)) <= rtol * np.nan_to_num(np.abs(x))), name
    for name in [n for n in names if n.endswith("_stderr")] + ["loss", "rmse", "r2"]:
        x, y = values(a, name), values(b, name)
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        ok = ~np.isnan(x)
        floor = (rtol * scale[:, 0]) ** (2 if name == "loss" else 1) if name != "r2" else 0
        bound = np.maximum(rtol * np.abs(x), np.nan_to_num(floor))
        worst = np.argmax(np.where(ok, np.abs(x - y) - bound, -np.inf))
        assert np.all(np.abs(x - y)[ok] <= bound[ok]), (name, worst, x[worst], y[worst])
