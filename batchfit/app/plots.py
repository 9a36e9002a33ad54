"""The seed's pictures at batch scale, as PNG files (matplotlib's Agg canvas, no display).

Imported only when plots are made. Every function takes plain data (dicts of arrays, Arrow
tables) and writes one file; ``plot_all`` reads a job's files and writes them all:

* ``data.png``: a grid of sampled series, their points (the seed's first picture);
* ``fits.png``: the same series with the fitted curve, and the curve before training when a
  history holds their initial parameters (the seed's before/after pictures);
* ``loss.png``: loss against epoch, log scale: the batch's median and quantile bands, and the
  tracked series (the seed's MSE vs epoch);
* ``coefficients.png``: the fitted coefficients over the batch, against the truth if known;
* ``residuals.png``: rmse and r2 over the batch, and the counts by status.

Each ``plot_*`` function has a ``*_figure`` twin that returns the Figure instead of writing
it. Axes keep to a few ticks, and large values (epoch seconds, the coefficients fitted on
them) show their offset or power of ten once at the axis' end; an x read from timestamps or
dates (``x_unit``, in the run's metadata) is shown as dates and times in UTC.
"""

from __future__ import annotations

import itertools
import math
import os

import matplotlib.dates as mdates
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, ScalarFormatter

from batchfit import io
from batchfit.core.names import FAMILY_X_COLUMNS, STATUS_LABELS
from batchfit.fitting.models import FAMILIES
from batchfit.fitting.prediction import polynomial
from batchfit.fitting.user_models import table_model

POINT_COLOR, FIT_COLOR, BEFORE_COLOR, REFERENCE_COLOR = "#4c72b0", "#c44e52", "#8c8c8c", "#55a868"
MAX_SCATTER = 20_000  # points drawn in a scatter over the batch (a reproducible sample)
DPI = 90
DATES = "seconds since 1970-01-01 UTC"  # the x_unit of timestamps and dates (io.schema)


def _figure(rows: int, cols: int, width: float = 3.4, height: float = 2.8):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, math.ceil(math.sqrt(n))))
    return max(1, math.ceil(n / cols)), cols


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    return path


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _numbers(axis, bins: int = 5, integer: bool = False):
    """Few ticks on a linear axis; a large value's common part (1.7e9 + ...) and power of
    ten shown once, as the axis' offset text, so that the labels stay short."""
    axis.set_major_locator(MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10], integer=integer,
                                       min_n_ticks=2))
    axis.set_major_formatter(ScalarFormatter(useOffset=True))


def _dates(axis):
    locator = mdates.AutoDateLocator(minticks=2, maxticks=5)
    axis.set_major_locator(locator)
    axis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _shown_x(x: np.ndarray, x_unit: str | None) -> np.ndarray:
    """x as drawn: finite seconds since the epoch become matplotlib dates (days)."""
    if x_unit != DATES:
        return x
    return mdates.date2num(np.round(x * 1e6).astype("int64").astype("datetime64[us]"))


def _x_axis(ax, x_unit: str | None):
    if x_unit == DATES:
        _dates(ax.xaxis)
        ax.set_xlabel("x (UTC)")
    else:
        _numbers(ax.xaxis, bins=4)
        ax.set_xlabel("x" if not x_unit else f"x ({x_unit})")


def _drawn_ticks(axis, renderer) -> tuple[list, list]:
    """The ticks of ``axis`` inside its view that have a label: their places and boxes."""
    low, high = sorted(axis.get_view_interval())
    drawn = [(at, label.get_window_extent(renderer)) for at, label in
             zip(axis.get_majorticklocs(), axis.get_majorticklabels())
             if low <= at <= high and label.get_visible() and label.get_text()]
    return [at for at, _ in drawn], [box for _, box in drawn]


def _declutter(fig: Figure) -> Figure:
    """Thin the ticks of any axis whose labels would still touch (a last resort: the
    locators above keep to a few ticks already). Returns ``fig``, drawn."""
    for _ in range(3):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        crowded = []
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                places, boxes = _drawn_ticks(axis, renderer)
                if any(a.overlaps(b) for a, b in itertools.pairwise(boxes)):
                    crowded.append((axis, places))
        if not crowded:
            break
        for axis, places in crowded:  # every other tick (the view is final by now)
            axis.set_major_locator(FixedLocator(places[::2]))
    return fig


