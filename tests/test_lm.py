"""Levenberg-Marquardt on models: the Jacobian, the shared loop, multi-start."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.func import jacrev

import batchfit
from batchfit.app.cli import main
from batchfit.fitting.nonlinear import jacobian


def sine(x, p):
    return p[0] * torch.sin(p[1] * x)


@pytest.fixture
def sines(rng):
    """Sinusoids whose frequency a start at 3 misses: LM lands on a local minimum."""
    x = np.linspace(0, 10, 60)
    truth = np.column_stack([rng.uniform(1, 2, 50), rng.uniform(1.0, 1.6, 50)])
    y = truth[:, [0]] * np.sin(truth[:, [1]] * x) + rng.normal(0, 0.1, (50, 60))
    return x, y, truth


def test_the_jacobian_columns_are_the_reverse_mode_ones():
    x = torch.linspace(0, 3, 40, dtype=torch.float64)
    p = tuple(torch.tensor(v, dtype=torch.float64) for v in (1.5, 0.7, -0.2))

    def predictions(*q):
        return q[0] * torch.exp(-q[1] * x) + q[2] * x**2

    pred, columns = jacobian(predictions, p, len(x))
    want = jacrev(predictions, argnums=(0, 1, 2))(*p)
    assert torch.allclose(pred, predictions(*p))
    for got, ref in zip(columns, want):
        assert torch.allclose(got, ref, rtol=1e-14, atol=1e-14)
    few = jacobian(predictions, p, 2)[1]  # N <= k: plain reverse mode
    assert all(torch.allclose(a, b) for a, b in zip(few, want))


def test_restarts_keep_the_best_converged_fit(sines):
    x, y, truth = sines
    plain = batchfit.fit(x, y, model=sine, p0=[1.0, 3.0], dtype="float64", compile=False)
    multi = batchfit.fit(x, y, model=sine, p0=[1.0, 3.0], dtype="float64", compile=False,
                         restarts=8)
    near = np.abs(multi.params.numpy()[:, 1] - truth[:, 1]) < 0.01
    assert not (np.abs(plain.params.numpy()[:, 1] - truth[:, 1]) < 0.01).any()
    assert near.sum() >= 30  # a start within a decade of the truth finds the global minimum
    assert plain.converged_starts is None
    starts = multi.converged_starts.numpy()
    assert ((starts >= 1) & (starts <= 9)).all() and (multi.status_labels() == "ok").all()
    # the first start is one of the nine, so the kept fit is never worse than it
    assert (multi.loss.numpy() <= plain.loss.numpy() * (1 + 1e-12)).all()
    scipy = pytest.importorskip("scipy.optimize")
    for i in np.flatnonzero(near)[:10]:  # and it is the least-squares answer there
        ref = scipy.least_squares(lambda p, i=i: p[0] * np.sin(p[1] * x) - y[i], truth[i],
                                  method="lm").x
        assert np.allclose(multi.params.numpy()[i], ref, rtol=1e-7)


def test_restarts_are_checked():
    x, y = np.linspace(0, 1, 10), np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="restarts apply to nonlinear models"):
        batchfit.fit(x, y, restarts=2)
    with pytest.raises(ValueError, match="restarts"):
        batchfit.fit(x, y, model=sine, p0=[1.0, 1.0], restarts=-1)


def test_cli_restarts_write_converged_starts(tmp_path):
    data, out = str(tmp_path / "g.parquet"), str(tmp_path / "g.coeffs.parquet")
    assert main(["generate", data, "--model", "gauss", "--series", "40", "--points", "30"]) == 0
    assert main(["run", data, "-o", out, "--model", "gauss", "--dtype", "float64",
                 "--restarts", "3", "--no-progress", "--no-compile"]) == 0
    table = pq.read_table(out)
    assert table.column_names[-1] == "converged_starts"
    starts = table["converged_starts"].to_numpy()
    assert ((starts >= 0) & (starts <= 4)).all()
    assert (starts[table["status"].to_numpy(zero_copy_only=False) == "ok"] >= 1).all()
    assert batchfit.io.read_metadata(out)["restarts"] == 3
