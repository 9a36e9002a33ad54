"""Parquet in, Parquet out: the one module that imports pyarrow.

Reading turns a dataset (a file or a directory of files, long or list format) into a stream
of ``Chunk``s: whole series only, stored back to back as flat numpy arrays with offsets, in
a canonical point order, so a series' fit never depends on how the input was laid out.
Writing is atomic: a temporary file in the target directory, renamed into place on success.
Nothing read from a file is ever evaluated or unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .problem import STATUS_LABELS, FitResult

FORMATS = ("auto", "long", "list")
MIN_FREE_MEMORY_FACTOR = 4  # sorting an unsorted input needs about this many copies of it


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what. ``weight`` is used when present; required if ``weight_given``."""

    series_id: str = "series_id"
    x: str = "x"
    y: str = "y"
    weight: str = "weight"
    weight_given: bool = False
    format: str = "auto"


@dataclass(frozen=True)
class Chunk:
    """Whole series, back to back: series i owns ``x[offsets[i]:offsets[i + 1]]``."""

    ids: pa.Array  # one per series, the input's id type
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray | None
    offsets: np.ndarray  # int64, len(ids) + 1

    @property
    def n_series(self) -> int:
        return len(self.ids)

    def split(self, max_series: int) -> Iterator[Chunk]:
        """Pieces of at most ``max_series`` series (views, no copies)."""
        for start in range(0, self.n_series, max_series):
            stop = min(start + max_series, self.n_series)
            lo, hi = self.offsets[start], self.offsets[stop]
            yield Chunk(self.ids[start:stop], self.x[lo:hi], self.y[lo:hi],
                        None if self.w is None else self.w[lo:hi],
                        self.offsets[start:stop + 1] - lo)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _is_numeric(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _is_id(type_: pa.DataType) -> bool:
    return (pa.types.is_integer(type_) or pa.types.is_string(type_)
            or pa.types.is_large_string(type_))


def to_float(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numeric Arrow values as float32/float64 numpy, null -> NaN (float32 stays float32)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not (pa.types.is_float32(array.type) or pa.types.is_float64(array.type)):
        array = pc.cast(array, pa.float64())
    if array.null_count:
        array = pc.fill_null(array, float("nan"))
    return array.to_numpy(zero_copy_only=False)


def _list_files(path: str) -> list[str]:
    if not os.path.exists(path):
        raise ValueError(f"input not found: {path}")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if name.lower().endswith(".parquet") and name[0] not in "._"
                       and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise ValueError(f"no Parquet files (*.parquet) in directory {path}")
        return files
    return [path]


def _open(file: str) -> pq.ParquetFile:
    try:
        # pre_buffer would read every requested row group up front; stream instead.
        return pq.ParquetFile(file, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read {file} as Parquet: {_first_line(exc)}") from None


@dataclass(frozen=True)
class Layout:
    """A checked schema: its format, id type, and the columns to read."""

    spec: ColumnSpec
    format: str
    id_type: pa.DataType
    has_weight: bool

    @property
    def columns(self) -> list[str]:
        spec = self.spec
        return [spec.series_id, spec.x, spec.y] + ([spec.weight] if self.has_weight else [])


def describe(schema: pa.Schema, spec: ColumnSpec, where: str) -> Layout:
    """Check that ``schema`` (of ``where``) holds series as ``spec`` says; one-line errors."""
    if spec.format not in FORMATS:
        raise ValueError(f"unknown format {spec.format!r}; use auto, long or list")
    names = schema.names
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{where} has duplicate column names: {', '.join(duplicated)}")
    has_weight = spec.weight in names
    wanted = [spec.series_id, spec.x, spec.y] + ([spec.weight] if spec.weight_given else [])
    for column in wanted:
        if column not in names:
            raise ValueError(f"missing column {column!r} in {where} "
                             f"(columns present: {', '.join(names)})")
    is_list = _is_list(schema.field(spec.x).type)
    fmt = ("list" if is_list else "long") if spec.format == "auto" else spec.format
    if is_list != (fmt == "list"):
        raise ValueError(f"--format {fmt} does not match column {spec.x!r} of type "
                         f"{schema.field(spec.x).type} in {where}")
    id_type = schema.field(spec.series_id).type
    if not _is_id(id_type):
        raise ValueError(f"column {spec.series_id!r} must hold integers or strings, "
                         f"got {id_type}")
    for column in [spec.x, spec.y] + ([spec.weight] if has_weight else []):
        type_ = schema.field(column).type
        if fmt == "list":
            if not _is_list(type_) or not _is_numeric(type_.value_type):
                raise ValueError(f"column {column!r} must be a list of numbers in list format, "
                                 f"got {type_}")
        elif not _is_numeric(type_):
            raise ValueError(f"column {column!r} must be numeric, got {type_}")
    return Layout(spec, fmt, id_type, has_weight)


class Dataset:
    """A validated Parquet dataset of series, read as a stream of whole-series chunks."""

    def __init__(self, path: str, spec: ColumnSpec):
        self.path = path
        self.files = [(file, _open(file)) for file in _list_files(path)]
        layouts = [describe(handle.schema_arrow, spec, file) for file, handle in self.files]
        self.layout = layouts[0]
        for (file, _), layout in zip(self.files, layouts):
            if layout != self.layout:
                raise ValueError(f"{file} does not match {self.files[0][0]}: "
                                 f"{layout.format} format, ids {layout.id_type}, weights "
                                 f"{layout.has_weight} vs {self.layout.format}, "
                                 f"{self.layout.id_type}, {self.layout.has_weight}")
        self.num_rows = sum(handle.metadata.num_rows for _, handle in self.files)
        if self.num_rows == 0:
            raise ValueError(f"empty input: {path} has no rows")
        self.contiguous, self.n_series = _scan_ids(
            self._batches([spec.series_id], 1 << 20), self.layout)

    @property
    def format(self) -> str:
        return self.layout.format

    def _batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        for file, handle in self.files:
            try:
                yield from handle.iter_batches(batch_size=rows, columns=columns)
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"cannot read {file}: {_first_line(exc)}") from None

    def chunks(self, rows_per_read: int = 1 << 20) -> Iterator[Chunk]:
        """Whole-series chunks in a canonical point order (see module docstring)."""
        if self.format == "list" or self.contiguous:
            yield from _chunks(self._batches(self.layout.columns, rows_per_read), self.layout)
            return
        table = self._read_sorted()
        yield from _chunks(table.to_batches(max_chunksize=rows_per_read), self.layout)

    def _read_sorted(self) -> pa.Table:
        """Series are scattered: gather them with one in-memory sort, if memory allows."""
        need = MIN_FREE_MEMORY_FACTOR * self.num_rows * 8 * len(self.layout.columns)
        free = _available_memory()
        if free is not None and need > free:
            raise ValueError(
                f"the series in {self.path} are not grouped by "
                f"{self.layout.spec.series_id!r}; gathering them needs about "
                f"{need / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB is available: "
                "sort the input by series id first")
        tables = []
        for file, handle in self.files:
            try:
                tables.append(handle.read(columns=self.layout.columns))
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"cannot read {file}: {_first_line(exc)}") from None
        table = pa.concat_tables(tables)
        return table.take(_canonical_order(table, self.layout.spec))


def table_chunks(table: pa.Table, spec: ColumnSpec) -> Iterator[Chunk]:
    """The chunks of an in-memory table (long or list format), as ``Dataset.chunks``."""
    layout = describe(table.schema, spec, "the table")
    table = table.select(layout.columns)
    contiguous, _ = _scan_ids(table.select([spec.series_id]).to_batches(), layout)
    if layout.format == "long" and not contiguous:
        table = table.take(_canonical_order(table, spec))
    yield from _chunks(table.to_batches(), layout)


def _scan_ids(batches: Iterator[pa.RecordBatch], layout: Layout) -> tuple[bool, int]:
    """One pass over the ids: are the series contiguous, and how many are there?"""
    run_ids, last = [], None
    for batch in batches:
        ids = batch.column(0)
        if ids.null_count:
            raise ValueError(f"column {layout.spec.series_id!r} has null ids")
        if layout.format == "list":
            run_ids.append(ids)
            continue
        starts = _run_starts(ids)
        if last is not None and len(ids) and ids[0] == last:
            starts = starts[1:]  # the previous batch's last series goes on
        run_ids.append(ids.take(pa.array(starts, pa.int64())))
        if len(ids):
            last = ids[-1]
    runs = pa.chunked_array(run_ids, type=layout.id_type)
    distinct = pc.count_distinct(runs).as_py() if len(runs) else 0
    if layout.format == "list" and distinct != len(runs):
        raise ValueError(f"series ids repeat in list format ({len(runs) - distinct} "
                         "duplicates): each row must be its own series")
    return distinct == len(runs), distinct


def _chunks(batches, layout: Layout) -> Iterator[Chunk]:
    if layout.format == "list":
        for batch in batches:
            if batch.num_rows:
                yield _list_chunk(batch, layout)
    else:
        yield from _long_chunks(batches, layout)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run_starts(ids: pa.Array) -> np.ndarray:
    """Indices where a new series id begins (0 included)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    changes = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changes) + 1]).astype(np.int64)


def _canonical_order(table: pa.Table, spec: ColumnSpec) -> pa.Array:
    """Sort by (series id, x, y): equal inputs in any row order give equal sums."""
    return pc.sort_indices(table, sort_keys=[(spec.series_id, "ascending"),
                                             (spec.x, "ascending"), (spec.y, "ascending")])


def _is_canonical(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> bool:
    """Are the points of every series already sorted by (x, y)?"""
    if len(x) < 2:
        return True
    same_series = np.ones(len(x) - 1, dtype=bool)
    same_series[starts[1:] - 1] = False
    dx, dy = np.diff(x), np.diff(y)
    ordered = (dx > 0) | ((dx == 0) & (dy >= 0))
    return bool(np.all(ordered | ~same_series))


def _long_chunks(batches, layout: Layout) -> Iterator[Chunk]:
    """Contiguous long-format batches -> whole-series chunks; a series cut by a batch
    boundary is carried into the next batch."""
    spec = layout.spec
    carry = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        table = table.combine_chunks()
        ids = table.column(spec.series_id).chunk(0) if table.num_rows else None
        if ids is None:
            continue
        starts = _run_starts(ids)
        cut = int(starts[-1])  # the last series may go on in the next batch
        carry = table.slice(cut)
        if cut:
            yield _long_chunk(table.slice(0, cut), layout)
    if carry is not None and carry.num_rows:
        yield _long_chunk(carry.combine_chunks(), layout)


def _long_chunk(table: pa.Table, layout: Layout) -> Chunk:
    spec = layout.spec
    ids = table.column(spec.series_id).combine_chunks()
    starts = _run_starts(ids)
    x, y = to_float(table.column(spec.x)), to_float(table.column(spec.y))
    if not _is_canonical(x, y, starts):
        table = table.take(_canonical_order(table, spec))
        ids = table.column(spec.series_id).combine_chunks()
        x, y = to_float(table.column(spec.x)), to_float(table.column(spec.y))
    w = to_float(table.column(spec.weight)) if layout.has_weight else None
    offsets = np.append(starts, len(ids)).astype(np.int64)
    return Chunk(ids.take(pa.array(starts, pa.int64())), x, y, w, offsets)


def _list_chunk(batch: pa.RecordBatch, layout: Layout) -> Chunk:
    spec = layout.spec
    ids = batch.column(spec.series_id)
    columns = layout.columns[1:]
    lengths = [pc.fill_null(pc.list_value_length(batch.column(c)), 0).to_numpy()
               for c in columns]
    for name, other in zip(columns[1:], lengths[1:]):
        bad = np.flatnonzero(other != lengths[0])
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"series {ids[row].as_py()!r}: {spec.x!r} has {lengths[0][row]} "
                             f"values but {name!r} has {other[row]}")
    values = [to_float(pc.list_flatten(batch.column(c))) for c in columns]
    offsets = np.concatenate([[0], np.cumsum(lengths[0])]).astype(np.int64)
    return Chunk(ids, values[0], values[1], values[2] if layout.has_weight else None, offsets)


# ---------------------------------------------------------------- writing

def coefficient_columns(degree: int) -> list[tuple[str, int]]:
    """``(column name, power of x)`` in output order: a, b, c for the quadratic (y = a x^2 +
    b x + c), else p0 .. pD (p_k multiplies x^k)."""
    if degree == 2:
        return [("a", 2), ("b", 1), ("c", 0)]
    return [(f"p{k}", k) for k in range(degree + 1)]


def output_schema(id_type: pa.DataType, degree: int, metadata: dict) -> pa.Schema:
    """The contract's output columns, in order, with the ``batchfit`` metadata entry."""
    names = [name for name, _ in coefficient_columns(degree)]
    fields = [pa.field("series_id", id_type)]
    fields += [pa.field(name, pa.float64()) for name in names]
    fields += [pa.field(f"{name}_stderr", pa.float64()) for name in names]
    fields += [pa.field("n_points", pa.int64()), pa.field("loss", pa.float64()),
               pa.field("rmse", pa.float64()), pa.field("r2", pa.float64()),
               pa.field("iterations", pa.int64()), pa.field("status", pa.string())]
    return pa.schema(fields, metadata={"batchfit": json.dumps(metadata, sort_keys=True,
                                                                 default=str)})


def result_table(ids: pa.Array, result: FitResult, schema: pa.Schema) -> pa.Table:
    """One output row per series; undefined numbers (NaN) become nulls."""
    params, stderr = result.params.cpu().numpy(), result.stderr.cpu().numpy()

    def floats(values):
        return pa.array(np.asarray(values, dtype=np.float64), from_pandas=True)

    columns = {"series_id": ids}
    for name, power in coefficient_columns(result.degree):
        columns[name] = floats(params[:, power])
        columns[f"{name}_stderr"] = floats(stderr[:, power])
    columns.update(n_points=pa.array(result.n_points.cpu().numpy()),
                   loss=floats(result.loss.cpu().numpy()),
                   rmse=floats(result.rmse.cpu().numpy()), r2=floats(result.r2.cpu().numpy()),
                   iterations=pa.array(result.iterations.cpu().numpy()),
                   status=pa.array(STATUS_LABELS[result.status.cpu().numpy()], pa.string()))
    return pa.table([columns[field.name] for field in schema], schema=schema)


def check_writable(path: str):
    """Fail before any work if ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise ValueError(f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"output directory is not writable: {directory}")


def _default_permissions() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class AtomicParquetWriter:
    """Write a Parquet file table by table; it appears at ``path`` only on ``commit``.

    The data goes to a hidden temporary file in the target directory (so the final rename is
    atomic); on any failure, or if never committed, the temporary file is removed and an older
    file at ``path`` is left untouched. Use as a context manager.
    """

    def __init__(self, path: str, schema: pa.Schema):
        check_writable(path)
        self.path = path
        directory, name = os.path.split(os.path.abspath(path))
        fd, self.temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.writer = pq.ParquetWriter(self.temp, schema)
        except BaseException:
            os.unlink(self.temp)
            raise
        self.rows = 0

    def write(self, table: pa.Table):
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self):
        self.writer.close()
        os.chmod(self.temp, _default_permissions())
        os.replace(self.temp, self.path)

    def abort(self):
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.temp):
                os.unlink(self.temp)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False


def read_metadata(path: str) -> dict:
    """The ``batchfit`` metadata entry of an output file."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(b"batchfit", b"{}"))