def curve(coefficients: dict, fitted: dict, x: np.ndarray) -> np.ndarray | None:
    """Evaluate output-row coefficients ({name: value}) at x; None when any is missing or
    the model is neither a built-in one nor a formula. ``fitted``: ``io.read_coefficients``' metadata."""
    columns = fitted["columns"]
    if any(coefficients.get(name) is None for name, _ in columns):
        return None
    if fitted["model"] == "poly":
        names = [name for name, _ in columns]  # (highest power first)
        frame = [coefficients.get(key) for key in ("x_centre", "x_scale",
                                                     *map(io.frame_name, names))]
        x = np.asarray(x, dtype=np.float64)
        if all(value is not None for value in frame):  # in the fit's frame: no cancellation
            centre, scale, *params = frame
            return polynomial(np.array([params]), np.array([centre]), np.array([scale]),
                              x[None])[0]
        return polynomial(np.array([[coefficients[name] for name in names]]), None, None,
                          x[None])[0]
    model = FAMILIES.get(fitted["model"]) or table_model(fitted)
    if model is None:
        return None  # a custom model: its code is not in the file (and never will be)
    params = [coefficients[name] for name, _ in sorted(columns, key=lambda c: c[1])]
    with np.errstate(all="ignore"):
        return model.f(torch.as_tensor(x, dtype=torch.float64),
                                           torch.tensor(params, dtype=torch.float64)).numpy()


def _series_grid(series: dict, title: str, draw, x_unit: str | None = None) -> Figure:
    fig, axes = _grid_axes(len(series))
    for ax, (series_id, (x, y)) in zip(axes.flat, series.items()):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        ax.scatter(_shown_x(x[keep], x_unit), y[keep], s=8, color=POINT_COLOR, alpha=0.7,
                   label="data")
        count = int(keep.sum())
        ax.set_title(f"series {series_id} ({count} point{'' if count == 1 else 's'})",
                     fontsize=9)
        _x_axis(ax, x_unit)
        _numbers(ax.yaxis)
        ax.set_ylabel("y")
        if not keep.any():
            _note(ax, "no usable points")
        draw(ax, series_id, x[keep])
    for ax in list(axes.flat)[max(len(series), 1):]:
        ax.remove()  # the cells of the last row that no series fills
    fig.suptitle(title)
    return _declutter(fig)


def _grid_axes(n: int):
    rows, cols = _grid(max(n, 1))
    fig, axes = _figure(rows, cols)
    if n == 0:
        axes[0, 0].set_axis_off()
        _note(axes[0, 0], "no series to show")
    return fig, axes


def data_figure(series: dict, total: int | None = None, x_unit: str | None = None) -> Figure:
    """``series``: {id: (x, y)}; a scatter per series. ``x_unit``: the run's metadata's."""
    of = f" of {total:,}" if total else ""
    return _series_grid(series, f"Data: {len(series)} sampled series{of}",
                        lambda ax, sid, x: None, x_unit)


def plot_data(series: dict, path: str, total: int | None = None,
              x_unit: str | None = None) -> str:
    return _save(data_figure(series, total, x_unit), path)


def plot_fits(series: dict, fitted: dict, model: dict, path: str, initial: dict | None = None,
              reference: dict | None = None, label: str = "fitted",
              reference_label: str = "reference", x_unit: str | None = None) -> str:
    return _save(fits_figure(series, fitted, model, initial, reference, label,
                             reference_label, x_unit), path)


