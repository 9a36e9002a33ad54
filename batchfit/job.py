"""A whole job, as a pipeline: read -> statistics (or whole-series chunks) -> solve -> write.

``run_job`` is what ``batchfit run`` does. MSE polynomial fits (the exact solver) are an
aggregation: the input is read once, in parallel threads, and every point is added to its
series' statistics (``batchfit.stats``) wherever it is in the input; the series are solved
at the end and written while the next ones solve. Everything else (robust losses, nonlinear
models, GD/Adam) needs each series' points together: the input is read as whole-series
chunks (``io.Dataset.chunks``) and fitted chunk by chunk. ``fit_table`` fits an in-memory
Arrow table (the unit of work of the distributed engine).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import __version__, engine, io
from .options import Options, resolve

DEFAULT_BATCH_SIZE = 100_000  # series per fit call
DEFAULT_COLUMNS = io.ColumnSpec()
HISTORY_SAMPLE = 1 << 14  # series whose loss curves make the history's quantiles
CHECKPOINT_BATCHES = 32  # --resume: keep the statistics every this many decoded batches


@dataclass(frozen=True)
class JobSummary:
    input: str
    output: str
    n_series: int
    n_points: int
    status_counts: dict
    seconds: float
    format: str
    grouped: bool  # each series' rows were together in the input
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


def job_columns(opts: Options) -> list[tuple[str, int]]:
    """(name, parameter index) of the output's coefficient columns."""
    return list(opts.columns())


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
    ``resume``: keep the finished work in a checkpoint beside the output (``io.Checkpoint``)
    and continue where an interrupted run with ``resume`` stopped; the output is the same,
    byte for byte, as an uninterrupted run's. ``progress(done, total)`` is called as series
    are written. Raises ValueError (one line) for bad input; the outputs then do not exist
    (older files are left untouched).
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    output_path = output_path or default_output(input_path)
    io.check_writable(output_path)
    io.check_apart(output_path, input_path)
    opts = resolve(**fit_options)
    if history_path is not None:
        if opts.solver == "exact":
            raise ValueError("history_path needs an iterative solver (solver gd, adam or "
                             "newton): the exact solver does not train")
        io.check_writable(history_path)
        io.check_apart(history_path, input_path, "history")
        if resume:
            raise ValueError("resume cannot be combined with history_path (the training "
                             "history is not checkpointed)")
    dataset = io.Dataset(input_path, columns)
    backend = engine.moments(opts) if opts.aggregates else None
    if not opts.aggregates or backend.uses_torch:  # (checks a device, custom model or loss)
        engine.config(opts)
        engine.resolve_device(opts.device)
    device = backend.device if backend else str(engine.resolve_device(opts.device))
    metadata = {"version": __version__, **opts.describe(device), "input": input_path,
                "format": dataset.format, "x_unit": dataset.layout.x_unit,
                "columns": {"series_id": columns.series_id, "x": columns.x, "y": columns.y,
                            "weight": columns.weight if dataset.layout.has_weight else None},
                "options": {key: value for key, value in fit_options.items()
                            if not callable(value)} | {"batch_size": batch_size}}
    schema = io.output_schema(dataset.layout.id_type, job_columns(opts), metadata,
                              restarts=bool(opts.restarts), id_name=columns.series_id)
    checkpoint = io.Checkpoint(output_path, {"metadata": metadata, "files": dataset.stamp()}) \
        if resume else None
    # Dictionary-encode only the status: trying it on float columns costs 2.5x the write time.
    with io.AtomicParquetWriter(output_path, schema, use_dictionary=["status"],
                                background=True) as writer:
        if backend is not None:
            tally = _statistics_job(dataset, opts, backend, schema, writer, batch_size,
                                    checkpoint, progress)
        else:
            tally = _points_job(dataset, opts, fit_options, schema, writer, batch_size,
                                checkpoint, progress, history_path, metadata, track, track_ids)
    if checkpoint is not None:
        checkpoint.remove()
    counts, n_series, n_points, grouped = tally
    return JobSummary(input_path, output_path, n_series, n_points, dict(counts),
                      time.perf_counter() - start, dataset.format, grouped, metadata,
                      history_path)


# ---------------------------------------------------------------- MSE: an aggregation

