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
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .models import FAMILIES, MAX_TERMS, output_columns, polynomial
from .problem import STATUS_LABELS, FitResult, History

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


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _is_numeric(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    # null: a column with no values (an all-None column from pandas); every point is skipped
    return (pa.types.is_integer(type_) or pa.types.is_floating(type_)
            or pa.types.is_decimal(type_) or pa.types.is_null(type_))


def _is_list(type_: pa.DataType) -> bool:
    return (pa.types.is_list(type_) or pa.types.is_large_list(type_)
            or pa.types.is_fixed_size_list(type_))  # as pyarrow writes a 2-D numpy array


def _is_id(type_: pa.DataType) -> bool:
    return (pa.types.is_integer(type_) or pa.types.is_string(type_)
            or pa.types.is_large_string(type_))


def _decoded(type_: pa.DataType) -> pa.DataType:
    """A dictionary is an encoding, not a type: its column is read as its values."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _value_type(type_: pa.DataType) -> pa.DataType:
    """The type a value column (x, y, weight) is read as: dictionaries decoded, float16 as
    float32, and a null column (no values at all, as pandas writes an all-None column) as
    float64."""
    if _is_list(type_):
        inner = _value_type(type_.value_type)
        if inner == type_.value_type:
            return type_
        return (pa.large_list if pa.types.is_large_list(type_) else pa.list_)(inner)
    type_ = _decoded(type_)
    if pa.types.is_float16(type_):  # exact in float32, which pyarrow can sort (float16 not)
        return pa.float32()
    return pa.float64() if pa.types.is_null(type_) else type_


def _cast(data, schema: pa.Schema, id_column: str):
    """A RecordBatch or Table with its columns cast to ``schema``'s types. Values are cast
    unsafely (an int64 beyond 2**53 rounds to the nearest float64, as numpy's would); ids
    safely (a common id type that cannot hold an id is an error, not a different id)."""
    columns = [pc.cast(data.column(field.name), field.type, safe=field.name == id_column)
               for field in schema]
    return type(data).from_arrays(columns, schema=schema)


def _has_types(data, schema: pa.Schema) -> bool:
    return all(data.schema.field(field.name).type == field.type for field in schema)


def to_float(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numeric Arrow values as float32/float64 numpy, null -> NaN (float32 stays float32)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not (pa.types.is_float32(array.type) or pa.types.is_float64(array.type)):
        # unsafe: an integer beyond 2**53 rounds to the nearest float64 (as numpy would)
        # instead of failing the run
        array = pc.cast(array, pa.float64(), safe=False)
    if array.null_count:
        array = pc.fill_null(array, float("nan"))
    return array.to_numpy(zero_copy_only=False)


def list_files(path: str) -> list[str]:
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
        # pre_buffer would read every requested row group up front; stream instead. Pages
        # written with checksums (Spark's default, and batchfit's) are verified as read.
        return pq.ParquetFile(file, pre_buffer=False, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read {file} as Parquet: {first_line(exc)}") from None


@dataclass(frozen=True)
class Layout:
    """A checked schema: its format, id type, the columns to read and their read types."""

    spec: ColumnSpec
    format: str
    id_type: pa.DataType
    has_weight: bool
    types: tuple = ()  # of ``columns``, as read (see ``_decoded`` and ``_value_type``)

    @property
    def columns(self) -> list[str]:
        spec = self.spec
        return [spec.series_id, spec.x, spec.y] + ([spec.weight] if self.has_weight else [])

    def schema(self, columns: list[str] | None = None) -> pa.Schema:
        """The read schema of ``columns`` (default: all)."""
        types = dict(zip(self.columns, self.types))
        return pa.schema([(column, types[column]) for column in columns or self.columns])


def describe(schema: pa.Schema, spec: ColumnSpec, where: str) -> Layout:
    """Check that ``schema`` (of ``where``) holds series as ``spec`` says; one-line errors."""
    if spec.format not in FORMATS:
        raise ValueError(f"unknown format {spec.format!r}; use auto, long or list")
    names = schema.names
    # Only the columns read must be unambiguous; a repeated name elsewhere is not ours.
    duplicated = sorted({n for n in (spec.series_id, spec.x, spec.y, spec.weight)
                         if names.count(n) > 1})
    if duplicated:
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
    id_type = _decoded(schema.field(spec.series_id).type)
    if not _is_id(id_type):
        raise ValueError(f"column {spec.series_id!r} must hold integers or strings, "
                         f"got {id_type} (in {where})")  # which file, in a directory
    for column in [spec.x, spec.y] + ([spec.weight] if has_weight else []):
        type_ = schema.field(column).type
        if fmt == "list":
            if not _is_list(type_) or not _is_numeric(type_.value_type):
                raise ValueError(f"column {column!r} must be a list of numbers in list format, "
                                 f"got {type_} (in {where})")
        elif not _is_numeric(type_):
            raise ValueError(f"column {column!r} must be numeric, got {type_} (in {where})")
    layout = Layout(spec, fmt, id_type, has_weight)
    values = [_value_type(schema.field(column).type) for column in layout.columns[1:]]
    return Layout(spec, fmt, id_type, has_weight, (id_type, *values))


def _unified(layouts: list[Layout], files: list[str]) -> Layout:
    """One layout for the files of a dataset: the same format and weight column everywhere;
    ids of one kind (integers, or strings) read as a type that holds them all; a value
    column whose numeric type differs between files read as float64 (what it becomes
    anyway). Other differences are errors naming the two files."""
    first = layouts[0]
    for file, layout in zip(files, layouts):
        if (layout.format, layout.has_weight) != (first.format, first.has_weight):
            raise ValueError(f"{file} does not match {files[0]}: {layout.format} format, "
                             f"weights {layout.has_weight} vs {first.format} format, "
                             f"weights {first.has_weight}")
    id_type = first.id_type
    for file, layout in zip(files, layouts):
        if layout.id_type != id_type:
            try:
                id_type = pa.unify_schemas(
                    [pa.schema([("id", id_type)]), pa.schema([("id", layout.id_type)])],
                    promote_options="permissive").field("id").type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                id_type = None
            if id_type is None or not _is_id(id_type):
                raise ValueError(f"series ids are {layout.id_type} in {file} but "
                                 f"{first.id_type} in {files[0]}") from None
    types = [id_type]
    for j in range(1, len(first.types)):
        kinds = {layout.types[j] for layout in layouts}
        if len(kinds) == 1:
            types.append(first.types[j])
        elif first.format == "list":
            large = any(pa.types.is_large_list(type_) for type_ in kinds)
            types.append((pa.large_list if large else pa.list_)(pa.float64()))
        else:
            types.append(pa.float64())
    return Layout(first.spec, first.format, id_type, first.has_weight, tuple(types))


class Dataset:
    """A validated Parquet dataset of series, read as a stream of whole-series chunks."""

    def __init__(self, path: str, spec: ColumnSpec):
        self.path = path
        self.files = [(file, _open(file)) for file in list_files(path)]
        # A file without rows holds no series: it is not read, and its schema is not held
        # against the others (an empty pandas frame writes null-typed columns, say).
        self._read = [(file, handle) for file, handle in self.files
                      if handle.metadata.num_rows]
        if not self._read:
            raise ValueError(f"empty input: {path} has no rows")
        self.layout = _unified([describe(handle.schema_arrow, spec, file)
                                for file, handle in self._read],
                               [file for file, _ in self._read])
        self.num_rows = sum(handle.metadata.num_rows for _, handle in self._read)
        self.contiguous, self.n_series, self._sorted_ids = _scan_ids(
            self._batches([spec.series_id], 1 << 20), self.layout)

    @property
    def format(self) -> str:
        return self.layout.format

    def stamp(self) -> list:
        """What identifies this input's contents cheaply: each file's path, size and
        modification time (a checkpoint is only resumed on the same input)."""
        stats = [(os.path.abspath(file), os.stat(file)) for file, _ in self.files]
        return [[path, stat.st_size, stat.st_mtime_ns] for path, stat in stats]

    def _batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        """Batches of ``columns`` in the read types, file after file (a file whose types
        differ is cast, so that batches of different files concatenate)."""
        schema = self.layout.schema(columns)
        for file, handle in self._read:
            try:
                for batch in handle.iter_batches(batch_size=rows, columns=columns):
                    if not _has_types(batch, schema):
                        batch = _cast(batch, schema, self.layout.spec.series_id)
                    yield batch
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"cannot read {file}: {first_line(exc)}") from None

    def chunks(self, rows_per_read: int = 1 << 20) -> Iterator[Chunk]:
        """Whole-series chunks in a canonical point order (see module docstring)."""
        batches = self._batches(self.layout.columns, rows_per_read)
        if self.format == "long" and not self.contiguous:
            batches = self._gathered(batches, rows_per_read)
        yield from _chunks(batches, self.layout)

    def _gathered(self, batches, rows_per_read: int) -> Iterator[pa.Table]:
        """Series scattered over the input, gathered without one big sort: each batch is
        split by ranges of the (sorted) series ids into partitions of about
        ``rows_per_read`` rows, kept in memory; each partition, holding whole series, is
        then sorted on its own (small sorts stay in cache). Refused when memory is short."""
        need = MIN_FREE_MEMORY_FACTOR * sum(
            handle.metadata.num_rows * _row_bytes(handle.schema_arrow, self.layout.columns)
            for _, handle in self._read)
        free = _available_memory()
        if free is not None and need > free:
            raise ValueError(
                f"the series in {self.path} are not grouped by "
                f"{self.layout.spec.series_id!r}; gathering them needs about "
                f"{need / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB is available: "
                "sort the input by series id first")
        parts = max(1, min(len(self._sorted_ids), -(-self.num_rows // rows_per_read), 65535))
        per_part = -(-len(self._sorted_ids) // parts)
        pieces: list[list[pa.Table]] = [[] for _ in range(parts)]
        id_column = self.layout.spec.series_id
        numeric_ids = pa.types.is_integer(self.layout.id_type)
        if numeric_ids:  # partition by id ranges: a search among `parts` bounds stays in cache
            sorted_ids = self._sorted_ids.to_numpy()
            bounds_ids = sorted_ids[per_part::per_part]
            low, span = int(sorted_ids[0]), int(sorted_ids[-1]) - int(sorted_ids[0]) + 1
            dense = span <= 16 * len(sorted_ids)  # then plain arithmetic splits ids evenly
        for batch in batches:
            ids = batch.column(id_column)
            if numeric_ids and dense:
                part = (ids.to_numpy().astype(np.int64) - low) * parts // span
            elif numeric_ids:
                part = np.searchsorted(bounds_ids, ids.to_numpy(), side="right")
            else:
                part = pc.index_in(ids, value_set=self._sorted_ids).to_numpy() // per_part
            part = part.astype(np.uint16)  # small keys: numpy sorts them by radix
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(parts + 1))
            table = pa.Table.from_batches([batch]).take(pa.array(order))
            for p in np.flatnonzero(np.diff(bounds)):
                pieces[p].append(table.slice(bounds[p], bounds[p + 1] - bounds[p]))
        for p in range(parts):
            if pieces[p]:
                table = pa.concat_tables(pieces[p]).combine_chunks()
                pieces[p] = []  # free as we go
                yield table.take(_canonical_order(table, self.layout.spec))


def table_chunks(table: pa.Table, spec: ColumnSpec) -> Iterator[Chunk]:
    """The chunks of an in-memory table (long or list format), as ``Dataset.chunks``."""
    layout = describe(table.schema, spec, "the table")
    table = table.select(layout.columns)
    if not _has_types(table, layout.schema()):  # dictionaries decoded, null columns float64
        table = _cast(table, layout.schema(), spec.series_id)
    contiguous, _, _ = _scan_ids(table.select([spec.series_id]).to_batches(), layout)
    if layout.format == "long" and not contiguous:
        table = table.take(_canonical_order(table, spec))
    yield from _chunks(table.to_batches(), layout)


def _scan_ids(batches: Iterator[pa.RecordBatch], layout: Layout):
    """One pass over the ids: are the series contiguous, how many are there, and (when they
    are not contiguous) their distinct ids, sorted."""
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
    if pa.types.is_integer(layout.id_type):
        # An in-place numpy sort needs ~8 bytes per series; Arrow's hash-based distinct
        # count took ~15x that (1.5 GB for 1e7 series).
        values = np.concatenate([chunk.to_numpy() for chunk in runs.chunks]) \
            if runs.num_chunks else np.zeros(0, np.int64)
        values.sort()
        first = np.ones(len(values), dtype=bool)
        np.not_equal(values[1:], values[:-1], out=first[1:])
        distinct = int(np.count_nonzero(first))
        unique = None if distinct == len(runs) else pa.array(values[first], layout.id_type)
    else:
        distinct = pc.count_distinct(runs).as_py() if len(runs) else 0
        unique = None if distinct == len(runs) else pc.unique(runs)
        unique = unique if unique is None else unique.take(pc.sort_indices(unique))
    if layout.format == "list" and distinct != len(runs):
        raise ValueError(f"series ids repeat in list format ({len(runs) - distinct} "
                         "duplicates): each row must be its own series")
    return unique is None, distinct, unique


def _chunks(batches, layout: Layout) -> Iterator[Chunk]:
    if layout.format == "list":
        for batch in batches:
            if batch.num_rows:
                yield _list_chunk(batch, layout)
    else:
        yield from _long_chunks(batches, layout)


def _row_bytes(schema: pa.Schema, columns: list[str]) -> int:
    """Decoded bytes per row of ``columns`` (strings counted as 16)."""
    total = 0
    for column in columns:
        try:
            total += max(1, schema.field(column).type.bit_width // 8)
        except ValueError:  # variable width
            total += 16
    return total


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
    new_series = np.zeros(len(x) - 1, dtype=bool)
    new_series[starts[1:] - 1] = True
    with np.errstate(invalid="ignore"):  # inf - inf is NaN: "not sorted" (only costs a sort)
        dx = np.diff(x)
        rising = (dx > 0) | new_series
        if rising.all():  # the common case (x increasing within each series): y is not read
            return True
        dy = np.diff(y)
    return bool(np.all(rising | ((dx == 0) & (dy >= 0))))


def _long_chunks(batches, layout: Layout) -> Iterator[Chunk]:
    """Contiguous long-format batches (or tables) -> whole-series chunks; a series cut by a
    batch boundary is carried into the next batch, and the last series joins the last chunk
    (a chunk of one series would be fitted alone, and slowly)."""
    spec = layout.spec
    # carry: the pieces of the last series so far, joined only once it ends (joining them at
    # every batch copied a series of millions of points once per batch: quadratic time)
    carry, pending = [], None
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if not table.num_rows:
            continue
        table = table.combine_chunks()
        ids = table.column(spec.series_id).chunk(0)
        starts = _run_starts(ids)
        if carry:
            if ids[0] == carry[0].column(spec.series_id)[0]:
                starts = starts[1:]  # the carried series goes on in this batch
            if not len(starts):  # ... and fills it
                carry.append(table)
                continue
            starts = np.concatenate([[0], starts + sum(piece.num_rows for piece in carry)])
            table = pa.concat_tables([*carry, table]).combine_chunks()
        cut = int(starts[-1])  # the last series may go on in the next batch
        carry = [table.slice(cut)]
        if cut:
            if pending is not None:
                yield _long_chunk(*pending, layout)
            pending = (table.slice(0, cut), starts[:-1])
    if carry:
        if pending is not None:
            carry = [pending[0], *carry]
        table = pa.concat_tables(carry).combine_chunks()
        pending = (table, _run_starts(table.column(spec.series_id).chunk(0)))
    if pending is not None:
        yield _long_chunk(*pending, layout)


def _long_chunk(table: pa.Table, starts: np.ndarray, layout: Layout) -> Chunk:
    spec = layout.spec
    ids = table.column(spec.series_id).combine_chunks()
    x, y = to_float(table.column(spec.x)), to_float(table.column(spec.y))
    w = to_float(table.column(spec.weight)) if layout.has_weight else None
    offsets = np.append(starts, len(ids)).astype(np.int64)
    if not _is_canonical(x, y, starts):
        # Sort the points of each series by (x, y) and leave the series where they are:
        # sorting by id would reorder series whose ids are not ascending (grouped input
        # need not be sorted), and ``starts`` would then cut the wrong series.
        run = np.repeat(np.arange(len(starts)), np.diff(offsets))
        order = pc.sort_indices(pa.table({"run": run, "x": x, "y": y}),
                                sort_keys=[("run", "ascending"), ("x", "ascending"),
                                           ("y", "ascending")]).to_numpy()
        x, y, w = x[order], y[order], None if w is None else w[order]
    return Chunk(ids.take(pa.array(starts, pa.int64())), x, y, w, offsets)


def _list_chunk(batch: pa.RecordBatch, layout: Layout) -> Chunk:
    spec = layout.spec
    ids = batch.column(spec.series_id)
    columns = layout.columns[1:]
    lists = [batch.column(c) for c in columns]
    if any(values.null_count for values in lists):
        # A null list is a series whose every point is null: its row has no points (not a
        # length mismatch with the other lists of the row).
        valid = pc.and_(*[pc.is_valid(values) for values in lists[:2]])
        for values in lists[2:]:
            valid = pc.and_(valid, pc.is_valid(values))
        lists = [pc.if_else(valid, values, pa.scalar(None, values.type)) for values in lists]
    lengths = [pc.fill_null(pc.list_value_length(values), 0).to_numpy() for values in lists]
    for name, other in zip(columns[1:], lengths[1:]):
        bad = np.flatnonzero(other != lengths[0])
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"series {ids[row].as_py()!r}: {spec.x!r} has {lengths[0][row]} "
                             f"values but {name!r} has {other[row]}")
    values = [to_float(pc.list_flatten(values)) for values in lists]
    offsets = np.concatenate([[0], np.cumsum(lengths[0])]).astype(np.int64)
    return Chunk(ids, values[0], values[1], values[2] if layout.has_weight else None, offsets)


# ---------------------------------------------------------------- writing

def output_schema(id_type: pa.DataType, columns, metadata: dict) -> pa.Schema:
    """The contract's output columns, in order, with the ``batchfit`` metadata entry.
    ``columns``: the model's ``(name, parameter index)`` (``models.output_columns``)."""
    names = [name for name, _ in columns]
    fields = [pa.field("series_id", id_type)]
    fields += [pa.field(name, pa.float64()) for name in names]
    fields += [pa.field(f"{name}_stderr", pa.float64()) for name in names]
    fields += [pa.field("n_points", pa.int64()), pa.field("loss", pa.float64()),
               pa.field("rmse", pa.float64()), pa.field("r2", pa.float64()),
               pa.field("iterations", pa.int64()), pa.field("status", pa.string())]
    return pa.schema(fields, metadata={"batchfit": json.dumps(metadata, sort_keys=True,
                                                                 default=str)})


def status_counts(table: pa.Table) -> dict[str, int]:
    """Series per status in an output table, in the order of ``Status``."""
    counts = {entry["values"]: entry["counts"]
              for entry in pc.value_counts(table["status"]).to_pylist()}
    return {label: counts[label] for label in STATUS_LABELS if label in counts}


def result_table(ids: pa.Array, result: FitResult, schema: pa.Schema) -> pa.Table:
    """One output row per series; undefined numbers (NaN) become nulls."""
    params, stderr = result.params.cpu().numpy(), result.stderr.cpu().numpy()

    def floats(values):
        return pa.array(np.asarray(values, dtype=np.float64), from_pandas=True)

    columns = {"series_id": ids}
    for name, power in output_columns(result.output_model):
        columns[name] = floats(params[:, power])
        columns[f"{name}_stderr"] = floats(stderr[:, power])
    columns.update(n_points=pa.array(result.n_points.cpu().numpy()),
                   loss=floats(result.loss.cpu().numpy()),
                   rmse=floats(result.rmse.cpu().numpy()), r2=floats(result.r2.cpu().numpy()),
                   iterations=pa.array(result.iterations.cpu().numpy()),
                   status=pa.array(STATUS_LABELS[result.status.cpu().numpy()], pa.string()))
    return pa.table([columns[field.name] for field in schema], schema=schema)


def check_writable(path: str, directory_output: bool = False):
    """Fail before any work if ``path`` (a file, or with ``directory_output`` a directory of
    files that will replace any existing one) cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not directory_output:
        raise ValueError(f"output {path} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise ValueError(f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"output directory is not writable: {directory}")


def _default_permissions() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: str) -> str:
    """A new hidden temporary file ``.NAME.PID.XXXX.tmp`` beside ``path``, after removing the
    ones a killed run (a PID no longer alive on this machine) left behind."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    for entry in os.listdir(directory):
        pid = entry[len(prefix):].split(".")[0]
        if entry.startswith(prefix) and entry.endswith(".tmp") and pid.isdigit() \
                and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:  # gone already, or not ours to remove
                pass
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return temp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class AtomicParquetWriter:
    """Write a Parquet file table by table; it appears at ``path`` only on ``commit``.

    The data goes to a hidden temporary file in the target directory (so the final rename is
    atomic); on any failure, or if never committed, the temporary file is removed and an older
    file at ``path`` is left untouched. Small tables are buffered into row groups of about
    ``ROW_GROUP`` rows (a row group per small write would make writing, and later reading,
    slow). Use as a context manager.
    """

    ROW_GROUP = 1 << 17

    def __init__(self, path: str, schema: pa.Schema, use_dictionary=True):
        check_writable(path)
        self.path = path
        self.temp = _temp_beside(path)
        try:
            self.writer = pq.ParquetWriter(self.temp, schema, use_dictionary=use_dictionary,
                                           write_page_checksum=True)
        except BaseException:
            os.unlink(self.temp)
            raise
        self.rows = 0
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write(self, table: pa.Table):
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.ROW_GROUP:
            self._flush()

    def _flush(self):
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=1 << 20)
            self.pending, self.pending_rows = [], 0

    def commit(self):
        self._flush()
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


# ---------------------------------------------------------------- training history

HISTORY_QUANTILE_COLUMNS = ["loss_p05", "loss_p25", "loss_median", "loss_p75", "loss_p95"]


def history_table(history: History, tracked_ids: list, coefficients: list[tuple[str, int]],
                  metadata: dict) -> pa.Table:
    """A history as one wide table: ``epoch``, the batch's loss quantiles, and a
    ``loss_series_<id>`` column per tracked series; tracked series' initial parameters and
    the run's options go in the ``batchfit_history`` metadata entry."""
    quantiles = history.loss_quantiles.numpy()
    columns = {"epoch": pa.array(history.epochs.numpy(), pa.int64())}
    for j, name in enumerate(HISTORY_QUANTILE_COLUMNS):
        columns[name] = pa.array(quantiles[:, j], from_pandas=True)
    tracked = []
    initial = history.tracked_initial_params.numpy()
    for j, series_id in enumerate(tracked_ids):
        column = f"loss_series_{series_id}"
        columns[column] = pa.array(history.tracked_loss[:, j].numpy().astype(np.float64),
                                   from_pandas=True)
        tracked.append({"series_id": series_id, "column": column,
                        "initial": {name: float(initial[j, power])
                                    for name, power in coefficients}})
    entry = {**metadata, "tracked": tracked, "sampled_series": int(history.sample_loss.shape[1])}
    schema = pa.table(columns).schema.with_metadata(
        {"batchfit_history": json.dumps(entry, sort_keys=True, default=str)})
    return pa.table(columns, schema=schema)


class Checkpoint:
    """The finished pieces of a run, kept so that a rerun with ``--resume`` continues it.

    A hidden directory beside the output, ``.NAME.resume/``, holds ``job.json`` (what the
    job is: its input files with their sizes and modification times, and its options) and a
    Parquet file per finished piece, ``part-FIRST-COUNT.parquet`` (FIRST: the position of the
    piece's first series in the run). Each part is written to a temporary name and renamed,
    so a killed run leaves only whole parts; the job removes the directory once the output
    is in place.
    """

    def __init__(self, output_path: str, job: dict):
        directory, name = os.path.split(os.path.abspath(output_path))
        self.directory = os.path.join(directory, f".{name}.resume")
        manifest = os.path.join(self.directory, "job.json")
        job = json.loads(json.dumps(job, sort_keys=True, default=str))
        if os.path.exists(manifest):
            with open(manifest) as handle:
                try:
                    same = json.load(handle) == job
                except ValueError:  # a manifest cut short: nothing in there can be trusted
                    same = False
            if not same:
                raise ValueError(f"{self.directory} holds checkpoints of a different job (the "
                                 "input or the options changed); delete it, or run without "
                                 "--resume")
        else:
            os.makedirs(self.directory, exist_ok=True)
            temp = manifest + f".{os.getpid()}.tmp"
            with open(temp, "w") as handle:
                json.dump(job, handle, sort_keys=True)
            os.replace(temp, manifest)
        self.parts = {}
        for entry in os.listdir(self.directory):
            fields = entry.split(".")[0].split("-")
            if entry.endswith(".parquet") and len(fields) == 3 and fields[0] == "part":
                self.parts[int(fields[1]), int(fields[2])] = os.path.join(self.directory, entry)

    def has(self, first: int, count: int) -> bool:
        return (first, count) in self.parts

    def save(self, first: int, count: int, table: pa.Table):
        path = os.path.join(self.directory, f"part-{first:012d}-{count:09d}.parquet")
        temp = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, temp)
        os.replace(temp, path)
        self.parts[first, count] = path

    def read(self, first: int, count: int, schema: pa.Schema) -> pa.Table:
        try:
            table = pq.read_table(self.parts[first, count], schema=schema)
        except (pa.ArrowException, OSError):
            table = None
        if table is None or table.num_rows != count:
            raise ValueError(f"checkpoint {self.parts[first, count]} is damaged; delete "
                             f"{self.directory} and run again")
        return table

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