def fits_figure(series: dict, fitted: dict, model: dict, initial: dict | None = None,
                reference: dict | None = None, label: str = "fitted",
                reference_label: str = "reference", x_unit: str | None = None) -> Figure:
    """Points with the fitted curve; ``initial`` ({id: coefficients}) adds the curve before
    training, ``reference`` another fit (e.g. the exact solver) for comparison. ``model``:
    the fitted model as ``io.read_coefficients`` describes it (its ``x_unit`` the default
    of ``x_unit``)."""
    x_unit = x_unit or model.get("x_unit")

    def draw(ax, series_id, x):
        if len(x) == 0:
            return
        grid = np.linspace(x.min(), x.max(), 200) if x.max() > x.min() else x[:1]
        curves = [(initial, BEFORE_COLOR, "before training", ":"),
                  (reference, REFERENCE_COLOR, reference_label, "--"),
                  (fitted, FIT_COLOR, label, "-")]
        for source, color, name, style in curves:
            row = (source or {}).get(series_id)
            values = None if row is None else curve(row, model, grid)
            if values is not None:
                ax.plot(_shown_x(grid, x_unit), values, style, color=color, lw=1.6,
                        label=name, marker="o" if len(grid) == 1 else None)
        status = (fitted.get(series_id) or {}).get("status")
        if status and status != "ok":
            ax.set_title(f"{ax.get_title()}: {status}", fontsize=9)
        ax.legend(fontsize=7, loc="best")

    title = f"Fits: {label}" + (" (before and after training)" if initial else "")
    return _series_grid(series, title, draw, x_unit)


def plot_loss(history: pa.Table, meta: dict, path: str) -> str:
    return _save(loss_figure(history, meta), path)


def loss_figure(history: pa.Table, meta: dict) -> Figure:
    """Loss against epoch (log scale): median, quantile bands and tracked series."""
    fig, axes = _figure(1, 1, 7.0, 4.2)
    ax = axes[0, 0]
    epochs = history["epoch"].to_numpy()

    def positive(column):
        values = history[column].to_numpy(zero_copy_only=False).astype(float)
        return np.where(values > 0, values, np.nan)

    marker = "o" if len(epochs) == 1 else None
    ax.fill_between(epochs, positive("loss_p05"), positive("loss_p95"), color=FIT_COLOR,
                    alpha=0.12, label="5-95 % of series")
    ax.fill_between(epochs, positive("loss_p25"), positive("loss_p75"), color=FIT_COLOR,
                    alpha=0.25, label="25-75 % of series")
    ax.plot(epochs, positive("loss_median"), color=FIT_COLOR, lw=2, marker=marker,
            label="median series")
    for tracked in meta.get("tracked", []):
        ax.plot(epochs, positive(tracked["column"]), lw=0.8, alpha=0.8, marker=marker,
                label=f"series {tracked['series_id']}")
    if np.isfinite(positive("loss_median")).any():
        ax.set_yscale("log")
    else:
        _note(ax, "no finite losses")
    loss = meta.get("loss", "mse")
    solver = meta.get("solver", "")
    lr = (meta.get("options") or {}).get("lr")
    sampled = meta.get("sampled_series")
    over = f" over {sampled:,} sampled series" if sampled else ""
    ax.set_title(f"Training loss ({loss}){over}: {solver}" + (f", lr {lr:g}" if lr else ""))
    ax.set_xlabel("epoch")
    _numbers(ax.xaxis, bins=6, integer=True)
    ax.set_ylabel(f"loss ({loss}, log scale)")
    ax.legend(fontsize=7, ncol=2)
    return _declutter(fig)


def _span(values: np.ndarray, high: float) -> tuple[float, float]:
    """A histogram's range: all of a small batch; a large one's 0.5 to ``high`` percentile
    (a few wild series must not squeeze the rest into one bin)."""
    if len(values) < 1000:
        return float(values.min()), float(values.max())
    low, high = np.percentile(values, [0.5, high])
    return float(low), float(high)


def _sample_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def plot_coefficients(coefficients: pa.Table, columns: list, path: str,
                      truth: pa.Table | None = None, label: str = "") -> str:
    return _save(coefficients_figure(coefficients, columns, truth, label), path)


