"""User models from the command line: formulas (a whitelisted grammar, never evaluated as
Python) and ``package.module:function``, against scipy on the same data."""

import importlib
import json
import re
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.optimize import curve_fit, least_squares

import batchfit
from batchfit.app.cli import main
from batchfit.core.formula import parse_formula

DECAY = "a*exp(-x/tau) + c"


def decays(series=40, points=30, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 5, points)
    truth = np.stack([rng.uniform(2, 4, series), rng.uniform(0.5, 2, series),
                      rng.uniform(-1, 1, series)], 1)
    y = truth[:, :1] * np.exp(-x / truth[:, 1:2]) + truth[:, 2:] + rng.normal(0, 0.02,
                                                                              (series, points))
    return x, y, truth


def write_long(path, x, y):
    series, points = y.shape
    pq.write_table(pa.table({"series_id": np.repeat(np.arange(series), points),
                             "x": np.tile(x, series), "y": y.ravel()}), path)


def test_a_formula_fit_matches_curve_fit_and_recovers_the_truth():
    x, y, truth = decays()
    fit = batchfit.fit(x, y, model=DECAY, p0=[1.0, 1.0, 0.0], dtype="float64")
    assert fit.param_names == ("a", "tau", "c")
    assert (fit.status_labels() == "ok").all()
    for i in range(0, len(y), 8):
        expected, cov = curve_fit(lambda t, a, tau, c: a * np.exp(-t / tau) + c, x, y[i],
                                  p0=[1.0, 1.0, 0.0])
        np.testing.assert_allclose(fit.params[i].numpy(), expected, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(fit.stderr[i].numpy(), np.sqrt(np.diag(cov)), rtol=1e-4)
    z = np.abs(fit.params.numpy() - truth) / fit.stderr.numpy()
    assert (z < 5).mean() > 0.95


def test_params_order_the_columns_and_bounds_hold():
    x, y, _ = decays(series=6)
    fit = batchfit.fit(x, y, model=DECAY, param_names=["c", "a", "tau"],
                       p0=[0.0, 1.0, 1.0], bounds=([-np.inf, 0, 0.1], [np.inf, 3.0, 10]),
                       dtype="float64")
    assert fit.param_names == ("c", "a", "tau")
    assert (fit.params[:, 1] <= 3.0 + 1e-12).all()
    free = batchfit.fit(x, y, model=DECAY, p0=[1.0, 1.0, 0.0], dtype="float64")
    below = free.params[:, 0].numpy() < 3.0  # where the bound does not bind: the same fit
    np.testing.assert_allclose(fit.params.numpy()[below][:, [1, 2, 0]],
                               free.params.numpy()[below], rtol=1e-6)


def test_a_formula_of_two_x_columns_matches_scipy():
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(np.arange(7.0), np.arange(7.0)), -1).reshape(-1, 2)
    truth = np.array([[100, 3.2, 2.8, 1.3, 10], [80, 2.7, 3.5, 1.1, 5]])
    spot = truth[:, :1] * np.exp(-((grid[None, :, 0] - truth[:, 1:2]) ** 2 + (
        grid[None, :, 1] - truth[:, 2:3]) ** 2) / (2 * truth[:, 3:4] ** 2)) + truth[:, 4:]
    y = spot + rng.normal(0, 1, spot.shape)
    formula = "amp*exp(-((x0 - cx)**2 + (x1 - cy)**2) / (2*s**2)) + b"
    fit = batchfit.fit(grid, y, model=formula, p0=[90, 3, 3, 1.2, 8], dtype="float64")
    assert fit.param_names == ("amp", "cx", "cy", "s", "b")
    for i in range(2):
        def residual(p, i=i):
            return p[0] * np.exp(-((grid[:, 0] - p[1]) ** 2 + (grid[:, 1] - p[2]) ** 2) / (
                2 * p[3] ** 2)) + p[4] - y[i]
        expected = least_squares(residual, [90, 3, 3, 1.2, 8], method="lm", xtol=1e-14,
                                 ftol=1e-14).x
        np.testing.assert_allclose(fit.params[i].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="2 columns"):
        batchfit.fit(grid[:, 0], y, model=formula, p0=[90, 3, 3, 1.2, 8])


