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
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import io
from .models import FAMILIES
from .names import STATUS_LABELS

POINT_COLOR, FIT_COLOR, BEFORE_COLOR, REFERENCE_COLOR = "#4c72b0", "#c44e52", "#8c8c8c", "#55a868"
MAX_SCATTER = 20_000  # points drawn in a scatter over the batch (a reproducible sample)


def _figure(rows: int, cols: int, width: float = 3.4, height: float = 2.8):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, math.ceil(math.sqrt(n))))
    return max(1, math.ceil(n / cols)), cols


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=90)
    return path


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def curve(coefficients: dict, fitted: dict, x: np.ndarray) -> np.ndarray | None:
    """Evaluate output-row coefficients ({name: value}) at x; None when any is missing or
    the model is not a built-in one. ``fitted``: ``io.read_coefficients``' metadata."""
    columns = fitted["columns"]
    if any(coefficients.get(name) is None for name, _ in columns):
        return None
    if fitted["model"] == "poly":
        return sum(coefficients[name] * x**power for name, power in columns)
    if fitted["model"] not in FAMILIES:
        return None  # a custom model: its code is not in the file (and never will be)
    params = [coefficients[name] for name, _ in sorted(columns, key=lambda c: c[1])]
    with np.errstate(all="ignore"):
        return FAMILIES[fitted["model"]].f(torch.as_tensor(x, dtype=torch.float64),
                                           torch.tensor(params, dtype=torch.float64)).numpy()


