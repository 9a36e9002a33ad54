"""The pictures: every file written, a real PNG of sensible size, edge cases survive."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from matplotlib.ticker import MaxNLocator

from batchfit.app import plots
from batchfit.app.cli import main
from batchfit.app.demo import run_demo
from batchfit.app.generate import generate
from batchfit.core.names import poly_columns

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
    assert "is not a batchfit coefficients" in capsys.readouterr().err  # (file or table)


@pytest.mark.slow  # (an end-to-end run of the whole command)
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


# ----------------------------------------------------------- legible pictures (matplotlib objects)
POLY2 = {"model": "poly", "degree": 2, "columns": list(poly_columns(2))}
EPOCH = 1.7e9  # seconds since 1970: November 2023


def drawn_labels(fig, axis):
    """The tick labels of ``axis`` that are drawn (their tick inside the view), with text."""
    low, high = sorted(axis.get_view_interval())
    pad = (high - low) * 1e-9
    return [label for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
            if low - pad <= loc <= high + pad and label.get_visible() and label.get_text()]


def overlapping_labels(fig):
    """Pairs of tick labels (or a label and the axis' offset text) that touch, any axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    touching = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = drawn_labels(fig, axis)
            if axis.get_offset_text().get_text():
                texts.append(axis.get_offset_text())
            boxes = [text.get_window_extent(renderer) for text in texts]
            touching += [(texts[i].get_text(), texts[j].get_text())
                         for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                         if boxes[i].overlaps(boxes[j])]
    return touching


def epoch_series(span, n_series=4, points=30, base=EPOCH):
    rng = np.random.default_rng(1)
    return {i: (base + np.sort(rng.uniform(0, span, points)), rng.normal(size=points) * 1e3)
            for i in range(n_series)}


@pytest.mark.parametrize("span", [3600, 30 * 86400, 365 * 86400])  # (a day: below)
def test_epoch_second_ticks_do_not_overlap(span):
    series = epoch_series(span, n_series=2)
    u = 1.0 / EPOCH  # a curve of the size of the data there (whatever the column order)
    fitted = {i: {"a": u * u, "b": -2 * u, "c": 1.0, "status": "ok"} for i in series}
    for fig in [plots.data_figure(series), plots.fits_figure(series, fitted, POLY2)]:
        assert overlapping_labels(fig) == []
        ax = fig.axes[0]
        assert ax.xaxis.get_offset_text().get_text()  # 1.7e9 (or 1e9) shown once
        assert all(len(label.get_text()) <= 8 for label in drawn_labels(fig, ax.xaxis))
    dates = plots.data_figure(series, x_unit=plots.DATES)
    assert overlapping_labels(dates) == []
    assert dates.axes[0].get_xlabel() == "x (UTC)"
    assert "202" in dates.axes[0].xaxis.get_offset_text().get_text() + "".join(
        label.get_text() for label in drawn_labels(dates, dates.axes[0].xaxis))



def test_crowded_ticks_are_thinned():
    fig, axes = plots._figure(1, 2)
    for ax in axes[0]:
        ax.plot([123456.789, 124459.0], [0, 1])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=20))  # 6-digit labels every 50
        ax.xaxis.get_major_formatter().set_useOffset(False)
    assert overlapping_labels(fig)
    assert overlapping_labels(plots._declutter(fig)) == []
    assert len(drawn_labels(fig, axes[0, 0].xaxis)) >= 3

def test_large_coefficients_ticks_do_not_overlap():
    rng = np.random.default_rng(2)
    n = 500
    columns = POLY2["columns"]
    values = {"a": 2.5e-9 + 3e-10 * rng.normal(size=n), "b": -9.0 + rng.normal(size=n),
              "c": 7.3e9 + 5e8 * rng.normal(size=n)}
    table = pa.table({"series_id": np.arange(n), **values,
                      "rmse": 1e18 * rng.uniform(size=n), "r2": -1e34 * rng.uniform(size=n),
                      "status": ["ok"] * n})
    truth = pa.table({"series_id": np.arange(n), **{k: v * 1.01 for k, v in values.items()}})
    for fig in [plots.coefficients_figure(table, columns, truth),
                plots.residuals_figure(table)]:
        assert overlapping_labels(fig) == []


def assert_no_empty_panel(fig):
    for ax in fig.axes:
        assert ax.get_visible()
        assert ax.collections or ax.lines or ax.patches or ax.texts, ax.get_title()


