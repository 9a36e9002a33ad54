"""A dataset of series (a Parquet, CSV or Arrow IPC file, or a directory of them), checked
once and read as often as a job needs. Two ways to read, for two kinds of solver:

* ``Dataset.batches`` (the aggregation path of MSE polynomial fits): row groups (of a CSV
  or IPC input: its files) decoded in parallel threads (pyarrow releases the GIL), handed
  over in input order as flat numpy arrays with each point's series code (``SeriesCodes``).
  Nothing is sorted or gathered: a series may be spread anywhere.
* ``Dataset.chunks`` (solvers that need each series' points together: robust losses,
  nonlinear models, GD/Adam): whole series back to back, in a canonical point order, so that
  a series' fit never depends on how the input is laid out; scattered series are gathered
  in memory, or refused when memory is short.

``read_series`` reads a few series of a dataset (for plots)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from batchfit.core.names import MAX_DEGREE
from batchfit.io import storage
from batchfit.io.chunks import Chunk, canonical_order, scan_ids, table_chunks, whole_series
from batchfit.io.decode import Batch, decode
from batchfit.io.in_memory import ids_of_type
from batchfit.io.listing import dataset_files
from batchfit.io.ordered_pool import ordered_streams
from batchfit.io.schema import (
    ColumnSpec,
    cast_to,
    describe,
    first_line,
    has_types,
    is_list_type,
    is_temporal,
    unified,
)
from batchfit.io.series_codes import DenseCodes, HashedCodes, SeriesCodes, dense_row_bytes
from batchfit.io.sources import BATCH_ROWS, open_source

MIN_FREE_MEMORY_FACTOR = 4  # sorting an unsorted input needs about this many copies of it


class Dataset:
    """A validated dataset of series (a Parquet, CSV or Arrow IPC file, or a directory of
    them), read as a stream of decoded batches or of whole-series chunks."""

    def __init__(self, path: str, spec: ColumnSpec, input_format: str = "auto"):
        self.path = path
        self.files = [(file, open_source(file, kind, spec))
                      for file, kind in dataset_files(path, input_format)]
        # A file without rows holds no series: it is not read, and its schema is not held
        # against the others (an empty pandas frame writes null-typed columns, say).
        self._read = [(file, source) for file, source in self.files if source.has_rows]
        if not self._read:
            raise ValueError(f"empty input: {path} has no rows")
        self.layout = unified([describe(source.schema_arrow, spec, file)
                                for file, source in self._read],
                               [file for file, _ in self._read])
        self._scanned = None
        self._counted = None  # rows seen by the scan

    @property
    def num_rows(self) -> int:
        """Rows of the input: from metadata where the format has it, else counted (by the
        one pass over the ids that ``chunks`` needs anyway)."""
        counts = [source.num_rows for _, source in self._read]
        if None not in counts:
            return sum(counts)
        self._scan()
        return self._counted

    def _scan(self):
        """One pass over the ids (for ``chunks``): are the series contiguous, how many are
        there, and their distinct ids, sorted, when they are not contiguous."""
        if self._scanned is None:
            counted = [0]

            def counting(batches):
                for batch in batches:
                    counted[0] += batch.num_rows
                    yield batch

            self._scanned = scan_ids(
                counting(self._batches([self.layout.spec.series_id], 1 << 20)), self.layout)
            self._counted = counted[0]
        return self._scanned

    @property
    def contiguous(self) -> bool:
        return self._scan()[0]

    @property
    def n_series(self) -> int:
        return self._scan()[1]

    @property
    def _sorted_ids(self):
        return self._scan()[2]

    @property
    def format(self) -> str:
        return self.layout.format

    @property
    def file_format(self) -> str:
        """The files' format: parquet, csv or ipc (a dataset holds one)."""
        return self.files[0][1].kind

    @property
    def point_dtype(self):
        """The dtype decoded points come in: float32 when x, y (and w) are all float32."""
        values = [value_type.value_type if is_list_type(value_type) else value_type
                  for value_type in self.layout.types[1:]]
        return np.float32 if all(pa.types.is_float32(v) for v in values) else np.float64

    @property
    def points_estimate(self) -> int:
        """Roughly how many points the input holds, from its files' sizes alone (about 4
        bytes a point in the formats' usual encodings): enough to size the job's choices."""
        return sum(storage.size(file) for file, _ in self.files) // 4

    def stamp(self) -> list:
        """What identifies this input's contents cheaply: each file's path, size and
        modification time (a checkpoint is only resumed on the same input)."""
        return [storage.stamp(file) for file, _ in self.files]

    def _batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        """Batches of ``columns`` in the read types, file after file (a file whose types
        differ is cast, so that batches of different files concatenate)."""
        schema = self.layout.schema(columns)
        for file, source in self._read:
            for batch in source.iter_batches(columns, rows):
                if not has_types(batch, schema):
                    try:
                        batch = cast_to(batch, schema, self.layout.spec.series_id)
                    except (pa.ArrowException, OSError) as exc:
                        raise ValueError(f"cannot read {file}: {first_line(exc)}") from None
                yield batch

    def rows_of(self, ids: list, columns: list[str]) -> pa.Table:
        """The rows of the series ``ids`` (a few: for plots), ``columns`` in the read types."""
        schema = self.layout.schema(columns)
        id_column = self.layout.spec.series_id
        value_set = ids_of_type(ids, self.layout.id_type, "the series asked for")
        tables = []
        for _, source in self._read:
            for piece in source.rows_of(columns, id_column, value_set):
                if not has_types(piece, schema):
                    piece = cast_to(piece, schema, id_column)
                tables.append(piece if isinstance(piece, pa.Table)
                              else pa.Table.from_batches([piece]))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def csv_convert_options(self) -> pacsv.ConvertOptions:
        """The CSV column types of this (CSV) dataset's columns, one for every file (for a
        reader other than batchfit's own, such as Ray Data's): ids as the layout's, numbers
        as float64, a time column as the files give it (the same in every file)."""
        spec, layout = self.layout.spec, self.layout
        types = {spec.series_id: layout.id_type}
        for column in layout.columns[1:]:
            kinds = {source.schema_arrow.field(column).type for _, source in self._read}
            if len(kinds) > 1 and any(is_temporal(kind) for kind in kinds):
                raise ValueError(f"column {column!r} holds times of different types in the "
                                 f"files of {self.path} ({', '.join(map(str, kinds))})")
            kind = kinds.pop()
            types[column] = kind if is_temporal(kind) else pa.float64()
        return pacsv.ConvertOptions(column_types=types, include_columns=list(types))

    # ------------------------------------------------------------ decoded batches

    def series_codes(self, unique_rows: bool = False, degree: int = MAX_DEGREE
                     ) -> SeriesCodes:
        """Codes for this dataset's series ids: the ids themselves (offset) when the files'
        statistics show integer ids spread over few enough values (a code per id in their
        range, for the aggregation of a ``degree`` polynomial: ``dense_row_bytes``; by
        default the largest), else a hash table."""
        if pa.types.is_integer(self.layout.id_type):
            bounds = [source.id_bounds(self.layout.spec.series_id) for _, source in self._read]
            memory = _available_memory() or (8 << 30)
            row_bytes = dense_row_bytes(degree, self.layout.has_weight)
            if None not in bounds:
                lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
                span = hi - lo + 1  # at most one code per row of the input
                # codes are int64: uint64 ids from 2**63 up take the hash table
                if span <= self.num_rows and span * row_bytes <= memory // 4 \
                        and hi < 2**63:
                    return DenseCodes(lo, hi, self.layout.id_type, unique_rows)
        return HashedCodes(self.layout.id_type, unique_rows)

    def batches(self, codes: SeriesCodes, *, workers: int = 1, rows: int = BATCH_ROWS,
                start: int = 0) -> Iterator[Batch]:
        """The input's points in input order, ``rows`` at a time (or so): row groups are
        decoded ``workers`` at a time in threads, handed over in order, and coded by ``codes``
        in this thread. ``start``: skip the first ``start`` batches (Parquet: without decoding
        them)."""
        # Tasks (units of a file) wholly before ``start`` are skipped without being opened,
        # while every count so far is known (Parquet's row groups); after a unit of unknown
        # length (a CSV file, an IPC file or stream) the pieces are counted as they come.
        tasks, first, index = [], 0, None
        for _, source in self._read:
            for unit, parts in source.units(rows, self.layout):
                if first is not None and parts is not None and first + parts <= start:
                    first += parts
                    continue
                # (a unit of unknown length cannot skip for itself: its pieces are counted)
                skip = 0 if first is None or parts is None else max(0, start - first)
                if index is None:
                    index = first + skip  # (the first piece decoded)
                tasks.append((source, unit, rows, skip))
                first = None if first is None or parts is None else first + parts
        layout = self.layout
        for ids, x, y, w, file in ordered_streams(
                tasks, lambda task: decode(task, layout, codes), workers):
            index += 1
            if index <= start:
                continue  # (decoded only to be counted)
            points, series = codes.encode(ids)  # (after the ids' own errors: weights')
            if w is not None and bool(((w < 0) & np.isfinite(w)).any()):  # (NaN, inf: skipped)
                raise ValueError(f"weights must be >= 0 (a weight multiplies a squared "
                                 f"residual): column {layout.spec.weight!r} of {file} has "
                                 "negative values")
            yield Batch(index - 1, points, x, y, w, codes.offset, series)

    # ------------------------------------------------------------ whole-series chunks

    def chunks(self, rows_per_read: int = 1 << 20) -> Iterator[Chunk]:
        """Whole-series chunks in a canonical point order (see module docstring)."""
        batches = self._batches(self.layout.columns, rows_per_read)
        if self.format == "long" and not self.contiguous:
            batches = self._gathered(batches, rows_per_read)
        yield from whole_series(batches, self.layout)

    def _gathered(self, batches, rows_per_read: int) -> Iterator[pa.Table]:
        """Series scattered over the input, gathered without one big sort: each batch is
        split by ranges of the (sorted) series ids into partitions of about
        ``rows_per_read`` rows, kept in memory; each partition, holding whole series, is
        then sorted on its own (small sorts stay in cache). Refused when memory is short."""
        need = MIN_FREE_MEMORY_FACTOR * self.num_rows * _row_bytes(self.layout.schema(),
                                                                   self.layout.columns)
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
            low, span = sorted_ids[0], int(sorted_ids[-1]) - int(sorted_ids[0]) + 1
            dense = span <= 16 * len(sorted_ids)  # then plain arithmetic splits ids evenly
        for batch in batches:
            ids = batch.column(id_column)
            if numeric_ids and dense:
                values = ids.to_numpy()
                # offsets in int64, but uint64 ids (which may pass 2**63) in their own type
                offsets = (values - low).astype(np.int64) if values.dtype == np.uint64 \
                    else values.astype(np.int64) - int(low)
                part = offsets * parts // span
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
                yield table.take(canonical_order(table, self.layout.spec))


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


def read_series(path: str, ids: list, spec: ColumnSpec, input_format: str = "auto") -> dict:
    """The points of the given series of a dataset, as {id: (x, y)} float64 arrays in
    canonical order (Parquet: reads only row groups that can hold them; the other formats
    are streamed through, keeping only those series' rows)."""
    if not ids:
        return {}
    dataset = Dataset(path, ColumnSpec(spec.series_id, spec.x, spec.y, spec.weight,
                                       format=spec.format), input_format)
    layout = dataset.layout
    table = dataset.rows_of(list(ids), layout.columns[:3])
    found = {}
    for chunk in table_chunks(table, ColumnSpec(spec.series_id, spec.x, spec.y,
                                                format=layout.format)):
        for i, series_id in enumerate(chunk.ids.to_pylist()):
            lo, hi = chunk.offsets[i], chunk.offsets[i + 1]
            found[series_id] = (chunk.x[lo:hi].astype(np.float64),
                                chunk.y[lo:hi].astype(np.float64))
    return found