def coefficients_figure(coefficients: pa.Table, columns: list, truth: pa.Table | None = None,
                        label: str = "") -> Figure:
    """Histograms of each coefficient (``columns``: (name, index)) over the batch; with the
    truth, fitted against true (a row drawn only where some series has both)."""
    fitted = {name: coefficients[name].to_numpy(zero_copy_only=False).astype(float)
              for name, _ in columns}
    matched = None
    if truth is not None:
        index = {sid: i for i, sid in enumerate(truth["series_id"].to_pylist())}
        matched = np.array([index.get(sid, -1) for sid in coefficients["series_id"].to_pylist()],
                           dtype=np.int64)
    both = {name: (np.isfinite(values) & (matched >= 0)) if matched is not None
            and name in truth.column_names else np.zeros(len(values), bool)
            for name, values in fitted.items()}  # the series with a fitted and a true value
    compare = any(has.any() for has in both.values())
    fig, axes = _figure(2 if compare else 1, max(len(columns), 1))
    for j, (name, _) in enumerate(columns):
        values = fitted[name]
        ok = np.isfinite(values)
        ax = axes[0, j]
        true_all = (truth[name].to_numpy(zero_copy_only=False).astype(float)
                    if truth is not None and name in truth.column_names else np.zeros(0))
        true_all = true_all[np.isfinite(true_all)]
        if ok.any():
            low, high = _span(np.concatenate([values[ok], true_all]), 99.5)
            bins = np.linspace(low, high, 60) if high > low else 10
            ax.hist(values[ok], bins=bins, color=POINT_COLOR, alpha=0.8, label="fitted")
            if len(true_all):
                ax.hist(true_all, bins=bins, histtype="step", color="black", label="true")
                ax.legend(fontsize=7)
        else:
            _note(ax, "no fitted series")
        ax.set_title(f"{name}: {ok.sum():,} fitted series", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel("series")
        _numbers(ax.xaxis, bins=4)
        _numbers(ax.yaxis, integer=True)
        if not compare:
            continue
        ax = axes[1, j]
        has = both[name]
        if not has.any():
            if ok.any():  # (else the histogram above already says there is nothing)
                ax.set_axis_off()
                _note(ax, f"no fitted {name} with a true value")
            else:
                ax.remove()
            continue
        true = truth[name].to_numpy(zero_copy_only=False).astype(float)[matched[has]]
        drawn = _sample_rows(int(has.sum()), MAX_SCATTER)
        ax.scatter(true[drawn], values[has][drawn], s=2, alpha=0.3, color=POINT_COLOR)
        span = [np.nanmin([true.min(), values[has].min()]),
                np.nanmax([true.max(), values[has].max()])]
        ax.plot(span, span, color=FIT_COLOR, lw=1, label="fitted = true")
        error = np.nanmedian(np.abs(values[has] - true))
        ax.set_title(f"{name}: median |error| {error:.3g}", fontsize=10)
        ax.legend(fontsize=7)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"fitted {name}")
        _numbers(ax.xaxis, bins=4)
        _numbers(ax.yaxis)
    fig.suptitle(f"Coefficients over {coefficients.num_rows:,} series" +
                 (f": {label}" if label else ""))
    return _declutter(fig)


def plot_residuals(coefficients: pa.Table, path: str) -> str:
    return _save(residuals_figure(coefficients), path)


