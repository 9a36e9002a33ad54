"""A whole Parquet job: chunks from io -> engine -> io's writer, with progress and a summary.

``run_job`` is what ``batchfit run`` does; ``fit_table`` fits an in-memory Arrow table (the
unit of work of the distributed engine).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import __version__, io
from .engine import COMPILE_COST_S, fit, fit_ragged, resolve_device, resolve_dtype
from .models import FORMULAS, output_columns, polynomial
from .problem import History
from .solvers import DEFAULT_EPOCHS, eager_seconds, random_init

DEFAULT_BATCH_SIZE = 100_000  # series per fit call
DEFAULT_COLUMNS = io.ColumnSpec()
HISTORY_SAMPLE = 1 << 14  # series whose loss curves make the history's quantiles


@dataclass(frozen=True)
class JobSummary:
    input: str
    output: str
    n_series: int
    n_points: int
    status_counts: dict
    seconds: float
    format: str
    grouped: bool  # the input had each series' rows together (streamed), else gathered
    metadata: dict = field(repr=False, default_factory=dict)
    history: str | None = None

    @property
    def series_per_second(self) -> float:
        return self.n_series / max(self.seconds, 1e-9)


def default_output(path: str) -> str:
    """``data.parquet`` -> ``data.coeffs.parquet``; a directory ``data/`` ->
    ``data.coeffs.parquet`` beside it."""
    path = os.path.normpath(path)
    stem = path[: -len(".parquet")] if path.lower().endswith(".parquet") else path
    return f"{stem}.coeffs.parquet"


def checked_options(fit_options: dict) -> dict:
    """Validate fit options before any data is read, by fitting one tiny series.

    Returns what the engine resolved them to (solver, loss, dtype, device)."""
    epochs = fit_options.get("epochs")
    if epochs is None or (isinstance(epochs, int) and epochs > 0):
        epochs = 1  # a valid count: one step is enough to check everything else
    points = 14  # more than any model's parameter count
    probe = fit(np.linspace(0.5, 1.5, points), np.zeros(points),
                **{**fit_options, "compile": False, "epochs": epochs})
    model = probe.output_model
    return {"solver": probe.solver, "loss": probe.loss_name, "degree": probe.degree,
            "model": model.name, "formula": FORMULAS.get(model.name),
            "param_columns": [name for name, _ in output_columns(model)],
            "dtype": str(resolve_dtype(fit_options.get("dtype"), None)).replace("torch.", ""),
            "device": str(resolve_device(fit_options.get("device", "auto")))}


def job_columns(resolved: dict) -> list[tuple[str, int]]:
    """(name, parameter index) of the output columns that ``checked_options`` resolved."""
    if resolved["model"] == "poly":
        return list(polynomial(resolved["degree"]).columns)
    return [(name, i) for i, name in enumerate(resolved["param_columns"])]


def _compile_choice(compile, resolved: dict, fit_options: dict, n_rows: int, n_series: int):
    """Compile for the whole job or not at all: chunks would each look too small to pay."""
    if compile != "auto":
        return compile
    epochs = fit_options.get("epochs") or DEFAULT_EPOCHS.get(resolved["solver"], 1)
    seconds = eager_seconds(resolved["solver"], resolved["loss"] == "mse", n_series, n_rows,
                            epochs)
    return seconds >= COMPILE_COST_S


def _fit_chunk(chunk: io.Chunk, fit_options: dict):
    return fit_ragged(chunk.x, chunk.y, chunk.offsets, chunk.w, **fit_options)


class _HistoryCollector:
    """Gathers the training histories of a job's fit calls into one, with the tracked
    series chosen over the whole dataset (a spread of ``track`` series, or ``track_ids``)."""

    def __init__(self, n_series: int, id_type: pa.DataType, track: int, track_ids):
        if track < 0:
            raise ValueError(f"--track must be >= 0, got {track}")
        self.n_series = n_series
        self.track_ids = None
        if track_ids is not None:
            try:
                self.track_ids = pa.array(list(track_ids)).cast(id_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"--track-ids must be {id_type} series ids") from None
        count = min(track, n_series)
        self.spread = np.unique(np.round(np.linspace(0, n_series - 1, count)).astype(np.int64))
        self.parts, self.positions, self.ids = [], [], {}

    def options(self, piece: io.Chunk, first: int) -> dict:
        """``track`` and ``history_sample`` for the fit call of ``piece`` (series ``first``
        onwards): the sample is shared out in proportion to the series."""
        if self.track_ids is not None:
            local = np.flatnonzero(pc.is_in(piece.ids, value_set=self.track_ids).to_numpy(
                zero_copy_only=False))
        else:
            inside = (self.spread >= first) & (self.spread < first + piece.n_series)
            local = self.spread[inside] - first
        sample = -(-HISTORY_SAMPLE * piece.n_series // self.n_series)
        return {"track": local.tolist(), "history_sample": sample}

    def add(self, history, piece: io.Chunk, first: int):
        self.parts.append(history)
        self.positions.append(torch.arange(first, first + piece.n_series))
        local = history.tracked.numpy()
        ids = piece.ids.take(pa.array(local)).to_pylist()
        self.ids.update(zip((first + local).tolist(), ids))

    def table(self, columns: list, metadata: dict) -> pa.Table:
        history = History.merge(self.parts, self.positions)
        ids = [self.ids[position] for position in history.tracked.tolist()]
        return io.history_table(history, ids, columns, metadata)


def _position_options(fit_options: dict, history, piece: io.Chunk, first: int,
                      degree: int | None) -> dict:
    """What the fit call of ``piece`` (series ``first`` onwards) gets from its place in the
    run: random starting values by position (polynomials), and its share of the history."""
    extra = {} if history is None else history.options(piece, first)
    init = fit_options.get("init", "random")
    if isinstance(init, str) and init == "random" and degree is not None:
        extra["init"] = random_init(fit_options.get("seed", 0), first, piece.n_series,
                                    degree + 1)
    return extra


def run_job(input_path: str, output_path: str | None = None, *,
            columns: io.ColumnSpec = DEFAULT_COLUMNS, batch_size: int = DEFAULT_BATCH_SIZE,
            history_path: str | None = None, track: int = 5, track_ids=None,
            resume: bool = False, progress: Callable[[int, int], None] | None = None,
            **fit_options) -> JobSummary:
    """Fit every series of a Parquet dataset; write one row per series to ``output_path``.

    ``fit_options`` are ``batchfit.fit``'s (degree, loss, f_scale, solver, lr, epochs, tol,
    device, dtype, compile). ``history_path``: also write the training history of an
    iterative solver (its loss quantiles over the batch, and the curves and initial
    parameters of ``track`` series spread over the dataset, or of ``track_ids``).
    ``resume``: keep each finished piece in a checkpoint beside the output
    (``io.Checkpoint``), and skip the pieces an earlier, interrupted run with ``resume``
    finished; the output is the same as an uninterrupted run's.
    ``progress(done, total)`` is called after each chunk.
    Raises ValueError (one line) for bad input; the outputs then do not exist (older files
    are left untouched).
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    output_path = output_path or default_output(input_path)
    io.check_writable(output_path)
    resolved = checked_options(fit_options)
    if history_path is not None:
        if resolved["solver"] == "exact":
            raise ValueError("--history needs an iterative solver (--solver gd, adam or "
                             "newton): the exact solver does not train")
        io.check_writable(history_path)
        if resume:
            raise ValueError("--resume cannot be combined with --history (the training "
                             "history is not checkpointed)")
    dataset = io.Dataset(input_path, columns)
    fit_options = {**fit_options, "compile": _compile_choice(
        fit_options.get("compile", "auto"), resolved, fit_options, dataset.num_rows,
        dataset.n_series)}
    metadata = {"version": __version__, **resolved, "input": input_path,
                "format": dataset.format,
                "columns": {"series_id": columns.series_id, "x": columns.x, "y": columns.y,
                            "weight": columns.weight if dataset.layout.has_weight else None},
                "options": {key: value for key, value in fit_options.items()
                            if not callable(value)} | {"batch_size": batch_size}}
    schema = io.output_schema(dataset.layout.id_type, job_columns(resolved), metadata)
    history = None if history_path is None else _HistoryCollector(
        dataset.n_series, dataset.layout.id_type, track, track_ids)
    checkpoint = io.Checkpoint(output_path, {"metadata": metadata, "files": dataset.stamp()}) \
        if resume else None
    counts, n_series, n_points = Counter(), 0, 0
    # Dictionary-encode only the status: trying it on float columns costs 2.5x the write time.
    with io.AtomicParquetWriter(output_path, schema, use_dictionary=["status"]) as writer:
        for chunk in dataset.chunks():
            for piece in chunk.split(batch_size):
                if checkpoint is not None and checkpoint.has(n_series, piece.n_series):
                    table = checkpoint.read(n_series, piece.n_series, schema)
                else:
                    result = _fit_chunk(piece, {**fit_options, **_position_options(
                        fit_options, history, piece, n_series, resolved["degree"])})
                    if history is not None:
                        history.add(result.history, piece, n_series)
                    table = io.result_table(piece.ids, result, schema)
                    if checkpoint is not None:
                        checkpoint.save(n_series, piece.n_series, table)
                writer.write(table)
                counts.update(io.status_counts(table))
                n_series += piece.n_series
                n_points += pc.sum(table["n_points"]).as_py() or 0
                if progress:
                    progress(n_series, dataset.n_series)
        if history is not None:
            io.write_table_atomically(history_path, history.table(job_columns(resolved), metadata))
    if checkpoint is not None:
        checkpoint.remove()
    return JobSummary(input_path, output_path, n_series, n_points, dict(counts),
                      time.perf_counter() - start, dataset.format, dataset.contiguous,
                      metadata, history_path)


def fit_table(table: pa.Table, *, columns: io.ColumnSpec = DEFAULT_COLUMNS,
              **fit_options) -> pa.Table:
    """Fit every series of an in-memory Arrow table (long or list format); one output row
    per series, in the output schema (the metadata records the options)."""
    resolved = checked_options(fit_options)
    parts, schema = [], None
    for chunk in io.table_chunks(table, columns):
        schema = schema or io.output_schema(chunk.ids.type, job_columns(resolved), resolved)
        parts.append(io.result_table(chunk.ids, _fit_chunk(chunk, fit_options), schema))
    if not parts:
        raise ValueError("empty input: the table has no rows")
    return pa.concat_tables(parts)