def _series_grid(series: dict, title: str, draw) -> Figure:
    fig, axes = _grid_axes(len(series))
    for ax, (series_id, (x, y)) in zip(axes.flat, series.items()):
        keep = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[keep], y[keep], s=8, color=POINT_COLOR, alpha=0.7, label="data")
        count = int(keep.sum())
        ax.set_title(f"series {series_id} ({count} point{'' if count == 1 else 's'})",
                     fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        if not keep.any():
            _note(ax, "no usable points")
        draw(ax, series_id, x[keep])
    for ax in list(axes.flat)[len(series):]:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _grid_axes(n: int):
    rows, cols = _grid(max(n, 1))
    fig, axes = _figure(rows, cols)
    if n == 0:
        _note(axes[0, 0], "no series to show")
    return fig, axes


def plot_data(series: dict, path: str, total: int | None = None) -> str:
    """``series``: {id: (x, y)}; a scatter per series."""
    of = f" of {total:,}" if total else ""
    return _save(_series_grid(series, f"Data: {len(series)} sampled series{of}",
                              lambda ax, sid, x: None), path)


def plot_fits(series: dict, fitted: dict, model: dict, path: str, initial: dict | None = None,
              reference: dict | None = None, label: str = "fitted",
              reference_label: str = "reference") -> str:
    """Points with the fitted curve; ``initial`` ({id: coefficients}) adds the curve before
    training, ``reference`` another fit (e.g. the exact solver) for comparison. ``model``:
    the fitted model as ``io.read_coefficients`` describes it."""
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
                ax.plot(grid, values, style, color=color, lw=1.6, label=name,
                        marker="o" if len(grid) == 1 else None)
        status = (fitted.get(series_id) or {}).get("status")
        if status and status != "ok":
            ax.set_title(f"{ax.get_title()}: {status}", fontsize=9)
        ax.legend(fontsize=7, loc="best")

    title = f"Fits: {label}" + (" (before and after training)" if initial else "")
    return _save(_series_grid(series, title, draw), path)


def plot_loss(history: pa.Table, meta: dict, path: str) -> str:
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
    ax.set_ylabel(f"loss ({loss}, log scale)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _sample_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def plot_coefficients(coefficients: pa.Table, columns: list, path: str,
                      truth: pa.Table | None = None, label: str = "") -> str:
    """Histograms of each coefficient (``columns``: (name, index)) over the batch; with the
    truth, fitted against true."""
    rows = 2 if truth is not None else 1
    fig, axes = _figure(rows, len(columns))
    matched = None
    if truth is not None:
        index = {sid: i for i, sid in enumerate(truth["series_id"].to_pylist())}
        at = [index.get(sid, -1) for sid in coefficients["series_id"].to_pylist()]
        matched = np.array(at)
    for j, (name, _) in enumerate(columns):
        fitted = coefficients[name].to_numpy(zero_copy_only=False).astype(float)
        ok = np.isfinite(fitted)
        ax = axes[0, j]
        true_all = (truth[name].to_numpy() if truth is not None and name in truth.column_names
                    else np.zeros(0))
        if ok.any():
            low, high = np.percentile(np.concatenate([fitted[ok], true_all]), [0.5, 99.5])
            bins = np.linspace(low, high, 60) if high > low else 10
            ax.hist(fitted[ok], bins=bins, color=POINT_COLOR, alpha=0.8, label="fitted")
            if len(true_all):
                ax.hist(true_all, bins=bins, histtype="step", color="black", label="true")
                ax.legend(fontsize=7)
        else:
            _note(ax, "no fitted series")
        ax.set_title(f"{name}: {ok.sum():,} fitted series", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel("series")
        if truth is not None:
            ax = axes[1, j]
            has = ok & (matched >= 0)
            if has.any() and name in truth.column_names:
                true = truth[name].to_numpy()[matched[has]]
                rows_drawn = _sample_rows(int(has.sum()), MAX_SCATTER)
                ax.scatter(true[rows_drawn], fitted[has][rows_drawn], s=2, alpha=0.3,
                           color=POINT_COLOR)
                span = [min(true.min(), fitted[has].min()), max(true.max(), fitted[has].max())]
                ax.plot(span, span, color=FIT_COLOR, lw=1, label="fitted = true")
                error = np.median(np.abs(fitted[has] - true))
                ax.set_title(f"{name}: median |error| {error:.3g}", fontsize=10)
                ax.legend(fontsize=7)
            else:
                _note(ax, "no fitted series with a true value")
            ax.set_xlabel(f"true {name}")
            ax.set_ylabel(f"fitted {name}")
    fig.suptitle(f"Coefficients over {coefficients.num_rows:,} series" +
                 (f": {label}" if label else ""))
    return _save(fig, path)


def plot_residuals(coefficients: pa.Table, path: str) -> str:
    """rmse and r2 over the batch, and the counts by status."""
    fig, axes = _figure(1, 3)
    for ax, name in zip(axes[0, :2], ["rmse", "r2"]):
        values = coefficients[name].to_numpy(zero_copy_only=False).astype(float)
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.percentile(values, [0.5, 100])
            ax.hist(values, bins=np.linspace(low, high, 60) if high > low else 10,
                    color=POINT_COLOR, alpha=0.8)
            ax.set_title(f"{name}: median {np.median(values):.3g}", fontsize=10)
        else:
            _note(ax, f"no series with an {name}")
            ax.set_title(name, fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel("series")
    ax = axes[0, 2]
    statuses = coefficients["status"].to_pylist()
    names = [str(label) for label in STATUS_LABELS]
    counts = [statuses.count(name) for name in names]
    bars = ax.bar(range(len(names)), counts,
                  color=[POINT_COLOR] + [FIT_COLOR] * (len(names) - 1))
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=7)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylabel("series")
    ax.set_title("status", fontsize=10)
    fig.suptitle(f"Goodness of fit over {coefficients.num_rows:,} series")
    return _save(fig, path)


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
             seed: int = 0, columns: io.ColumnSpec | None = None) -> list[str]:
    """Read a job's files and write every picture into ``out_dir``; returns their paths."""
    columns = columns or io.ColumnSpec()
    coefficients, meta = io.read_coefficients(coefficients_path)
    history, history_meta = io.read_history(history_path) if history_path else (None, None)
    truth = io.read_parquet(truth_path) if truth_path else None
    if series:  # ids typed like the coefficients' series_id
        series = pa.array(series).cast(coefficients.schema.field("series_id").type).to_pylist()
    chosen = choose_series(coefficients, sample, seed, history_meta, series)
    points = io.read_series(data_path, chosen, columns)
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
    paths = [plot_data(points, os.path.join(out_dir, "data.png"), coefficients.num_rows),
             plot_fits(points, rows, meta, os.path.join(out_dir, "fits.png"), initial,
                       reference, label, reference_label)]
    if history is not None:
        paths.append(plot_loss(history, history_meta, os.path.join(out_dir, "loss.png")))
    paths.append(plot_coefficients(coefficients, meta["columns"],
                                   os.path.join(out_dir, "coefficients.png"), truth, label))
    paths.append(plot_residuals(coefficients, os.path.join(out_dir, "residuals.png")))
    return paths


def _rows_for(table: pa.Table, ids: list) -> list[dict]:
    mask = pc.is_in(table["series_id"], value_set=pa.array(ids, table["series_id"].type))
    return table.filter(mask).to_pylist()
