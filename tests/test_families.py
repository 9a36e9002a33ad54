"""The fields' families (hill4, biexp, lorentz, pvoigt): known truths recovered from the
families' own starts, scipy's fits of the same series, biexp's component order, hill4's
IC50 interval against one from curve_fit's covariance, and the CLI end to end."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import curve_fit, least_squares
from scipy.stats import t as student

import batchfit
from batchfit import io
from batchfit.app.cli import main
from batchfit.fitting.models import FAMILIES
from batchfit.fitting.quantiles import t_quantile

B, N = 200, 40
# Per family: shared x, and each true parameter's uniform range across series.
CASES = {
    "hill4": (10 ** np.linspace(-3, 2, N), ((0, 1), (4, 6), (-1.5, 0.5), (0.7, 2.0))),
    "biexp": (np.linspace(0, 10, N), ((2, 4), (0.3, 0.8), (1, 3), (2.5, 5), (-0.5, 0.5))),
    "lorentz": (np.linspace(-5, 5, N), ((2, 6), (-2, 2), (0.3, 1.0), (-1, 1))),
    "pvoigt": (np.linspace(-5, 5, N), ((2, 6), (-2, 2), (0.8, 2.0), (0.2, 0.8), (-1, 1))),
}
NOISE = 0.02


def f_of(name):
    family = FAMILIES[name]
    return lambda x, p: family.f(torch.as_tensor(x), torch.as_tensor(p)).numpy()


def data(name, n=B, seed=0):
    x, ranges = CASES[name]
    rng = np.random.default_rng(seed)
    low, high = np.array(ranges, dtype=float).T
    truth = rng.uniform(low, high, (n, len(ranges)))
    y = f_of(name)(x[None], truth.T[:, :, None]) + NOISE * rng.normal(size=(n, N))
    return x, y, truth


def scipy_fit(name, x, y, start):
    family = FAMILIES[name]
    f = f_of(name)
    bounds = (family.lower or -np.inf, family.upper or np.inf)
    return least_squares(lambda p: f(x, p) - y, start, bounds=bounds, xtol=1e-15, ftol=1e-15,
                         gtol=1e-15, method="trf" if family.bounded else "lm",
                         max_nfev=10000).x


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_recovers_the_truth_from_its_own_start_and_matches_scipy(name):
    x, y, truth = data(name)
    fit = batchfit.fit(x, y, model=name, dtype="float64", compile=False)
    assert (fit.status_labels() == "ok").all(), fit.status_counts()
    params, stderr = fit.params.numpy(), fit.stderr.numpy()
    z = np.abs(params - truth) / stderr
    assert (z < 4).mean() > 0.99, (z > 4).sum(0)
    assert np.median(z) < 1.0
    for i in range(5):  # scipy from the truth lands where batchfit went from its own start
        want = scipy_fit(name, x, y[i], truth[i])
        assert np.allclose(params[i], want, rtol=1e-6, atol=1e-9), (i, params[i], want)


def test_biexp_orders_its_components_in_every_series():
    """Truths given with their components in either order, starts too: every fit has
    tau1 < tau2, so a1/tau1 is the fast component in every series."""
    x, y, truth = data("biexp", n=100, seed=3)
    swap = np.random.default_rng(4).random(100) < 0.5  # the slow component labelled first
    mixed = np.where(swap[:, None], truth[:, [2, 3, 0, 1, 4]], truth)
    ordered = batchfit.fit(x, y, model="biexp", dtype="float64", compile=False)
    from_mixed = batchfit.fit(x, y, model="biexp", p0=mixed, dtype="float64", compile=False)
    for fit in (ordered, from_mixed):
        p = fit.params.numpy()
        assert (fit.status_labels() == "ok").all()
        assert (p[:, 1] < p[:, 3]).all()
        assert np.allclose(p, ordered.params.numpy(), rtol=1e-7, atol=1e-9)
    z = np.abs(ordered.params.numpy() - truth) / ordered.stderr.numpy()
    assert (z < 5).all()  # (the truths' own order: tau2/tau1 >= 3)


def test_hill4_inhibition_curve_and_its_ic50_interval_match_curve_fit():
    """A falling curve (inhibition): bottom <= top with a negative slope (GraphPad's form),
    and IC50 = 10**log_ec50 with the 95 % interval from curve_fit's covariance and
    Student's t on n - 4 degrees of freedom."""
    doses = 10 ** np.linspace(-3, 1, 10)
    rng = np.random.default_rng(5)
    truth = np.column_stack([rng.uniform(0, 10, 8), rng.uniform(90, 110, 8),
                             rng.uniform(-2, 0, 8), -rng.uniform(0.8, 1.5, 8)])
    y = f_of("hill4")(doses[None], truth.T[:, :, None]) + 2.0 * rng.normal(size=(8, 10))
    fit = batchfit.fit(doses, y, model="hill4", dtype="float64", compile=False)
    assert (fit.status_labels() == "ok").all()
    p = fit.params.numpy()
    assert (p[:, 0] < p[:, 1]).all() and (p[:, 3] < 0).all()
    derived = fit.derived
    table = fit.to_arrow()
    q = student.ppf(0.975, 10 - 4)

    def hill(x, bottom, top, log_ec50, slope):
        return bottom + (top - bottom) / (1 + 10 ** ((log_ec50 - np.log10(x)) * slope))

    for i in range(8):
        popt, pcov = curve_fit(hill, doses, y[i], p0=truth[i], xtol=1e-14, ftol=1e-14,
                               gtol=1e-14, maxfev=10000)
        se = np.sqrt(pcov[2, 2])
        want = 10 ** np.array([popt[2], popt[2] - q * se, popt[2] + q * se])
        got = [derived[name][i] for name in ("ic50", "ic50_low", "ic50_high")]
        assert np.allclose(got, want, rtol=1e-6), (i, got, want)
        assert np.allclose([table[name][i].as_py() for name in ("ic50", "ic50_low",
                                                                "ic50_high")], got)
        assert np.allclose(fit.stderr[i].numpy(), np.sqrt(np.diag(pcov)), rtol=1e-5)


def test_hill4_skips_non_positive_doses_and_blanks_what_it_cannot_fit():
    doses = np.concatenate([[0.0, -1.0], 10 ** np.linspace(-2, 2, 8)])
    y = f_of("hill4")(np.where(doses > 0, doses, 1), np.array([0.0, 1.0, 0.0, 1.0]))
    y = np.stack([y + 0.01 * np.sin(np.arange(10)), y[:10]])
    lengths = np.array([10, 5])  # the second: 3 usable doses for 4 parameters
    fit = batchfit.fit(doses, y, lengths=lengths, model="hill4", dtype="float64",
                       compile=False)
    assert fit.n_points.tolist() == [8, 3]
    assert fit.status_labels().tolist() == ["ok", "too_few_points"]
    assert np.isnan(fit.derived["ic50"][1]) and np.isfinite(fit.derived["ic50_low"][0])
    assert table_nulls(fit.to_arrow(), "ic50_high") == [False, True]


def table_nulls(table, name):
    return table[name].is_null().to_pylist()


def test_t_quantile_matches_scipy():
    df = np.array([0, 1, 2, 3, 6, 30, 199, 200, 201, 10_000])
    got = t_quantile(0.975, df)
    assert np.isnan(got[0])
    assert np.allclose(got[1:], student.ppf(0.975, df[1:]), rtol=1e-11)


def test_cli_runs_a_dose_response_plate_end_to_end(tmp_path, capsys):
    data_path, out = str(tmp_path / "plate.parquet"), str(tmp_path / "plate.coeffs.parquet")
    assert main(["generate", data_path, "--model", "hill4", "--series", "96", "--points",
                 "12"]) == 0
    assert main(["run", data_path, "-o", out, "--model", "hill4", "--dtype", "float64",
                 "--no-progress", "--no-compile"]) == 0
    table = pq.read_table(out)
    assert table.column_names[:12] == [
        "series_id", "bottom", "top", "log_ec50", "slope", "bottom_stderr", "top_stderr",
        "log_ec50_stderr", "slope_stderr", "ic50", "ic50_low", "ic50_high"]
    meta = io.read_metadata(out)
    assert meta["model"] == "hill4" and meta["derived_columns"] == ["ic50", "ic50_low",
                                                                    "ic50_high"]
    log_ec50 = table["log_ec50"].to_numpy()
    assert np.allclose(table["ic50"].to_numpy(), 10**log_ec50)
    assert (table["ic50_low"].to_numpy() < table["ic50"].to_numpy()).all()
    truth = pq.read_table(str(tmp_path / "plate.truth.parquet"))
    inside = np.abs(log_ec50 - truth["log_ec50"].to_numpy()) < 4 * table[
        "log_ec50_stderr"].to_numpy()
    assert inside.mean() > 0.97
    doses = np.array([1e-2, 1.0])
    predicted = batchfit.predict(out, doses)
    params = np.column_stack([table[name].to_numpy() for name in FAMILIES["hill4"].param_names])
    assert np.allclose(predicted, f_of("hill4")(doses[None], params.T[:, :, None]))
    capsys.readouterr()
    assert main(["run", data_path, "-o", out, "--model", "hill5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error:") and "hill5" in err and err.count("\n") == 1
