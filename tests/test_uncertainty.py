"""Likelihoods and uncertainty: the Poisson deviance for counts, full parameter covariances,
and confidence bands by the delta method, against scipy and numpy on the same data."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import optimize, stats

import batchfit
from batchfit.app.cli import main

X = np.linspace(0.0, 5.0, 30)


def _exp(p, x):
    return p[0] * np.exp(-p[1] * x) + p[2]


def _gauss(p, x):
    return p[0] * np.exp(-((x - p[1]) ** 2) / (2 * p[2] ** 2)) + p[3]


def _exp_jac(p, x):
    e = np.exp(-p[1] * x)
    return np.stack([e, -p[0] * x * e, np.ones_like(x)], 1)


def _gauss_jac(p, x):
    e = np.exp(-((x - p[1]) ** 2) / (2 * p[2] ** 2))
    return np.stack([e, p[0] * e * (x - p[1]) / p[2] ** 2,
                     p[0] * e * (x - p[1]) ** 2 / p[2] ** 3, np.ones_like(x)], 1)


def _nll(p, f, y):
    mu = f(p, X)
    return np.inf if np.any(mu <= 0) else float(np.sum(mu - y * np.log(mu)))


def _hessian(fun, p, step=1e-4):
    """Central finite differences of ``fun`` at ``p`` (relative steps)."""
    k = len(p)
    h = step * np.maximum(np.abs(p), 1e-2)
    out = np.zeros((k, k))
    def at(i, j, di, dj):
        q = np.array(p, dtype=float)
        q[i] += di * h[i]
        q[j] += dj * h[j]
        return fun(q)

    for i in range(k):
        for j in range(k):
            out[i, j] = (at(i, j, 1, 1) - at(i, j, 1, -1) - at(i, j, -1, 1)
                         + at(i, j, -1, -1)) / (4 * h[i] * h[j])
    return out


def _counts(f, truth, batch, seed):
    rng = np.random.default_rng(seed)
    return rng.poisson(f(truth, X), (batch, len(X))).astype(np.float64)


@pytest.mark.parametrize("model,f,jacobian,truth,start", [
    ("exp", _exp, _exp_jac, (20.0, 0.6, 2.0), (15.0, 0.5, 1.0)),
    ("gauss", _gauss, _gauss_jac, (30.0, 2.5, 0.8, 3.0), (25.0, 2.4, 1.0, 2.0)),
])
def test_poisson_matches_scipy_maximum_likelihood(model, f, jacobian, truth, start):
    y = _counts(f, truth, 3, seed=1)
    fit = batchfit.fit(X, y, model=model, loss="poisson", dtype="float64", covariance=True,
                       compile=False)
    assert fit.status_labels().tolist() == ["ok"] * 3
    for i in range(3):
        res = optimize.minimize(_nll, start, args=(f, y[i]), method="Nelder-Mead",
                                options=dict(xatol=1e-10, fatol=1e-12, maxiter=40000,
                                             maxfev=80000))
        p = fit.params[i].numpy()
        np.testing.assert_allclose(p, res.x, rtol=1e-5, atol=1e-6)
        assert _nll(p, f, y[i]) <= res.fun + 1e-9
        mu = f(p, X)
        deviance = 2 * (np.where(y[i] > 0, y[i] * np.log(np.where(y[i] > 0, y[i], 1) / mu), 0)
                        - (y[i] - mu))
        np.testing.assert_allclose(float(fit.loss[i]), deviance.mean(), rtol=1e-10)
        np.testing.assert_allclose(float(fit.rmse[i]), np.sqrt(np.mean((y[i] - mu) ** 2)),
                                   rtol=1e-10)
        # stderr: the inverse Fisher information, and near the inverse observed Hessian
        jac = jacobian(p, X)
        fisher = np.linalg.inv(jac.T @ (jac / mu[:, None]))
        np.testing.assert_allclose(fit.covariance[i].numpy(), fisher, rtol=1e-8)
        observed = np.linalg.inv(_hessian(lambda q, yi=y[i]: _nll(q, f, yi), p))
        np.testing.assert_allclose(fit.stderr[i].numpy(), np.sqrt(np.diag(observed)),
                                   rtol=0.15)


def test_poisson_start_outside_the_domain_has_no_nan():
    y = _counts(_exp, (20.0, 0.6, 2.0), 2, seed=2)
    fit = batchfit.fit(X, y, model="exp", loss="poisson", p0=[20.0, 0.6, -5.0],
                       dtype="float64", compile=False)
    assert fit.status_labels().tolist() == ["diverged"] * 2
    assert not np.isnan(fit.loss.numpy()).any()


def test_poisson_bad_input():
    y = _counts(_exp, (20.0, 0.6, 2.0), 2, seed=3)
    y[1, 4] = -1
    with pytest.raises(ValueError, match="^loss poisson needs counts y >= 0$"):
        batchfit.fit(X, y, model="exp", loss="poisson")
    with pytest.raises(ValueError, match="loss poisson fits nonlinear models"):
        batchfit.fit(X, np.abs(y), loss="poisson")


def test_cli_poisson_negative_counts_exit_2(tmp_path, capsys):
    y = _counts(_exp, (20.0, 0.6, 2.0), 2, seed=3).reshape(-1)
    y[5] = -2
    pq.write_table(pa.table({"series_id": np.repeat([0, 1], len(X)), "x": np.tile(X, 2),
                             "y": y}), tmp_path / "in.parquet")
    code = main(["run", str(tmp_path / "in.parquet"), "--model", "exp", "--loss", "poisson",
                 "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "batchfit: error: loss poisson needs counts y >= 0"
    assert not (tmp_path / "in.coeffs.parquet").exists()


def _quadratics(batch=4, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 4.0, 40) + offset
    y = 1 + 2 * (x - offset) - 0.5 * (x - offset) ** 2 + rng.normal(0, 0.1, (batch, len(x)))
    return x, y, rng.uniform(0.5, 2.0, y.shape)


@pytest.mark.parametrize("solver", ["exact", "newton"])
def test_polynomial_covariance_matches_polyfit(solver):
    x, y, w = _quadratics(offset=10.0)
    fit = batchfit.fit(x, y, weights=w, degree=2, solver=solver, dtype="float64",
                       covariance=True, compile=False)
    assert fit.covariance.shape == (4, 3, 3) and str(fit.covariance.dtype) == "torch.float64"
    for i in range(4):
        # numpy's w multiplies the residual: the square root of a WLS weight
        _, cov = np.polyfit(x, y[i], 2, w=np.sqrt(w[i]), cov=True)
        design = x[:, None] ** np.arange(2, -1, -1)
        s2 = np.sum(w[i] * (y[i] - design @ fit.params[i].numpy()) ** 2) / (len(x) - 3)
        wls = s2 * np.linalg.inv(design.T @ (w[i][:, None] * design))
        np.testing.assert_allclose(fit.covariance[i].numpy(), cov, rtol=1e-8)
        np.testing.assert_allclose(fit.covariance[i].numpy(), wls, rtol=1e-8)
    np.testing.assert_array_equal(np.diagonal(fit.covariance.numpy(), axis1=1, axis2=2),
                                  fit.stderr.numpy() ** 2)


def test_auto_degree_and_robust_covariance():
    x, y, _ = _quadratics(batch=3)
    fit = batchfit.fit(x, y, degree="auto:3", covariance=True)
    for i in range(3):
        d = int(fit.degrees[i])
        _, cov = np.polyfit(x, y[i], d, cov=True)
        np.testing.assert_allclose(fit.covariance[i, 3 - d:, 3 - d:].numpy(), cov, rtol=1e-8)
        assert np.isnan(fit.covariance[i, : 3 - d].numpy()).all()
    huber = batchfit.fit(x, y, degree=2, loss="huber", covariance=True, compile=False)
    cov = huber.covariance.numpy()
    np.testing.assert_array_equal(np.diagonal(cov, axis1=1, axis2=2), huber.stderr.numpy() ** 2)
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), rtol=1e-10)
    assert batchfit.fit(x, y).covariance is None


def test_family_covariance_matches_curve_fit():
    rng = np.random.default_rng(4)
    x = np.linspace(0, 4, 40)
    y = 3 * np.exp(-0.7 * x) + 0.5 + rng.normal(0, 0.05, (3, 40))
    fit = batchfit.fit(x, y, model="exp", dtype="float64", covariance=True, compile=False)
    for i in range(3):
        p, pcov = optimize.curve_fit(lambda x, a, b, c: _exp((a, b, c), x), x, y[i],
                                     p0=[3, 0.7, 0.5], xtol=1e-14, ftol=1e-14)
        np.testing.assert_allclose(fit.params[i].numpy(), p, rtol=1e-6)
        np.testing.assert_allclose(fit.covariance[i].numpy(), pcov, rtol=1e-4)


def test_cli_covariance_columns(tmp_path):
    x, y, _ = _quadratics(batch=3)
    pq.write_table(pa.table({"series_id": np.repeat(np.arange(3), len(x)),
                             "x": np.tile(x, 3), "y": y.reshape(-1)}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert main(["run", str(tmp_path / "in.parquet"), "-o", str(out), "--covariance",
                 "--no-progress"]) == 0
    table = pq.read_table(out)
    names = ["cov_a_a", "cov_a_b", "cov_a_c", "cov_b_b", "cov_b_c", "cov_c_c"]
    assert [n for n in table.column_names if n.startswith("cov_")] == names
    fit = batchfit.fit(x, y, covariance=True)
    for name, (i, j) in zip(names, [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]):
        np.testing.assert_allclose(table[name].to_numpy(), fit.covariance[:, i, j].numpy(),
                                   rtol=1e-9)
    assert fit.to_arrow().column_names == table.column_names


def test_interval_matches_a_band_by_hand():
    x, y, _ = _quadratics(batch=2)
    fit = batchfit.fit(x, y, degree=2, covariance=True)
    at = np.linspace(-1.0, 5.0, 7)
    band = batchfit.predict(fit, at, interval=0.9)
    np.testing.assert_array_equal(band.value, batchfit.predict(fit, at))
    design = at[:, None] ** np.arange(2, -1, -1)
    for i in range(2):
        _, cov = np.polyfit(x, y[i], 2, cov=True)
        half = stats.t.ppf(0.95, len(x) - 3) * np.sqrt(np.einsum("ni,ij,nj->n", design, cov,
                                                                 design))
        np.testing.assert_allclose(band.upper[i] - band.value[i], half, rtol=1e-8)
        np.testing.assert_allclose(band.value[i] - band.lower[i], half, rtol=1e-8)
    from_table = batchfit.predict(fit.to_arrow(), at, interval=0.9)
    np.testing.assert_allclose(from_table.lower, band.lower, rtol=1e-12)

    rng = np.random.default_rng(5)
    y = 3 * np.exp(-0.7 * x) + 0.5 + rng.normal(0, 0.05, (2, len(x)))
    fit = batchfit.fit(x, y, model="exp", dtype="float64", covariance=True, compile=False)
    band = batchfit.predict(fit.to_arrow(), at, interval=0.95)
    for i in range(2):
        p, pcov = optimize.curve_fit(lambda x, a, b, c: _exp((a, b, c), x), x, y[i],
                                     p0=[3, 0.7, 0.5], xtol=1e-14, ftol=1e-14)
        g = np.stack([np.exp(-p[1] * at), -p[0] * at * np.exp(-p[1] * at), np.ones_like(at)], 1)
        half = stats.t.ppf(0.975, len(x) - 3) * np.sqrt(np.einsum("ni,ij,nj->n", g, pcov, g))
        np.testing.assert_allclose(band.upper[i] - band.value[i], half, rtol=1e-4)


def test_a_formula_table_gives_the_formula_band(tmp_path):
    """A table written from a formula (by ``to_arrow`` or by ``batchfit run``) is evaluated
    from its formula, not read as the quadratic its a, b, c columns would also name."""
    rng = np.random.default_rng(5)
    x = np.linspace(0, 4, 15)
    y = 3 * np.exp(-0.7 * x) + 0.5 + rng.normal(0, 0.05, (2, len(x)))
    formula = "a*exp(-b*x) + c"
    fit = batchfit.fit(x, y, model=formula, dtype="float64", covariance=True, compile=False)
    data = tmp_path / "decays.parquet"
    pq.write_table(pa.table({"series_id": np.repeat([0, 1], len(x)), "x": np.tile(x, 2),
                             "y": y.ravel()}), data)
    out = tmp_path / "decays.coeffs.parquet"
    assert main(["run", str(data), "--model", formula, "--covariance", "--dtype", "float64",
                 "--output", str(out)]) == 0
    at = np.linspace(-1.0, 5.0, 7)
    for table in (fit.to_arrow(), str(out)):
        band = batchfit.predict(table, at, interval=0.95)
        for i in range(2):
            p, pcov = optimize.curve_fit(lambda x, a, b, c: _exp((a, b, c), x), x, y[i],
                                         p0=[3, 0.7, 0.5], xtol=1e-14, ftol=1e-14)
            np.testing.assert_allclose(band.value[i], _exp(p, at), rtol=1e-6)
            g = _exp_jac(p, at)
            half = stats.t.ppf(0.975, len(x) - 3) * np.sqrt(np.einsum("ni,ij,nj->n", g, pcov, g))
            np.testing.assert_allclose(band.upper[i] - band.value[i], half, rtol=1e-4)
    table = fit.to_arrow()
    meta = dict(table.schema.metadata)
    meta[b"batchfit"] = meta[b"batchfit"].replace(b'"formula": ', b'"was": ')
    with pytest.raises(ValueError, match="formula model but its metadata lacks the formula"):
        batchfit.predict(table.replace_schema_metadata(meta), at)


def test_interval_needs_covariance():
    x, y, _ = _quadratics(batch=2)
    with pytest.raises(ValueError, match="fit with covariance=True"):
        batchfit.predict(batchfit.fit(x, y), x, interval=0.95)
    with pytest.raises(ValueError, match="fit with covariance=True"):
        batchfit.predict(batchfit.fit(x, y).to_arrow(), x, interval=0.95)
    with pytest.raises(ValueError, match="^interval must be"):
        batchfit.predict(batchfit.fit(x, y, covariance=True), x, interval=95)


def test_covariance_from_the_torch_twin_and_ragged_series(monkeypatch):
    from batchfit.moments import native

    x, y, _ = _quadratics(batch=2)
    monkeypatch.setattr(native, "library", lambda: None)  # (the CUDA path's solve, on the CPU)
    fit = batchfit.fit(x, y, covariance=True)
    for i in range(2):
        np.testing.assert_allclose(fit.covariance[i].numpy(), np.polyfit(x, y[i], 2, cov=True)[1],
                                   rtol=1e-8)
    monkeypatch.undo()
    decay = _exp((3.0, 0.7, 0.5), x) + np.random.default_rng(6).normal(0, 0.05, len(x))
    ragged = batchfit.fit_ragged(np.concatenate([x, x[:2]]), np.concatenate([decay, decay[:2]]),
                                 [0, len(x), len(x) + 2, len(x) + 2], model="exp",
                                 covariance=True, compile=False)
    assert ragged.covariance.shape == (3, 3, 3)
    assert np.isfinite(ragged.covariance[0].numpy()).all()
    assert np.isnan(ragged.covariance[1:].numpy()).all()