def test_grids_have_no_blank_cells():
    series = {"one": (np.array([0.5]), np.array([2.0])),
              "many": (np.linspace(0, 1, 20), np.linspace(0, 1, 20) ** 2),
              "constant x": (np.full(5, 3.0), np.arange(5.0))}  # 3 series in a 2 x 2 grid
    fitted = {"one": {"a": None, "b": None, "c": None, "status": "too_few_points"},
              "many": {"a": 1.0, "b": 0.0, "c": 0.0, "status": "ok"},
              "constant x": {"a": None, "b": None, "c": None, "status": "singular"}}
    for fig in [plots.data_figure(series), plots.fits_figure(series, fitted, POLY2)]:
        assert len(fig.axes) == 3
        assert_no_empty_panel(fig)
    five = epoch_series(3600, n_series=5)  # 5 in 2 x 3
    assert len(plots.data_figure(five).axes) == 5
    empty = plots.data_figure({})  # one panel, saying so
    assert [t.get_text() for ax in empty.axes for t in ax.texts] == ["no series to show"]
    failed = pa.table({"series_id": [1, 2], "a": [None, 1.0], "b": [None, 1.0],
                       "c": [None, 1.0], "rmse": [None, 0.5], "r2": [None, 0.9],
                       "status": ["singular", "ok"]})
    truth = pa.table({"series_id": [1, 2], "a": [1.0, 2.0], "b": [0.0, 0.0], "c": [0.0, 0.0]})
    assert_no_empty_panel(plots.coefficients_figure(failed, POLY2["columns"], truth))
    nothing = failed.filter(pa.array([True, False]))  # no fitted value: no comparison row
    figure = plots.coefficients_figure(nothing, POLY2["columns"], truth)
    assert len(figure.axes) == 3
    assert_no_empty_panel(figure)


def test_status_labels_are_readable():
    statuses = ["ok"] * 1200 + ["too_few_points"] * 3 + ["singular", "not_converged"] * 40
    n = len(statuses)
    table = pa.table({"series_id": np.arange(n), "rmse": np.ones(n), "r2": np.ones(n),
                      "status": statuses})
    fig = plots.residuals_figure(table)
    assert overlapping_labels(fig) == []
    ax = next(ax for ax in fig.axes if ax.get_title() == "status")
    renderer = fig.canvas.get_renderer()
    names = drawn_labels(fig, ax.yaxis)
    assert [label.get_text() for label in names] == [
        "ok", "too few points", "singular", "not converged", "diverged", "out of range"]
    frame = ax.get_window_extent(renderer)
    page = fig.bbox
    counts = list(ax.texts)
    assert [t.get_text() for t in counts] == ["1,200", "3", "40", "40", "0", "0"]
    boxes = [t.get_window_extent(renderer) for t in names + counts]
    for box in boxes:  # inside the figure
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 <= box.y1 <= page.y1
    for box in boxes[len(names):]:  # the counts inside the frame, clear of its edge
        assert frame.x0 < box.x0 and box.x1 < frame.x1 - 2
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1:])


@pytest.fixture(scope="module")
def timestamp_job(tmp_path_factory):
    """3 series with timestamp('s') x over a day, one of them a single point."""
    d = tmp_path_factory.mktemp("timestamps")
    seconds = [0, 3600, 7200, 20000, 40000, 60000, 86000]
    ids = [1] * 7 + [2] * 7 + [3]
    x = pa.array([int(EPOCH) + s for s in seconds * 2 + [100]], pa.int64()).cast(
        pa.timestamp("s"))
    y = [float(s) / 86400 for s in seconds] + [2.0 * s / 86400 for s in seconds] + [1.0]
    pq.write_table(pa.table({"series_id": ids, "x": x, "y": y}), d / "t.parquet")
    assert main(["run", str(d / "t.parquet"), "--no-progress"]) == 0
    return d


def test_timestamp_x_is_shown_as_dates(timestamp_job, tmp_path):
    from batchfit import io
    coefficients, meta = io.read_coefficients(str(timestamp_job / "t.coeffs.parquet"))
    assert meta["x_unit"] == plots.DATES
    points = io.read_series(str(timestamp_job / "t.parquet"), [1, 2, 3], io.ColumnSpec())
    rows = {row["series_id"]: row for row in coefficients.to_pylist()}
    fig = plots.fits_figure(points, rows, meta)  # the unit from the metadata
    assert len(fig.axes) == 3  # (2 x 2: the fourth cell removed)
    assert_no_empty_panel(fig)
    assert overlapping_labels(fig) == []
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x (UTC)"
    assert "2023-Nov-1" in ax.xaxis.get_offset_text().get_text()
    assert {line.get_label() for line in ax.lines} >= {"fitted"}
    assert main(["plot", str(timestamp_job / "t.parquet"), str(timestamp_job / "t.coeffs.parquet"),
                 "-o", str(tmp_path)]) == 0
    assert_png(tmp_path / "fits.png", min_kb=1)