def test_the_cli_fits_a_formula_and_predict_and_plot_read_it_back(tmp_path):
    x, y, _ = decays(series=12)
    data, out = str(tmp_path / "d.parquet"), str(tmp_path / "o.parquet")
    write_long(data, x, y)
    assert main(["run", data, "-o", out, "--model", DECAY, "--p0", "1,1,0", "--dtype",
                 "float64", "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table.column_names[:7] == ["series_id", "a", "tau", "c", "a_stderr",
                                      "tau_stderr", "c_stderr"]
    meta = batchfit.io.read_metadata(out)
    assert meta["model"] == "formula" and meta["formula"] == DECAY
    assert meta["param_columns"] == ["a", "tau", "c"]
    python = batchfit.fit(x, y, model=DECAY, p0=[1.0, 1.0, 0.0], dtype="float64")
    np.testing.assert_allclose(table["tau"].to_numpy(), python.params[:, 1].numpy(),
                               rtol=1e-9)
    at = np.array([0.0, 0.7, 3.0])
    a, tau, c = (table[name].to_numpy()[:, None] for name in ("a", "tau", "c"))
    np.testing.assert_allclose(batchfit.predict(out, at), a * np.exp(-at / tau) + c,
                               rtol=1e-12)
    assert main(["plot", data, out, "-o", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "fits.png").stat().st_size > 10_000


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "labmodels.py").write_text(textwrap.dedent("""
        import torch

        def decay(x, p):
            return p[0] * torch.exp(-x / p[1]) + p[2]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "labmodels"
    importlib.sys.modules.pop("labmodels", None)


def test_a_module_function_from_the_cli_gives_the_formula_fit(tmp_path, user_module,
                                                               monkeypatch):
    x, y, _ = decays(series=8)
    data = str(tmp_path / "d.parquet")
    write_long(data, x, y)
    outs = {name: str(tmp_path / f"{name}.parquet") for name in ("module", "formula")}
    assert main(["run", data, "-o", outs["module"], "--model", f"{user_module}:decay",
                 "--p0", "1,1,0", "--params", "a,tau,c", "--dtype", "float64",
                 "--no-progress"]) == 0
    assert main(["run", data, "-o", outs["formula"], "--model", DECAY, "--p0", "1,1,0",
                 "--dtype", "float64", "--no-progress"]) == 0
    module, formula = (pq.read_table(path) for path in outs.values())
    for name in ("a", "tau", "c", "tau_stderr"):
        np.testing.assert_allclose(module[name].to_numpy(), formula[name].to_numpy(),
                                   rtol=1e-9)
    meta = batchfit.io.read_metadata(outs["module"])
    assert meta["model"] == f"{user_module}:decay"
    # The table names the module, but predict never imports what a file names.
    monkeypatch.setattr(importlib, "import_module", lambda *a: pytest.fail("imported"))
    with pytest.raises(ValueError, match="not stored in its table"):
        batchfit.predict(outs["module"], x)


def test_a_hostile_formula_in_a_table_is_refused_not_run(tmp_path):
    x, y, _ = decays(series=3)
    out = str(tmp_path / "o.parquet")
    data = str(tmp_path / "d.parquet")
    write_long(data, x, y)
    assert main(["run", data, "-o", out, "--model", DECAY, "--p0", "1,1,0",
                 "--no-progress"]) == 0
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"batchfit"])
    meta["formula"] = "__import__('os').system('touch pwned') + a*x + tau + c"
    pq.write_table(table.replace_schema_metadata({"batchfit": json.dumps(meta)}), out)
    with pytest.raises(ValueError, match="only named functions"):
        batchfit.predict(out, x)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("formula, message", [
    ("a*foo(x) + c", "unknown function 'foo'"),
    ("__import__('os').system('x') + a*x", "only named functions"),
    ("__import__ + a*x", "'__import__' is not allowed"),
    ("import os", "not an expression"),
    ("a*x.real + c", "attribute access"),
    ("a*x**b; c", "not an expression"),
    ("a^x", "use \\*\\* for powers"),
    ("gaus", "unknown model 'gaus'"),
    ("a + b", "does not use x"),
    ("(lambda: 1)() + a*x", "only named functions"),
    ("[a for a in x] + a*x", "not allowed"),
    ("a*x + 'text'", "not allowed"),
    ("exp + a*x", "exp is a function"),
])
def test_a_bad_formula_gets_one_line(tmp_path, capsys, formula, message):
    data = str(tmp_path / "d.parquet")
    write_long(data, *decays(series=2)[:2])
    assert main(["run", data, "--model", formula, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuchpackage.models:decay"], "cannot import 'nosuchpackage.models'"),
    (["--model", "labmodels:missing", "--p0", "1,1,0"], "has no function 'missing'"),
    (["--model", DECAY, "--params", "a,tau"], "do not match"),
    (["--model", DECAY, "--p0", "1,1"], "p0"),
    (["--model", DECAY, "--bounds", "0,0,0"], "LOWER:UPPER"),
    (["--model", DECAY, "--p0", "1,one,0"], "numbers"),
    (["--model", DECAY, "--bounds", "0,0:1,1"], "bounds"),
])
def test_bad_model_options_get_one_line(tmp_path, capsys, user_module, args, message):
    data = str(tmp_path / "d.parquet")
    write_long(data, *decays(series=2)[:2])
    assert main(["run", data, "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1
    assert message in err, err


def test_the_parser_keeps_x0_a_parameter_beside_x():
    logistic = parse_formula("L/(1 + exp(-k*(x - x0))) + c")
    assert logistic.param_names == ("L", "k", "x0", "c") and logistic.x_columns == 1
    assert parse_formula("a*x0 + b*x1").x_columns == 2
    assert parse_formula("a*x + b", params=["b", "a"]).param_names == ("b", "a")
