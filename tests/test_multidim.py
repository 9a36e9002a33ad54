"""x with several columns: Python's (..., N, d), the gauss2d family against the truth and
scipy, user models of x[..., j], files with several x columns, predict, and the errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import least_squares

import batchfit
from batchfit.app.cli import main
from batchfit.io import ColumnSpec
from batchfit.pipeline.job import fit_table

NAMES = ("amplitude", "x0", "y0", "sigma", "offset")


def pixels(size=5) -> np.ndarray:
    grid = np.arange(size, dtype=np.float64)
    u, v = np.meshgrid(grid, grid, indexing="xy")
    return np.stack([u.ravel(), v.ravel()], axis=1)


def spot(xy, p):
    u, v = xy[..., 0] - p[:, 1:2], xy[..., 1] - p[:, 2:3]
    return p[:, :1] * np.exp(-(u * u + v * v) / (2 * p[:, 3:4] ** 2)) + p[:, 4:5]


def spots(n, seed=0, size=5, noise=5.0):
    """Gpufit's test spots (truth (500, c, c, 1, 10) scaled by 0.9-1.1), less noisy."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2
    truth = np.array([500.0, c, c, 1.0, 10.0]) * rng.uniform(0.9, 1.1, (n, 5))
    xy = pixels(size)
    return xy, truth, spot(xy, truth) + rng.normal(0, noise, (n, size * size))