def _statistics_job(dataset: io.Dataset, opts: Options, backend, schema, writer,
                    batch_size: int, checkpoint, progress):
    """Read once (in parallel, in input order), gather every series' statistics wherever
    its points are, then solve and write the series in output order."""
    weighted = dataset.layout.has_weight
    codes = dataset.series_codes(unique_rows=dataset.format == "list")
    agg = backend.aggregator(weighted, dataset.point_dtype == np.float64,
                             rows=max(codes.size, 1))
    done = 0
    if checkpoint is not None:
        done = checkpoint.restore_statistics(agg, codes)
    workers = engine.usable_cpus()
    for batch in dataset.batches(codes, workers=workers, start=done):
        agg.reserve(codes.size)
        agg.add(batch.codes, batch.x, batch.y, batch.w, batch.offset, batch.series)
        done = batch.index + 1
        if checkpoint is not None and done % CHECKPOINT_BATCHES == 0:
            agg.flush()  # (an uninterrupted --resume run flushes at the same places)
            checkpoint.save_statistics(agg, codes, done)
    table = np.asarray(agg.finish(codes.size))
    present = agg.seen_codes()
    runs = agg.runs()
    grouped = runs is not None and len(runs) == len(present)
    order = runs if grouped else codes.sorted_by_id(present)
    chunks = [chunk for chunk in np.array_split(order, max(1, -(-len(order) // batch_size)))
              if len(chunk)]
    with ThreadPoolExecutor(workers) as pool:  # (the native solve releases the GIL)
        records = list(pool.map(lambda chunk: backend.solve(table[chunk], weighted), chunks))
    _refine(dataset, codes, agg, backend, table, chunks, records, weighted, workers)
    counts, n_points, written = Counter(), 0, 0
    for chunk, record in zip(chunks, records):
        writer.write(io.result_table(codes.ids(chunk), record, schema))
        counts.update(io.count_statuses(record["status"]))
        n_points += int(record["n_points"].sum())
        written += len(chunk)
        if progress:
            progress(written, len(order))
    return counts, len(order), n_points, grouped


def _refine(dataset, codes, agg, backend, table, chunks, records, weighted, workers):
    """One step of iterative refinement for the series whose sums lost digits (uneven x, or
    a residual lost to cancellation): a second pass over the input gathers their residual
    moments, and their records are replaced by the refined fits."""
    untrusted = [np.flatnonzero(~record["trusted"]) for record in records]
    if not any(len(rows) for rows in untrusted):
        return
    k = backend.opts.degree + 1
    flagged, q = np.zeros(codes.size, np.uint8), np.zeros((codes.size, k))
    for chunk, record, rows in zip(chunks, records, untrusted):
        flagged[chunk[rows]] = 1
        q[chunk[rows]] = record["q"][rows]
    moments = np.zeros((codes.size, (k + 1) * (2 if weighted else 1)))
    codes.unique_rows = False  # the second pass sees every id again
    for batch in dataset.batches(codes, workers=workers):
        agg.residual(batch.codes, batch.x, batch.y, batch.w, flagged, q, moments, batch.offset)
    for chunk, record, rows in zip(chunks, records, untrusted):
        if not len(rows):
            continue
        picked = chunk[rows]
        m = moments[picked]
        unweighted = m[:, k + 1:] if weighted else m
        step = np.concatenate([q[picked], m[:, :k + 1], unweighted], axis=1)
        refined = backend.solve(table[picked], weighted, step)
        for name, values in record.items():
            values[rows] = refined[name]


# ---------------------------------------------------------------- the other solvers

def _fit_chunk(chunk: io.Chunk, fit_options: dict):
    return engine.fit_ragged(chunk.x, chunk.y, chunk.offsets, chunk.w, **fit_options)


class _HistoryCollector:
    """Gathers the training histories of a job's fit calls into one, with the tracked
    series chosen over the whole dataset (a spread of ``track`` series, or ``track_ids``)."""

    def __init__(self, n_series: int, id_type, track: int, track_ids):
        if track < 0:
            raise ValueError(f"track must be >= 0, got {track}")
        self.n_series = n_series
        self.track_ids = None if track_ids is None else io.ids_of_type(track_ids, id_type,
                                                                       "--track-ids")
        count = min(track, n_series)
        self.spread = np.unique(np.round(np.linspace(0, n_series - 1, count)).astype(np.int64))
        self.parts, self.positions, self.ids = [], [], {}

    def options(self, piece: io.Chunk, first: int) -> dict:
        """``track`` and ``history_sample`` for the fit call of ``piece`` (series ``first``
        onwards): the sample is shared out in proportion to the series."""
        if self.track_ids is not None:
            local = io.positions_in(piece.ids, self.track_ids)
        else:
            inside = (self.spread >= first) & (self.spread < first + piece.n_series)
            local = self.spread[inside] - first
        sample = -(-HISTORY_SAMPLE * piece.n_series // self.n_series)
        return {"track": local.tolist(), "history_sample": sample}

    def add(self, history, piece: io.Chunk, first: int):
        import torch

        self.parts.append(history)
        self.positions.append(torch.arange(first, first + piece.n_series))
        local = history.tracked.numpy()
        ids = piece.ids.take(io.indices(local)).to_pylist()
        self.ids.update(zip((first + local).tolist(), ids))

    def table(self, columns: list, metadata: dict):
        from .problem import History

        history = History.merge(self.parts, self.positions)
        ids = [self.ids[position] for position in history.tracked.tolist()]
        return io.history_table(history, ids, columns, metadata)


def _position_options(fit_options: dict, history, piece: io.Chunk, first: int,
                      degree: int | None) -> dict:
    """What the fit call of ``piece`` (series ``first`` onwards) gets from its place in the
    run: random starting values by position (polynomials, GD/Adam only), and its share of
    the history."""
    extra = {} if history is None else history.options(piece, first)
    init = fit_options.get("init", "random")
    if isinstance(init, str) and init == "random" and degree is not None \
            and fit_options.get("solver") in ("gd", "adam"):
        from .solvers import random_init

        extra["init"] = random_init(fit_options.get("seed", 0), first, piece.n_series,
                                    degree + 1)
    return extra


def _points_job(dataset: io.Dataset, opts: Options, fit_options: dict, schema, writer,
                batch_size: int, checkpoint, progress, history_path, metadata, track,
                track_ids):
    history = None if history_path is None else _HistoryCollector(
        dataset.n_series, dataset.layout.id_type, track, track_ids)
    counts, n_series, n_points = Counter(), 0, 0
    calls = max(-(-dataset.n_series // batch_size), -(-dataset.num_rows // io.BATCH_ROWS))
    with engine.many_calls(calls):
        for piece, table in _fitted_pieces(dataset, fit_options, schema, batch_size,
                                           checkpoint, history, opts):
            writer.write(table)
            counts.update(io.status_counts(table))
            n_series += piece.n_series
            n_points += io.column_sum(table, "n_points")
            if progress:
                progress(n_series, dataset.n_series)
    if history is not None:
        io.write_table_atomically(history_path, history.table(job_columns(opts), metadata))
    return counts, n_series, n_points, dataset.contiguous


def _fitted_pieces(dataset, fit_options, schema, batch_size, checkpoint, history, opts):
    """Each piece of at most ``batch_size`` whole series, with its output table."""
    n_series = 0
    for chunk in dataset.chunks():
        for piece in chunk.split(batch_size):
            if checkpoint is not None and checkpoint.has(n_series, piece.n_series):
                table = checkpoint.read(n_series, piece.n_series, schema)
            else:
                result = _fit_chunk(piece, {**fit_options, **_position_options(
                    fit_options, history, piece, n_series, opts.degree)})
                if history is not None:
                    history.add(result.history, piece, n_series)
                table = io.result_table(piece.ids, result.record(), schema)
                if checkpoint is not None:
                    checkpoint.save(n_series, piece.n_series, table)
            yield piece, table
            n_series += piece.n_series


def fit_table(table, *, columns: io.ColumnSpec = DEFAULT_COLUMNS, **fit_options):
    """Fit every series of an in-memory table (long or list format): a pyarrow Table, a
    pandas or polars DataFrame, or any object with the Arrow PyCapsule stream interface;
    one output row per series, in the output schema (the metadata records the options)."""
    table = io.arrow_table(table)
    opts = resolve(**fit_options)
    parts, schema = [], None
    for chunk in io.table_chunks(table, columns):
        schema = schema or io.output_schema(chunk.ids.type, job_columns(opts),
                                            opts.describe(), restarts=bool(opts.restarts),
                                            id_name=columns.series_id)
        parts.append(io.result_table(chunk.ids, _fit_chunk(chunk, fit_options).record(),
                                     schema))
    if not parts:
        raise ValueError("empty input: the table has no rows")
    return io.concat_tables(parts)
