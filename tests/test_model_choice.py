"""Model choice per series by AICc (``model=[...]``, ``--model auto:...``): series from known
models get their own model back, AICc against a numpy computation from scipy's fits of the
same series, the table (columns, nulls, metadata) and predict, the CLI end to end, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import curve_fit, minimize

import batchfit
from batchfit.app.cli import main
from batchfit.fitting.models import FAMILIES

N = 40
X = np.linspace(0, 6, N)


def f_of(name):
    family = FAMILIES[name]
    return lambda x, *p: family.f(torch.as_tensor(x), torch.as_tensor(p)).numpy()


def aicc_oracle(sse, n, k):
    """AICc of least squares, the noise variance counted (k + 1 parameters)."""
    k = k + 1
    return n * np.log(sse / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def mixed(n=3, seed=0, noise=0.05):
    """n series from an exponential decay, then n from a line."""
    rng = np.random.default_rng(seed)
    decays = rng.uniform(1.5, 3, (n, 1)) * np.exp(-rng.uniform(0.8, 1.5, (n, 1)) * X) + 0.5
    lines = rng.uniform(-0.5, 0.5, (n, 1)) * X + rng.uniform(0, 1, (n, 1))
    return np.concatenate([decays, lines]) + noise * rng.normal(size=(2 * n, N))


# (the exponential's LM on a line's series runs for hundreds of steps: capped, as those
# fits are not chosen whether they converge or not)
FAST = dict(dtype="float64", compile=False, epochs=60)


@pytest.fixture(scope="module")
def choice():
    """exp or a line, for three series from each (one point null: skipped)."""
    y = mixed()
    y[0, 5] = np.nan
    return y, batchfit.fit(X, y, model=["exp", "poly1"], **FAST)


def test_aicc_matches_scipy_fits_and_picks_the_lowest(choice):
    y, result = choice
    assert result.candidates == ("exp", "poly1")
    for row in range(len(y)):
        ours = result.aicc[row].numpy()
        used = np.isfinite(y[row])
        x, yy, n = X[used], y[row, used], used.sum()
        sse = np.sum((np.polyval(np.polyfit(x, yy, 1), x) - yy) ** 2)
        np.testing.assert_allclose(ours[1], aicc_oracle(sse, n, 2), rtol=1e-9)
        if result.fits[0].status[row] == 0:
            p, _ = curve_fit(f_of("exp"), x, yy, p0=result.fits[0].params[row].numpy())
            sse = np.sum((f_of("exp")(x, *p) - yy) ** 2)
            np.testing.assert_allclose(ours[0], aicc_oracle(sse, n, 3), rtol=1e-7)
    expected = np.where(np.nan_to_num(result.aicc.numpy(), nan=np.inf).argmin(1) == 0,
                        "exp", "poly1")
    assert (result.model == expected).all()
    assert list(result.model) == ["exp"] * 3 + ["poly1"] * 3
    chosen = result.choice.numpy()
    for name in ("loss", "rmse", "n_points", "iterations"):
        candidates = np.stack([getattr(fit, name).numpy() for fit in result.fits], 1)
        np.testing.assert_array_equal(getattr(result, name).numpy(),
                                      candidates[np.arange(6), chosen])


def test_table_columns_nulls_metadata_and_predict(choice):
    _, result = choice
    table = result.to_arrow(ids=[f"s{i}" for i in range(6)])
    assert table.column_names == [
        "series_id", "model", "exp_a", "exp_b", "exp_c", "exp_a_stderr", "exp_b_stderr",
        "exp_c_stderr", "poly1_p1", "poly1_p0", "poly1_p1_stderr", "poly1_p0_stderr",
        "aicc_exp", "aicc_poly1", "n_points", "loss", "rmse", "r2", "iterations", "status"]
    assert table["model"].to_pylist() == ["exp"] * 3 + ["poly1"] * 3
    assert table["exp_a"].null_count == 3 and table["poly1_p0"].null_count == 3
    assert table["aicc_poly1"].null_count == 0
    meta = json.loads(table.schema.metadata[b"batchfit"])
    assert meta["candidates"] == ["exp", "poly1"] and meta["model"] == "auto"
    assert meta["candidate_columns"]["poly1"] == ["poly1_p1", "poly1_p0"]
    # Each row evaluated with its own model, from the table and from the result.
    at = np.array([0.0, 1.0, 2.5])
    own = [f_of("exp")(at, *result.fits[0].params[i].numpy()) for i in range(3)]
    own += [np.polyval(result.fits[1].params[i].numpy(), at) for i in range(3, 6)]
    np.testing.assert_allclose(batchfit.predict(table, at), np.array(own), rtol=1e-10)
    np.testing.assert_allclose(batchfit.predict(result, at), np.array(own), rtol=1e-10)


def test_cli_end_to_end(tmp_path, choice):
    """The CLI's table of the fixture's series (its NaN point a null)."""
    y, direct = choice
    ids = np.repeat([f"s{i}" for i in range(6)], N)
    pq.write_table(pa.table({"series_id": ids, "x": np.tile(X, 6),
                             "y": pa.array(y.reshape(-1), from_pandas=True)}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert main(["run", str(tmp_path / "in.parquet"), "-o", str(out), "--model",
                 "auto:exp,poly1", "--dtype", "float64", "--no-compile", "--epochs", "60",
                 "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table["series_id"].to_pylist() == [f"s{i}" for i in range(6)]
    assert table["model"].to_pylist() == direct.model.tolist()
    assert table["n_points"].to_pylist() == [N - 1] + [N] * 5
    assert table["n_points"].null_count == 0 and table["aicc_poly1"].null_count == 0
    assert table["exp_b"].is_null().to_pylist() == (direct.model != "exp").tolist()
    np.testing.assert_allclose(np.stack([table["aicc_exp"].to_numpy(zero_copy_only=False),
                                         table["aicc_poly1"].to_numpy()], 1),
                               direct.aicc.numpy(), rtol=1e-9)
    np.testing.assert_allclose(batchfit.predict(str(out), X), batchfit.predict(direct, X),
                               rtol=1e-9)


@pytest.mark.parametrize("model, message", [
    (["exp", "nope"], "unknown candidate 'nope'"),
    ([], "at least one candidate"),
    ("auto:", "at least one candidate"),
    ("auto:exp,exp", "candidates repeat"),
])
def test_bad_candidates(model, message):
    with pytest.raises(ValueError, match=message):
        batchfit.fit(X, mixed(n=1), model=model)


def test_refused_options():
    y = mixed(n=1)
    with pytest.raises(ValueError, match="no likelihood for choosing models by AICc"):
        batchfit.fit(X, y, model=["exp", "poly1"], loss="huber")
    with pytest.raises(ValueError, match="p0 is one model's"):
        batchfit.fit(X, y, model=["exp", "poly1"], p0=[1, 1, 1])
    with pytest.raises(ValueError, match="list the degrees as candidates"):
        batchfit.fit(X, y, model=["exp", "poly"], degree="auto")


def test_one_candidate_is_a_choice_of_one():
    y = mixed(n=1)
    result = batchfit.fit(X, y, model="auto:poly2", dtype="float64")
    np.testing.assert_allclose(result.fits[0].params.numpy(),
                               [np.polyfit(X, row, 2) for row in y], atol=1e-9)
    assert list(result.model) == ["poly2", "poly2"]


def test_cli_errors(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": np.zeros(N, int), "x": X, "y": X}),
                   tmp_path / "in.parquet")
    for extra in (["--model", "auto:exp,bogus"], ["--model", "auto:exp", "--loss", "cauchy"]):
        capsys.readouterr()
        assert main(["run", str(tmp_path / "in.parquet"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("batchfit: error: ") and err.count("\n") == 1
    assert not (tmp_path / "in.coeffs.parquet").exists()


def test_too_few_points_cannot_be_chosen():
    """n <= k' + 1: AICc undefined (+inf); the line (k' = 3) is chosen with 5 points, and
    with 4 points no candidate has an AICc: too_few_points."""
    x = np.arange(5.0)
    y = np.array([[0.1, 1.0, 2.1, 2.9, 4.2]])
    result = batchfit.fit(x, y, model=["poly1", "poly2"], dtype="float64")
    assert np.isinf(result.aicc[0, 1].item()) and list(result.model) == ["poly1"]
    few = batchfit.fit(x[:4], y[:, :4], model=["poly1", "poly2"], dtype="float64")
    assert np.isinf(few.aicc.numpy()).all() and few.status_labels().tolist() == ["too_few_points"]


def test_poisson_uses_the_deviance():
    rng = np.random.default_rng(5)
    x = np.linspace(0, 4, 30)
    counts = rng.poisson(20 * np.exp(-0.7 * x) + 3, (3, 30)).astype(float)
    result = batchfit.fit(x, counts, model=["exp"], loss="poisson", dtype="float64",
                          compile=False)
    f = f_of("exp")
    for row in range(3):
        def deviance(p, y=counts[row]):
            mu = f(x, *p)
            return np.inf if (mu <= 0).any() else 2 * np.sum(
                np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0) - (y - mu))
        best = minimize(deviance, result.fits[0].params[row].numpy(), method="Nelder-Mead",
                        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
        k = 3
        np.testing.assert_allclose(result.aicc[row, 0].item(),
                                   best.fun + 2 * k + 2 * k * (k + 1) / (30 - k - 1),
                                   rtol=1e-6)


def families(n, rng):
    """n series of each of exp, gauss, logistic and a line, on X."""
    def u(low, high):
        return rng.uniform(low, high, (n, 1))
    return {
        "exp": u(1.5, 3) * np.exp(-u(0.8, 1.5) * X) + u(0, 1),
        "gauss": u(1, 2) * np.exp(-(X - u(2, 4)) ** 2 / (2 * u(0.4, 0.8) ** 2)) + u(0, 0.5),
        "logistic": u(1, 2) / (1 + np.exp(-u(2, 4) * (X - u(2, 4)))) + u(0, 0.5),
        "poly1": u(-0.5, 0.5) * X + u(0, 1),
    }


@pytest.mark.slow
def test_series_get_their_true_model():
    rng = np.random.default_rng(0)
    truth = families(20, rng)
    names = list(truth)
    y = np.concatenate(list(truth.values())) + 0.05 * rng.normal(size=(80, N))
    result = batchfit.fit(X, y, model=names, dtype="float64", compile=False)
    for at, name in enumerate(names):
        assert (result.model[20 * at:20 * (at + 1)] == name).mean() >= 0.8, name
    assert (result.model == np.repeat(names, 20)).mean() >= 0.9


@pytest.mark.slow
def test_exp_against_biexp():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 10, 80)

    def u(low, high):
        return rng.uniform(low, high, (20, 1))
    single = u(2, 4) * np.exp(-x / u(1, 3)) + u(0, 0.5)
    double = u(2, 4) * np.exp(-x / u(0.2, 0.5)) + u(1, 3) * np.exp(-x / u(2.5, 5)) + u(0, 0.5)
    y = np.concatenate([single, double]) + 0.02 * rng.normal(size=(40, 80))
    result = batchfit.fit(x, y, model=["exp", "biexp"], dtype="float64", compile=False)
    assert (result.model[:20] == "exp").mean() >= 0.85
    assert (result.model[20:] == "biexp").mean() >= 0.95