def scipy_spot(xy, y, start):
    out = least_squares(lambda p: spot(xy, p[None])[0] - y, start, method="lm",
                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    out.x[3] = abs(out.x[3])
    return out.x


def test_gauss2d_recovers_the_truth_within_its_standard_errors():
    xy, truth, y = spots(300, noise=10.0)
    fit = batchfit.fit(xy, y, model="gauss2d", dtype="float64", compile=False)
    assert fit.param_names == NAMES
    assert (fit.status_labels() == "ok").all()
    z = np.abs(fit.params.numpy() - truth) / fit.stderr.numpy()
    coverage = (z < 2).mean(axis=0)
    assert ((coverage > 0.9) & (coverage < 0.99)).all(), coverage


def test_gauss2d_matches_scipy_from_its_own_start():
    xy, truth, y = spots(6, seed=1, size=7)
    fit = batchfit.fit(xy, y, model="gauss2d", dtype="float64", compile=False)
    for i in range(6):
        want = scipy_spot(xy, y[i], truth[i])
        assert np.allclose(fit.params[i].numpy(), want, rtol=1e-6, atol=1e-8), i


def test_shared_and_per_series_x_agree_and_float32_is_close():
    xy, _, y = spots(12, seed=2)
    shared = batchfit.fit(xy, y, model="gauss2d", dtype="float64", compile=False)
    per_series = batchfit.fit(np.broadcast_to(xy, (12, 25, 2)).copy(), y, model="gauss2d",
                              dtype="float64", compile=False)
    assert torch.equal(shared.params, per_series.params)
    single = batchfit.fit(xy, y[3], model="gauss2d", dtype="float64", compile=False)
    assert torch.allclose(single.params[0], shared.params[3], rtol=1e-9)
    narrow = batchfit.fit(torch.from_numpy(xy).float(), torch.from_numpy(y).float(),
                          model="gauss2d", compile=False)
    assert torch.allclose(narrow.params, shared.params, rtol=1e-3, atol=1e-3)
    # a batch shape (..., N) with x (..., N, 2)
    stack = batchfit.fit(np.broadcast_to(xy, (3, 4, 25, 2)), y.reshape(3, 4, 25),
                         model="gauss2d", dtype="float64", compile=False)
    assert stack.params.shape == (3, 4, 5)
    assert torch.allclose(stack.params.reshape(12, 5), shared.params, rtol=1e-9)


def test_a_user_model_reads_the_columns_of_x():
    xy, _, y = spots(8, seed=3)

    def tilted(x, p):  # a spot on a tilted plane
        return p[0] * torch.exp(-((x[..., 0] - p[1]) ** 2 + (x[..., 1] - p[2]) ** 2)
                                / (2 * p[3] ** 2)) + p[4] + p[5] * x[..., 0]

    y = y + 3.0 * xy[:, 0]
    fit = batchfit.fit(xy, y, model=tilted, p0=[450, 2, 2, 1.2, 8, 0], dtype="float64",
                       compile=False)
    assert (fit.status_labels() == "ok").all()
    for i in range(8):
        want = least_squares(lambda p, i=i: tilted(torch.from_numpy(xy), torch.from_numpy(p))
                             .numpy() - y[i], [450, 2, 2, 1.2, 8, 0], method="lm",
                             xtol=1e-15, ftol=1e-15, gtol=1e-15).x
        want[3] = abs(want[3])
        got = fit.params[i].numpy().copy()
        got[3] = abs(got[3])
        assert np.allclose(got, want, rtol=1e-6, atol=1e-7), i
    # and a start callable p0(x, y) sees x (N, 2)
    seen = []

    def start(x, y):
        seen.append(tuple(x.shape))
        return torch.stack([y.max(), x[:, 0].mean(), x[:, 1].mean(), torch.ones(()),
                            y.min(), torch.zeros(())])

    batchfit.fit(xy, y, model=tilted, p0=start, param_names=list("abcdef"), compile=False)
    assert seen[0] == (25, 2)


def test_predict_takes_x_with_columns():
    xy, _, y = spots(4, seed=4)
    fit = batchfit.fit(xy, y, model="gauss2d", dtype="float64", compile=False)
    want = spot(xy, fit.params.numpy())
    assert np.allclose(batchfit.predict(fit, xy), want, rtol=1e-12)
    assert np.allclose(batchfit.predict(fit, np.broadcast_to(xy, (4, 25, 2))), want, rtol=1e-12)
    assert np.allclose(batchfit.predict(fit.to_arrow(), xy[:3]), want[:, :3], rtol=1e-12)
    with pytest.raises(ValueError, match=r"x must be \(N, 2\)"):
        batchfit.predict(fit, xy[:, 0])


def write_spots(tmp_path, xy, y):
    n = len(y)
    rng = np.random.default_rng(0)
    order = rng.permutation(n * 25)  # rows of a series anywhere, in any order
    long = pa.table({"series_id": np.repeat(np.arange(n), 25)[order],
                     "x0": np.tile(xy[:, 0], n)[order], "x1": np.tile(xy[:, 1], n)[order],
                     "y": y.reshape(-1)[order]})
    lists = pa.table({"series_id": np.arange(n), "x0": list(np.tile(xy[:, 0], (n, 1))),
                      "x1": list(np.tile(xy[:, 1], (n, 1))), "y": list(y)})
    paths = tmp_path / "long.parquet", tmp_path / "list.parquet"
    pq.write_table(long, paths[0])
    pq.write_table(lists, paths[1])
    return paths


def table_params(path):
    table = pq.read_table(path).sort_by("series_id")
    return np.stack([table[name].to_numpy() for name in NAMES], axis=1)


def test_files_with_two_x_columns_fit_as_in_python(tmp_path, capsys):
    xy, _, y = spots(10, seed=5)
    want = batchfit.fit(xy, y, model="gauss2d", dtype="float64", compile=False)
    for path in write_spots(tmp_path, xy, y):
        out = tmp_path / f"{path.stem}.out.parquet"
        assert main(["run", str(path), "-o", str(out), "--model", "gauss2d", "--x-col",
                     "x0,x1", "--dtype", "float64", "--no-compile", "--no-progress"]) == 0
        assert np.allclose(table_params(out), want.params.numpy(), rtol=1e-7, atol=1e-9)
        recorded = json.loads(pq.read_schema(out).metadata[b"batchfit"])
        assert recorded["columns"]["x"] == ["x0", "x1"]
        assert np.allclose(batchfit.predict(str(out), xy), batchfit.predict(want, xy),
                           rtol=1e-7)
    # plot draws 1-D series: a 2-D fit gets a one-line error
    assert main(["plot", str(tmp_path / "long.parquet"), str(tmp_path / "long.out.parquet"),
                 "-o", str(tmp_path / "plots"), "--x-col", "x0,x1"]) == 2
    assert "batchfit plot draws series of one x column" in capsys.readouterr().err
    table = pq.read_table(tmp_path / "long.parquet")
    fitted = fit_table(table, columns=ColumnSpec(x=("x0", "x1")), model="gauss2d",
                       dtype="float64", compile=False).sort_by("series_id")
    assert np.allclose(np.stack([fitted[n].to_numpy() for n in NAMES], 1),
                       want.params.numpy(), rtol=1e-7, atol=1e-9)


def test_x_column_errors(tmp_path, capsys):
    xy, _, y = spots(3, seed=6)
    with pytest.raises(ValueError, match=r"model gauss2d needs x with 2 columns"):
        batchfit.fit(xy[:, 0], y, model="gauss2d")
    with pytest.raises(ValueError, match=r"x has 2 columns but the polynomial takes one"):
        batchfit.fit(xy, y)
    with pytest.raises(ValueError, match=r"model exp needs x with 1 column"):
        batchfit.fit(xy, y, model="exp")
    with pytest.raises(ValueError, match=r"x has shape \(3, 25, 3\)"):
        batchfit.fit(np.zeros((3, 25, 3)), np.zeros((3, 24)), model="gauss2d")
    with pytest.raises(ValueError, match="x names a column twice"):
        ColumnSpec(x=("x0", "x0"))
    long, _ = write_spots(tmp_path, xy, y)
    out = str(tmp_path / "o.parquet")
    cases = [(["--x-col", "x0,x1"], "x has 2 columns (x0, x1) but the polynomial takes one"),
             (["--x-col", "x0,x9", "--model", "gauss2d"], "missing column 'x9'"),
             (["--x-col", "x0", "--model", "gauss2d"], "model gauss2d needs x with 2 columns")]
    for flags, message in cases:
        assert main(["run", str(long), "-o", out, "--no-progress", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("batchfit: error: ") and message in err[-1], err
    assert not (tmp_path / "o.parquet").exists()