def write_table_atomically(path: str, table: pa.Table):
    with AtomicParquetWriter(path, table.schema) as writer:
        writer.write(table)


def read_history(path: str) -> tuple[pa.Table, dict]:
    """A history file written by ``batchfit run --history``: its table and metadata."""
    table = read_parquet(path)
    metadata = (table.schema.metadata or {}).get(b"batchfit_history")
    if metadata is None or "epoch" not in table.column_names:
        raise ValueError(f"{path} is not a batchfit history file")
    meta = _json_object(metadata)
    tracked = meta.get("tracked", [])
    if not isinstance(tracked, list) or not all(
            isinstance(t, dict) and "series_id" in t and isinstance(t.get("column"), str)
            and isinstance(t.get("initial"), dict)
            and all(isinstance(v, int | float) for v in t["initial"].values()) for t in tracked):
        raise ValueError(f"{path} has malformed batchfit_history metadata")
    return table, meta


def _json_object(text: bytes) -> dict:
    """A JSON object from file metadata (only ever parsed as JSON, never run); {} otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_parquet(path: str, columns=None, filters=None) -> pa.Table:
    """A whole (small) Parquet file or directory as one table."""
    tables = []
    for file in list_files(path):
        try:
            tables.append(pq.read_table(file, columns=columns, filters=filters))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {file}: {first_line(exc)}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_coefficients(path: str) -> tuple[pa.Table, dict]:
    """An output file of ``batchfit run``: its table and ``batchfit`` metadata."""
    table = read_parquet(path)
    names = table.column_names
    if "status" not in names or "series_id" not in names:
        raise ValueError(f"{path} is not a batchfit coefficients file")
    meta = _json_object((table.schema.metadata or {}).get(b"batchfit", b"{}"))
    # The metadata may only name a built-in family; the columns must then be there.
    family = FAMILIES.get(meta.get("model")) if isinstance(meta.get("model"), str) else None
    if family is not None and all(name in names for name, _ in output_columns(family)):
        return table, {**meta, "model": family.name, "degree": None,
                       "columns": list(output_columns(family))}
    degree = next((d for d in range(MAX_TERMS - 1, -1, -1)
                   if all(name in names for name, _ in polynomial(d).columns)), None)
    if degree is not None:
        return table, {**meta, "model": "poly", "degree": degree,
                       "columns": list(polynomial(degree).columns)}
    stated = meta.get("param_columns")  # a custom model: its columns, if really there
    if isinstance(stated, list) and stated and all(
            isinstance(name, str) and name in names for name in stated):
        return table, {**meta, "model": None, "degree": None,
                       "columns": [(name, i) for i, name in enumerate(stated)]}
    raise ValueError(f"{path} has no coefficient columns")


def read_series(path: str, ids: list, spec: ColumnSpec) -> dict:
    """The points of the given series of a dataset, as {id: (x, y)} float64 arrays in
    canonical order (reads only row groups that can hold them)."""
    if not ids:
        return {}
    first = _open(list_files(path)[0])
    layout = describe(first.schema_arrow, spec, path)
    table = read_parquet(path, columns=layout.columns[:3],
                        filters=[(spec.series_id, "in", list(ids))])
    found = {}
    for chunk in table_chunks(table, ColumnSpec(spec.series_id, spec.x, spec.y,
                                                format=layout.format)):
        for i, series_id in enumerate(chunk.ids.to_pylist()):
            lo, hi = chunk.offsets[i], chunk.offsets[i + 1]
            found[series_id] = (chunk.x[lo:hi].astype(np.float64),
                                chunk.y[lo:hi].astype(np.float64))
    return found
