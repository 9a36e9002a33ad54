"""A whole job, as a pipeline: read -> statistics (or whole-series chunks) -> solve -> write.

``run_job`` is what ``batchfit run`` does. MSE polynomial fits (the exact solver) are an
aggregation: the input is read once, in parallel threads, and every point is added to its
series' statistics (``batchfit.fitting.moment_twin``) wherever it is in the input; the series are solved
at the end and written while the next ones solve. Everything else (robust losses, nonlinear
models, GD/Adam) needs each series' points together: the input is read as whole-series
chunks (``io.Dataset.chunks``) and fitted chunk by chunk. ``fit_table`` fits an in-memory
Arrow table (the unit of work of the distributed engine).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from batchfit import engine, io
from batchfit.core.names import DERIVED_COLUMNS
from batchfit.core.options import Options, resolve
from batchfit.moments import degrees
from batchfit.moments import layout as moments
from batchfit.moments.covariance import covariance
from batchfit.pipeline.metadata import job_metadata

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
    """``data.parquet`` (or ``data.csv``, ``data.feather``, ...) -> ``data.coeffs.parquet``;
    a directory ``data/`` -> ``data.coeffs.parquet`` beside it."""
    path = path.rstrip("/") if io.storage.is_remote(path) else os.path.normpath(path)
    ends = [end for ends in io.EXTENSIONS.values() for end in ends
            if path.lower().endswith(end)]
    stem = path[: -len(max(ends, key=len))] if ends else path
    return f"{stem}.coeffs.parquet"


def job_schema(opts: Options, id_type, metadata: dict, id_name: str):
    """The output schema of a job with these options (``io.output_schema``; a model
    choice's: ``io.choice_schema``)."""
    if opts.candidates is not None:
        return io.choice_schema(id_type, opts.candidate_params(), metadata, id_name=id_name)
    return io.output_schema(id_type, list(opts.columns()), metadata,
                            restarts=bool(opts.restarts), id_name=id_name,
                            frame=opts.is_poly, degrees=opts.auto_degree,
                            derived=DERIVED_COLUMNS.get(opts.family, ()),
                            covariance=opts.covariance)


def run_job(input_path: str, output_path: str | None = None, *,
            columns: io.ColumnSpec = DEFAULT_COLUMNS, batch_size: int = DEFAULT_BATCH_SIZE,
            history_path: str | None = None, track: int = 5, track_ids=None,
            resume: bool = False, progress: Callable[[int, int], None] | None = None,
            input_format: str = "auto", storage_options: dict[str, str] | None = None,
            **fit_options) -> JobSummary:
    """Fit every series of a dataset (a Parquet, CSV or Arrow IPC file, or a directory of
    them); write one row per series to ``output_path``. ``input_format``: auto (each file
    by its extension, else its first bytes), parquet, csv or ipc. Any path may be a URI of
    a store (``s3://bucket/key``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``; a
    prefix is a directory), reached with ``storage_options`` (``io.storage``).

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
    (input_path, output_path, history_path), options = io.split_paths(
        [input_path, output_path, history_path], storage_options)
    with io.storage.using(options):
        return _run_job(input_path, output_path, columns, batch_size, history_path, track,
                        track_ids, resume, progress, input_format, fit_options)


def check_x_columns(opts: Options, columns: io.ColumnSpec) -> None:
    """Several x columns need a model: the polynomial (and its statistics path) is 1-D."""
    if len(columns.x_columns) > 1 and opts.is_poly:
        raise ValueError(f"x has {len(columns.x_columns)} columns "
                         f"({', '.join(columns.x_columns)}) but the polynomial takes one; fit "
                         "x with several columns with a model (--model)")


def _run_job(input_path, output_path, columns, batch_size, history_path, track, track_ids,
             resume, progress, input_format, fit_options) -> JobSummary:
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    output_path = output_path or default_output(input_path)
    io.check_writable(output_path)
    io.check_apart(output_path, input_path)
    opts = resolve(**fit_options)
    check_x_columns(opts, columns)
    if history_path is not None:
        if opts.solver == "exact":
            raise ValueError("history_path needs an iterative solver (solver gd, adam or "
                             "newton): the exact solver does not train")
        io.check_writable(history_path, what="history")
        io.check_apart(history_path, input_path, "history")
        if io.same_file(history_path, output_path):
            raise ValueError(f"history {history_path} is also the output; give them two "
                             "names")
        if resume:
            raise ValueError("resume cannot be combined with history_path (the training "
                             "history is not checkpointed)")
        if opts.candidates is not None:
            raise ValueError("history_path records one model's training; a model choice "
                             "fits several")
    dataset = io.Dataset(input_path, columns, input_format)
    backend = engine.moment_backend(opts) if opts.aggregates else None
    if not opts.aggregates or backend.uses_torch:  # (checks a device, custom model or loss)
        engine.config(opts)
        engine.resolve_device(opts.device)
    device = backend.device if backend else str(engine.resolve_device(opts.device))
    metadata = job_metadata(opts, input_path, dataset.layout, dataset.file_format, columns,
                            fit_options, engine="local", device=device,
                            batch_size=batch_size)
    schema = job_schema(opts, dataset.layout.id_type, metadata, columns.series_id)
    checkpoint = io.Checkpoint(output_path, {"metadata": metadata, "files": dataset.stamp()}) \
        if resume else None
    try:
        # Dictionary-encode only the status: on float columns it costs 2.5x the write time.
        with io.AtomicParquetWriter(output_path, schema, use_dictionary=["status"],
                                    background=True, final=True) as writer:
            if backend is not None:
                tally = _statistics_job(dataset, opts, backend, schema, writer, batch_size,
                                        checkpoint, progress)
            else:
                tally = _points_job(dataset, opts, fit_options, schema, writer, batch_size,
                                    checkpoint, progress, history_path, metadata, track,
                                    track_ids)
    except Exception:  # (bad input: a rerun would fail alike; an interrupt keeps its work)
        if checkpoint is not None:
            checkpoint.remove()
        raise
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
    codes = dataset.series_codes(unique_rows=dataset.format == "list",
                                  degree=opts.degree)
    agg = backend.aggregator(weighted, dataset.point_dtype == np.float64,
                             rows=max(codes.size, 1))
    done = 0
    if checkpoint is not None:
        done = checkpoint.restore_statistics(agg, codes)
    workers = engine.usable_cpus()
    gather_statistics(dataset, codes, agg, workers=workers, start=done, checkpoint=checkpoint)
    chunks, records, order, grouped = _fits_of_gathered(dataset, codes, agg, backend,
                                                        weighted, batch_size, workers)
    counts, n_points, written = Counter(), 0, 0
    for chunk, record in zip(chunks, records):
        writer.write(io.result_table(codes.ids(chunk), record, schema))
        counts.update(io.count_statuses(record["status"]))
        n_points += int(record["n_points"].sum())
        written += len(chunk)
        if progress:
            progress(written, len(order))
    return counts, len(order), n_points, grouped


def gather_statistics(dataset, codes, agg, *, workers: int = 1, start: int = 0,
                      checkpoint=None) -> int:
    """Add the points of ``dataset``'s batches (from batch ``start``) to ``agg``, their series
    coded by ``codes``; ``checkpoint``: keep the statistics every CHECKPOINT_BATCHES batches.
    Returns the input rows read (points; in list format series)."""
    rows, done = 0, start
    for batch in dataset.batches(codes, workers=workers, start=start):
        agg.reserve(codes.size)
        agg.add(batch.codes, batch.x, batch.y, batch.w, batch.offset, batch.series)
        rows += len(batch.codes) if batch.series is None else len(batch.series)
        done = batch.index + 1
        if checkpoint is not None and done % CHECKPOINT_BATCHES == 0:
            agg.flush()  # (an uninterrupted --resume run flushes at the same places)
            checkpoint.save_statistics(agg, codes, done)
    return rows


def _fits_of_gathered(dataset, codes, agg, backend, weighted: bool, batch_size: int,
                      workers: int):
    """The fits of the series whose statistics ``agg`` gathered from ``dataset`` (refined
    where the sums lost digits): (chunks of table rows, their records, the rows in output
    order, whether each series' rows were together in the input). Output order is input
    order when they were, else by id."""
    table = np.asarray(agg.finish(codes.size))
    present = agg.seen_codes()
    runs = agg.runs()
    grouped = runs is not None and len(runs) == len(present)
    order = runs if grouped else codes.sorted_by_id(present)
    chunks, records = solve_statistics(backend, table, order, weighted, batch_size, workers)
    _refine(dataset, codes, agg, backend, table, chunks, records, weighted, workers)
    add_covariance(backend, table, chunks, records)
    return chunks, records, order, grouped


def add_covariance(backend, table, chunks, records):
    """With ``covariance``, each (refined) record's covariance from its rows' statistics
    (``moments.covariance``), in place."""
    if backend.opts.covariance:
        for chunk, record in zip(chunks, records):
            record["covariance"] = covariance(table[chunk], record)


def solve_statistics(backend, table, order: np.ndarray, weighted: bool, batch_size: int,
                     workers: int = 1) -> tuple[list, list]:
    """The fits of the rows ``order`` of a statistics table, in chunks of at most
    ``batch_size``: (chunks of row numbers, their records), ``workers`` chunks at a time."""
    chunks = [chunk for chunk in np.array_split(order, max(1, -(-len(order) // batch_size)))
              if len(chunk)]
    if workers <= 1:
        return chunks, [backend.fits(table[chunk], weighted) for chunk in chunks]
    with ThreadPoolExecutor(workers) as pool:  # (the native solve releases the GIL)
        return chunks, list(pool.map(lambda chunk: backend.fits(table[chunk], weighted),
                                     chunks))


def _refine(dataset, codes, agg, backend, table, chunks, records, weighted, workers):
    """Refine the untrusted rows (``untrusted_rows``): a second pass over the input gathers
    their residual moments, then ``refine_untrusted``."""
    untrusted = untrusted_rows(chunks, records)
    if not untrusted:
        return
    k = backend.opts.degree + 1
    flagged, q = np.zeros(codes.size, np.uint8), np.zeros((codes.size, k))
    flagged[untrusted.picked], q[untrusted.picked] = 1, untrusted.q
    moments = np.zeros((codes.size, (k + 1) * (2 if weighted else 1)))
    codes.unique_rows = False  # the second pass sees every id again
    for batch in dataset.batches(codes, workers=workers):
        agg.residual(batch.codes, batch.x, batch.y, batch.w, flagged, q, moments, batch.offset)
    refine_untrusted(backend, table, chunks, records, untrusted, moments[untrusted.picked],
                     weighted)


@dataclass(frozen=True)
class Untrusted:
    """The rows of solved chunks of a statistics table whose solve is not trusted: their
    sums lost digits (uneven x, or a residual lost to cancellation), so their fits are
    refined from the residual moments of their points (``refine_untrusted``)."""

    rows: list  # per chunk, the rows of its record
    picked: np.ndarray  # their table rows, chunk after chunk
    q: np.ndarray  # their Chebyshev coefficients, in the order of ``picked``

    def __bool__(self) -> bool:
        return bool(len(self.picked))


def untrusted_rows(chunks, records) -> Untrusted:
    """The untrusted rows of each chunk's record (``solve_statistics``'s chunks and
    records)."""
    rows = [np.flatnonzero(~record["trusted"]) for record in records]
    if not rows:
        return Untrusted(rows, np.zeros(0, np.int64), np.zeros((0, 0)))
    picked = np.concatenate([chunk[at] for chunk, at in zip(chunks, rows)]).astype(np.int64)
    q = np.concatenate([np.asarray(record["q"], np.float64)[at]
                        for record, at in zip(records, rows)])
    return Untrusted(rows, picked, q)


def refine_untrusted(backend, table, chunks, records, untrusted: Untrusted,
                     moments: np.ndarray, weighted: bool):
    """One step of iterative refinement: replace the untrusted rows of each chunk's record
    (in place) by fits from the residual moments of their points, ``moments`` (one row per
    untrusted row, in the order of ``untrusted.picked``), wherever they were gathered."""
    k = backend.opts.degree + 1
    bounds = np.cumsum([0] + [len(rows) for rows in untrusted.rows])
    for chunk, record, rows, lo, hi in zip(chunks, records, untrusted.rows, bounds[:-1],
                                           bounds[1:]):
        if not len(rows):
            continue
        q, m = untrusted.q[lo:hi], moments[lo:hi]
        chosen = record.get("degrees", np.full(len(record["status"]), k - 1))[rows]
        for degree in np.unique(chosen):  # (one degree unless it is chosen per series)
            mine = chosen == degree
            at = rows[mine]
            refined = backend.solve(
                degrees.truncated(table[chunk[at]], k - 1, weighted, int(degree)), weighted,
                _step(q[mine], m[mine], k, int(degree), weighted), degree=int(degree))
            if "degrees" in record:
                refined = degrees.padded(refined, int(degree), k - 1)
            for name, values in record.items():
                values[at] = refined[name]


def _step(q: np.ndarray, m: np.ndarray, k: int, degree: int, weighted: bool) -> np.ndarray:
    """A refinement step for a fit of ``degree`` from the residual moments of degree k - 1
    (per block: sum w r T_0 .. T_{k-1}, sum w r^2): q0, sum w r T_j, sum w r^2, and the same
    unweighted."""
    blocks = [m[:, :k + 1], m[:, k + 1:]] if weighted else [m, m]
    return np.concatenate([q[:, :degree + 1]] + [piece for block in blocks for piece in (
        block[:, :degree + 1], block[:, k:k + 1])], axis=1)


# ---------------------------------------------------------------- MSE in parts (Ray engine)
# A dataset's batches shared out among workers (``share_out``); each worker gathers the
# statistics of its part (``part_statistics``) as the job above does; rows of one series from
# several parts merge exactly (``merge_statistics``), and are solved and refined as above.


class DatasetPart:
    """Some of a dataset's batches, read as ``io.Dataset.batches`` reads the whole: pieces
    (file, first batch, stop batch or None for the file's end), each file its own
    ``io.Dataset``, coded by one ``SeriesCodes`` made for the whole dataset."""

    def __init__(self, pieces: list, columns: io.ColumnSpec, input_format: str = "auto"):
        self.pieces, self.columns, self.input_format = pieces, columns, input_format

    def batches(self, codes, *, workers: int = 1, start: int = 0):
        if start:
            raise ValueError("a dataset part is read from its start (a bug in batchfit)")
        for file, first, stop in self.pieces:
            dataset = io.Dataset(file, self.columns, self.input_format)
            for batch in dataset.batches(codes, workers=workers, start=first):
                if stop is not None and batch.index >= stop:
                    break
                yield batch


def share_out(dataset: io.Dataset, count: int) -> list[list[tuple]]:
    """``dataset``'s batches in at most ``count`` contiguous parts of about equal rows, each
    a list of ``DatasetPart`` pieces. A file whose batches are counted before reading it
    (Parquet: by row groups) may be cut between batches; any other is read whole."""
    atoms, counts = [], {}  # (file, batch or None for the whole file, rows); batches per file
    for file, source in dataset.files:
        if not source.has_rows:
            continue
        parts = [n for _, n in source.units(io.BATCH_ROWS, dataset.layout)]
        if source.num_rows is None or None in parts:
            atoms.append((file, None, os.path.getsize(file)))  # (bytes: rows unknown)
        else:
            counts[file] = sum(parts)
            atoms += [(file, i, source.num_rows / counts[file]) for i in range(counts[file])]
    total = np.cumsum([rows for _, _, rows in atoms])
    cuts = np.searchsorted(total, total[-1] * np.arange(1, count) / count) + 1
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, len(atoms)), [len(atoms)]]))
    shares = []
    for lo, hi in itertools.pairwise(bounds):
        pieces = []  # [file, first batch, stop batch]
        for file, index, _ in atoms[lo:hi]:
            if index is not None and pieces and pieces[-1][0] == file:
                pieces[-1][2] = index + 1
            else:
                pieces.append([file, index or 0, None if index is None else index + 1])
        shares.append([(file, first, None if stop == counts.get(file) else stop)
                       for file, first, stop in pieces])  # (to its end: however it counts)
    return shares


def part_statistics(part, codes, backend, weighted: bool, double: bool):
    """The statistics of the series in a part of a dataset, gathered as ``run_job`` gathers
    them: (codes present, the table by code, rows in their exact frames; input rows read,
    points used)."""
    agg = backend.aggregator(weighted, double, rows=max(codes.size, 1))
    rows = gather_statistics(part, codes, agg)
    table = np.asarray(agg.finish(codes.size))  # (first: buffered points mark their series)
    present = agg.seen_codes()
    points = int(table[:, moments.NPTS].sum())
    if int(table[present, moments.NPTS].sum()) != points:
        raise RuntimeError("points of series not marked present: they would be lost (a bug)")
    return present, table, rows, points


def fit_part(part, codes, backend, weighted: bool, double: bool, batch_size: int):
    """The fits of a part of a dataset whose series are whole within it (list format), as
    ``run_job`` makes them (refinement included): (series codes per chunk, records, input
    rows read)."""
    agg = backend.aggregator(weighted, double, rows=max(codes.size, 1))
    rows = gather_statistics(part, codes, agg)
    chunks, records, _, _ = _fits_of_gathered(part, codes, agg, backend, weighted, batch_size,
                                              workers=1)
    return chunks, records, rows


def merge_statistics(rows_of_parts: list, tables: list, n: int, backend,
                     weighted: bool) -> np.ndarray:
    """One statistics table of ``n`` series from tables of parts: part j's rows belong to
    series ``rows_of_parts[j]`` (each at most once per part); merged in part order."""
    table = moments.new_table(n, backend.opts.degree, weighted)
    for rows, part in zip(rows_of_parts, tables):
        table[rows] = backend.merge(table[rows], np.ascontiguousarray(part, dtype=np.float64),
                                    weighted)
    return table


def residual_moments(part, codes, backend, ids, table, q, weighted: bool,
                     double: bool) -> np.ndarray:
    """The residual moments that ``_refine`` gathers, over a part of a dataset, for the
    series ``ids`` (their merged statistics ``table`` and Chebyshev coefficients ``q``):
    one row per series, to be added over the parts."""
    k = backend.opts.degree + 1
    flagged, _ = codes.encode(codes.prepare(ids))  # (hashed codes: 0, 1, ... in this order)
    slot = np.full(codes.size, -1, np.int64)
    slot[np.asarray(flagged) - codes.offset] = np.arange(len(ids))
    agg = backend.aggregator(weighted, double, rows=max(len(ids), 1))
    agg.load_state({"table": np.array(table, dtype=np.float64),
                    "seen": np.ones(len(ids), np.uint8), "last": -1, "nruns": 0,
                    "runlist": np.zeros(0, np.int64), "scattered": True})
    out = np.zeros((len(ids), (k + 1) * (2 if weighted else 1)))
    every, q = np.ones(len(ids), np.uint8), np.ascontiguousarray(q, dtype=np.float64)
    for batch in part.batches(codes):
        local = batch.codes - batch.offset
        inside = local < len(slot)
        local = np.where(inside, slot[np.where(inside, local, 0)], -1)
        keep = local >= 0
        if keep.any():
            agg.residual(local[keep], batch.x[keep], batch.y[keep],
                         None if batch.w is None else batch.w[keep], every, q, out)
    return out


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

        if history is None:  # (a piece whose series have no points: nothing was trained)
            return
        self.parts.append(history)
        self.positions.append(torch.arange(first, first + piece.n_series))
        local = history.tracked.numpy()
        ids = piece.ids.take(io.indices(local)).to_pylist()
        self.ids.update(zip((first + local).tolist(), ids))

    def table(self, columns: list, metadata: dict):
        from batchfit.fitting.data import History

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
        from batchfit.fitting.solvers import random_init

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
        io.write_table_atomically(history_path, history.table(list(opts.columns()), metadata))
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
        schema = schema or job_schema(opts, chunk.ids.type, opts.describe(),
                                      columns.series_id)
        parts.append(io.result_table(chunk.ids, _fit_chunk(chunk, fit_options).record(),
                                     schema))
    if not parts:
        raise ValueError("empty input: the table has no rows")
    return io.concat_tables(parts)
