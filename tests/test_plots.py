"""The pictures: every file written, a real PNG of sensible size, edge cases survive."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from batchfit import plots
from batchfit.cli import main
from batchfit.demo import run_demo
from batchfit.generate import generate

QUADRATIC = {"model": "poly", "degree": 2, "columns": [("a", 2), ("b", 1), ("c", 0)]}


def assert_png(path, min_kb=5):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert width >= 300 and height >= 200
    assert os.path.getsize(path) > min_kb * 1024  # (a str or a Path)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A small GD run with a history, on generated data with ragged lengths."""
    d = tmp_path_factory.mktemp("job")
    generate(str(d / "data.parquet"), series=60, points=20, min_points=1, max_points=25)
    assert main(["run", str(d / "data.parquet"), "--solver", "adam", "--lr", "0.05",
                 "--epochs", "200", "--history", str(d / "h.parquet"), "--no-progress",
                 "--no-compile"]) == 0
    return d


def test_plot_command_writes_every_picture(job):
    out = job / "plots"
    assert main(["plot", str(job / "data.parquet"), str(job / "data.coeffs.parquet"),
                 "--history", str(job / "h.parquet"), "--truth", str(job / "data.truth.parquet"),
                 "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["coefficients.png", "data.png", "fits.png", "loss.png", "residuals.png"]
    for path in out.iterdir():
        assert_png(path)


def test_plot_chosen_series_and_sample(job, tmp_path):
    assert main(["plot", str(job / "data.parquet"), str(job / "data.coeffs.parquet"),
                 "--series", "3,5", "-o", str(tmp_path)]) == 0
    assert_png(tmp_path / "fits.png")
    table = pq.read_table(job / "data.coeffs.parquet")
    assert plots.choose_series(table, 4, seed=1) == plots.choose_series(table, 4, seed=1)
    assert len(plots.choose_series(table, 4, seed=1)) == 4


def test_edge_cases_do_not_crash(tmp_path):
    series = {"one point": (np.array([0.5]), np.array([2.0])),
              "all nan": (np.array([np.nan, np.nan]), np.array([np.nan, 1.0])),
              "empty": (np.zeros(0), np.zeros(0)),
              "constant x": (np.full(5, 3.0), np.arange(5.0))}
    fitted = {"one point": {"a": None, "b": None, "c": None, "status": "too_few_points"},
              "constant x": {"a": None, "b": None, "c": None, "status": "singular"}}
    assert_png(plots.plot_data(series, str(tmp_path / "d.png")), min_kb=1)
    assert_png(plots.plot_fits(series, fitted, QUADRATIC, str(tmp_path / "f.png")), min_kb=1)
    assert_png(plots.plot_data({}, str(tmp_path / "none.png")), min_kb=1)
    history = pa.table({"epoch": [0], **{c: [1.0] for c in
                        ["loss_p05", "loss_p25", "loss_median", "loss_p75", "loss_p95"]}})
    assert_png(plots.plot_loss(history, {"tracked": []}, str(tmp_path / "l.png")), min_kb=1)
    failed = pa.table({"series_id": [1, 2], "a": [None, None], "b": [None, None],
                       "c": [None, None], "rmse": pa.array([None, None], pa.float64()),
                       "r2": pa.array([None, None], pa.float64()),
                       "status": ["singular", "too_few_points"]},
                      schema=pa.schema([("series_id", pa.int64()), ("a", pa.float64()),
                                        ("b", pa.float64()), ("c", pa.float64()),
                                        ("rmse", pa.float64()), ("r2", pa.float64()),
                                        ("status", pa.string())]))
    truth = pa.table({"series_id": [1, 2], "a": [1.0, 2.0], "b": [0.0, 0.0], "c": [0.0, 0.0]})
    assert_png(plots.plot_coefficients(failed, QUADRATIC["columns"], str(tmp_path / "c.png"),
                                       truth), min_kb=1)
    assert_png(plots.plot_residuals(failed, str(tmp_path / "r.png")), min_kb=1)
    nan_loss = history.set_column(3, "loss_median", pa.array([float("nan")]))
    assert_png(plots.plot_loss(nan_loss, {}, str(tmp_path / "l2.png")), min_kb=1)


def test_plot_errors_are_one_line(tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=5, points=5)
    assert main(["plot", str(tmp_path / "d.parquet"), str(tmp_path / "d.parquet")]) == 2
    assert "is not a batchfit coefficients file" in capsys.readouterr().err


def test_demo_writes_data_fits_history_and_pictures(tmp_path):
    report = run_demo(str(tmp_path / "demo"), n_series=200, points=30)
    files = set(report["files"])
    assert {"data.parquet", "data.truth.parquet", "exact.coeffs.parquet", "gd.coeffs.parquet",
            "gd.history.parquet", "data.png", "fits.png", "loss.png", "coefficients.png",
            "residuals.png"} <= files
    exact, gd = report["solvers"].values()
    assert exact["statuses"] == {"ok": 200} and gd["statuses"] == {"not_converged": 200}
    assert exact["median_abs_error"]["a"] < gd["median_abs_error"]["a"]
    for name in ["data.png", "fits.png", "loss.png", "coefficients.png", "residuals.png"]:
        assert_png(tmp_path / "demo" / name)