def residuals_figure(coefficients: pa.Table) -> Figure:
    """rmse and r2 over the batch, and the counts by status (horizontal bars)."""
    fig, axes = _figure(1, 3)
    for ax, name in zip(axes[0, :2], ["rmse", "r2"]):
        values = coefficients[name].to_numpy(zero_copy_only=False).astype(float)
        values = values[np.isfinite(values)]
        if len(values):
            low, high = _span(values, 100)
            ax.hist(values, bins=np.linspace(low, high, 60) if high > low else 10,
                    color=POINT_COLOR, alpha=0.8)
            ax.set_title(f"{name}: median {np.median(values):.3g}", fontsize=10)
            ax.set_xlabel(name)
            ax.set_ylabel("series")
            _numbers(ax.xaxis, bins=4)
            _numbers(ax.yaxis, integer=True)
        else:
            ax.set_axis_off()
            _note(ax, f"no series with an {name}")
            ax.set_title(name, fontsize=10)
    ax = axes[0, 2]
    statuses = coefficients["status"].to_pylist()
    names = [str(label) for label in STATUS_LABELS]
    counts = [statuses.count(name) for name in names]
    places = np.arange(len(names))
    bars = ax.barh(places, counts, height=0.6,
                   color=[POINT_COLOR] + [FIT_COLOR] * (len(names) - 1))
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8, padding=3)
    ax.set_yticks(places, [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylim(len(names) - 0.4, -0.6)  # ok on top
    ax.set_xlim(0, max(max(counts), 1) * 1.3)  # room for the counts right of the bars
    _numbers(ax.xaxis, bins=4, integer=True)
    ax.set_xlabel("series")
    ax.set_title("status", fontsize=10)
    fig.suptitle(f"Goodness of fit over {coefficients.num_rows:,} series")
    return _declutter(fig)


def choose_series(coefficients: pa.Table, sample: int, seed: int = 0,
                  history_meta: dict | None = None, ids: list | None = None) -> list:
    """Which series to draw: ``ids`` if given; else the history's tracked series (they have
    a 'before' curve); else a reproducible random sample of ``sample`` series."""
    if ids:
        return list(ids)
    if history_meta and history_meta.get("tracked"):
        return [t["series_id"] for t in history_meta["tracked"]][:sample]
    all_ids = coefficients["series_id"].to_pylist()
    return [all_ids[i] for i in _sample_rows(len(all_ids), sample, seed)]


def plot_all(data_path: str, coefficients_path: str, out_dir: str, *,
             history_path: str | None = None, truth_path: str | None = None,
             reference_path: str | None = None, series: list | None = None, sample: int = 9,
             seed: int = 0, columns: io.ColumnSpec | None = None,
             input_format: str = "auto", storage_options: dict | None = None) -> list[str]:
    """Read a job's files (on this machine or in a store: URIs, with ``storage_options``)
    and write every picture into ``out_dir``; returns their paths."""
    paths, options = io.split_paths([data_path, coefficients_path, history_path, truth_path,
                                     reference_path], storage_options)
    with io.storage.using(options):
        return _plot_all(*paths, out_dir, series, sample, seed, columns or io.ColumnSpec(),
                         input_format)


def _plot_all(data_path, coefficients_path, history_path, truth_path, reference_path,
              out_dir, series, sample, seed, columns, input_format) -> list[str]:
    coefficients, meta = io.read_coefficients(coefficients_path)
    if columns.more_x or FAMILY_X_COLUMNS.get(meta.get("model"), 1) > 1:
        raise ValueError(f"batchfit plot draws series of one x column; {coefficients_path} "
                         "is a fit of x with several columns (predict it with "
                         "batchfit.predict instead)")
    history, history_meta = io.read_history(history_path) if history_path else (None, None)
    truth = io.read_parquet(truth_path) if truth_path else None
    if series:  # ids typed like the coefficients' series_id
        series = pa.array(series).cast(coefficients.schema.field("series_id").type).to_pylist()
    chosen = choose_series(coefficients, sample, seed, history_meta, series)
    points = io.read_series(data_path, chosen, columns, input_format)
    points = {sid: points.get(sid, (np.zeros(0), np.zeros(0))) for sid in chosen}
    rows = {row["series_id"]: row for row in _rows_for(coefficients, chosen)}
    initial = ({t["series_id"]: t["initial"] for t in history_meta["tracked"]}
               if history_meta else None)
    reference, reference_label = None, "reference"
    if reference_path:
        ref_table, ref_meta = io.read_coefficients(reference_path)
        reference = {row["series_id"]: row for row in _rows_for(ref_table, chosen)}
        reference_label = ref_meta.get("solver", "reference")
    os.makedirs(out_dir, exist_ok=True)
    model = "" if meta.get("model") in ("poly", None) else f"{meta['model']}, "
    label = f"{model}{meta.get('solver', 'fitted')} ({meta.get('loss', 'mse')})"
    x_unit = meta.get("x_unit")
    paths = [plot_data(points, os.path.join(out_dir, "data.png"), coefficients.num_rows,
                       x_unit),
             plot_fits(points, rows, meta, os.path.join(out_dir, "fits.png"), initial,
                       reference, label, reference_label, x_unit)]
    if history is not None:
        paths.append(plot_loss(history, history_meta, os.path.join(out_dir, "loss.png")))
    paths.append(plot_coefficients(coefficients, meta["columns"],
                                   os.path.join(out_dir, "coefficients.png"), truth, label))
    paths.append(plot_residuals(coefficients, os.path.join(out_dir, "residuals.png")))
    return paths


def _rows_for(table: pa.Table, ids: list) -> list[dict]:
    mask = pc.is_in(table["series_id"], value_set=pa.array(ids, table["series_id"].type))
    return table.filter(mask).to_pylist()
