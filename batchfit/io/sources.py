"""One input file as the reader sees it, whatever its format: a ``Source`` (``ParquetSource``,
``CsvSource``, ``IpcSource``) gives its schema, its row count when the format records one,
its rows as a stream of record batches read a bounded piece at a time, and its pieces of
work for parallel decoding (a Parquet row group; a CSV or IPC file whole). Each format's
damage is caught here, where the file is known, and turned into a one-line ``ValueError``
naming it: a Parquet footer that contradicts itself, an IPC batch whose offsets point out of
bounds, text that is not UTF-8. ``Dataset`` holds the logic common to every format."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from batchfit.io import storage
from batchfit.io.footer import vet as vet_footer
from batchfit.io.listing import first_bytes
from batchfit.io.schema import ColumnSpec, Layout, first_line

BATCH_ROWS = 1 << 20  # points per decoded batch (a row group is cut into pieces about this big)
# Bytes of CSV text parsed at a time (the first block's also give the column types):
# pyarrow's default, and here its fastest and leanest (a 340 MB file streams through in
# 1.9 s with 40 MiB of Arrow memory at the peak; 16 MiB blocks: 2.8 s and 340 MiB).
CSV_BLOCK = 1 << 20
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # what pyarrow decompresses, by the name


def open_parquet(file: str, metadata=None) -> pq.ParquetFile:
    """A reader of a Parquet file (``metadata``: its footer, read already)."""
    try:
        # Locally, pre_buffer would read every requested row group up front: stream instead.
        # From a store, it joins a row group's column chunks into few large requests.
        # Pages written with checksums (Spark's default, and batchfit's) are verified.
        return pq.ParquetFile(storage.open_input_file(file), metadata=metadata,
                              pre_buffer=storage.is_remote(file),
                              page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:  # (a damaged schema: NotImplemented too)
        raise ValueError(f"cannot read {file} as Parquet: {first_line(exc)}") from None


def open_source(file: str, kind: str, spec: ColumnSpec) -> Source:
    if kind == "parquet":
        return ParquetSource(file)
    if kind == "csv":
        return CsvSource(file, spec)
    if kind == "ipc":
        return IpcSource(file)
    raise ValueError(f"{file} is a Feather version 1 file, which cannot be streamed: write it "
                     "again as Feather version 2 (pyarrow.feather.write_feather) or Parquet")


class Source:
    """One input file: its schema, its row count when known without reading it, and its
    rows as a stream of record batches. The Dataset's logic is the same for every format;
    only these methods differ."""

    kind = label = ""
    num_rows: int | None = None  # None: not known before reading the file through
    has_rows = True
    schema_arrow: pa.Schema

    def __init__(self, file: str):
        self.file = file

    def iter_batches(self, columns: list[str], rows: int,
                     points_of: str | None = None) -> Iterator[pa.RecordBatch]:
        """The file's rows of ``columns`` in file order, at most ``rows`` at a time
        (``points_of``: a list column; then at most about ``rows`` of its elements)."""
        with self._reading():
            for batch in self._batches(columns, rows):
                yield from _slices(batch, rows, points_of)

    def _batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def units(self, rows: int, layout: Layout) -> list[tuple]:
        """Pieces of work for parallel decoding, in file order: (unit, number of pieces it
        yields, None if not known before reading it)."""
        return [(None, None)]

    def read_unit(self, unit, layout: Layout, rows: int, skip: int) -> Iterator:
        """The pieces of ``unit`` after its first ``skip`` (``rows`` points each, or so)."""
        points_of = layout.spec.x if layout.format == "list" else None
        pieces = self.iter_batches(layout.columns, rows, points_of)
        for part, piece in enumerate(pieces):
            if part >= skip:
                yield piece

    def id_bounds(self, column: str) -> tuple[int, int] | None:
        """The smallest and largest integer id, from metadata (None: unknown)."""
        return None

    def rows_of(self, columns: list[str], id_column: str, value_set: pa.Array) -> Iterator:
        """The rows whose id is in ``value_set`` (for plots: a few series)."""
        for batch in self.iter_batches(columns, BATCH_ROWS):
            ids = batch.column(id_column)
            try:
                wanted = value_set.cast(ids.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue  # (no id of this file can be one of them)
            yield batch.filter(pc.is_in(ids, value_set=wanted))

    @contextmanager
    def _reading(self):
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {self.file} as {self.label}: "
                             f"{first_line(exc)}") from None


def _slices(batch: pa.RecordBatch, rows: int, points_of: str | None) -> Iterator:
    """A batch in even pieces of at most ``rows`` rows (``points_of``: of about ``rows``
    elements of that list column); a small batch as it is."""
    points = batch.num_rows
    if points_of is not None and batch.num_rows:
        lengths = pc.list_value_length(batch.column(points_of))
        points = int(pc.sum(lengths).as_py() or 0)
    parts = _parts(points, rows)
    if parts == 1:
        yield batch
        return
    per = -(-batch.num_rows // parts)
    for start in range(0, batch.num_rows, per):
        yield batch.slice(start, per)


def _parts(rows: int, per: int) -> int:
    return max(1, -(-rows // per))


def _leaf_values(metadata, group: int, column: str) -> int:
    """Values in a row group's column (for a list column: its elements), from metadata.
    (Paths from the schema, which pyarrow checked on opening, not the chunks' own.)"""
    meta = metadata.row_group(group)
    for i in range(meta.num_columns):
        path = metadata.schema.column(i).path
        if path == column or path.startswith(column + "."):
            return meta.column(i).num_values
    return meta.num_rows


def _is_text(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _checked_text(data, file: str):
    """``data`` (a batch or table read from a Parquet file) once its text is known to be
    valid. pyarrow's Parquet reader does not check that strings are UTF-8 (its CSV reader
    does, and IPC batches are validated whole): a damaged page would otherwise yield ids
    that fail only where they become Python strings, as a UnicodeDecodeError that names no
    file, or that reach the output as they are. Only ids can be text (values are numbers),
    so this is one pass over a piece's id bytes, or over a dictionary column's dictionary
    and indices: far less than coding the ids."""
    for name, column in zip(data.column_names, data.columns):
        if not _is_text(column.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            reason = first_line(exc).rsplit("Invalid: ", 1)[-1]
            problem = "holds text that is not valid UTF-8" if "UTF8" in reason else \
                f"is damaged ({reason})"  # (a dictionary index out of its bounds, say)
            raise ValueError(f"cannot read {file}: column {name!r} {problem}") from None
    return data


class ParquetSource(Source):
    """A Parquet file: row counts, row groups and id statistics from its footer."""

    kind, label = "parquet", "Parquet"

    def __init__(self, file: str):
        super().__init__(file)
        self.handle = open_parquet(file)
        self.schema_arrow = self.handle.schema_arrow
        self.num_rows = self.handle.metadata.num_rows
        self.has_rows = bool(self.num_rows)
        vet_footer(self.handle.metadata, file)  # (before any column-chunk accessor)
        self._check_counts()

    def _check_counts(self):
        """The footer's counts agree: the row groups' rows add up to the file's, and each
        column chunk holds a value per row (a list column: at least one)."""
        metadata = self.handle.metadata
        repeated = [metadata.schema.column(i).max_repetition_level > 0
                    for i in range(metadata.num_columns)]
        total = 0
        for group in range(metadata.num_row_groups):
            meta = metadata.row_group(group)
            total += meta.num_rows
            for i in range(meta.num_columns):
                values = meta.column(i).num_values
                if values < meta.num_rows if repeated[i] else values != meta.num_rows:
                    self._contradiction(f"row group {group} has {meta.num_rows} rows but its "
                                        f"column {metadata.schema.column(i).path!r} {values} "
                                        "values")
        if total != self.num_rows:
            self._contradiction(f"its row groups hold {total} rows in all, the file "
                                f"{self.num_rows}")

    def _contradiction(self, problem: str):
        # (pyarrow trusts the footer's counts: a row group said to be empty while its
        # columns hold data would be read as empty)
        raise ValueError(f"cannot read {self.file} as Parquet: its footer contradicts "
                         f"itself ({problem})")

    def iter_batches(self, columns, rows, points_of=None):
        # (rows per batch, in either format: a row group's list columns come whole)
        try:
            for batch in self.handle.iter_batches(batch_size=rows, columns=columns):
                yield _checked_text(batch, self.file)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {self.file}: {first_line(exc)}") from None

    def units(self, rows, layout):
        units = []
        metadata = self.handle.metadata
        for group in range(metadata.num_row_groups):
            meta = metadata.row_group(group)
            # a piece holds about ``rows`` points (in list format far fewer rows)
            points = _leaf_values(metadata, group, layout.spec.x) if layout.format == "list" \
                else meta.num_rows
            parts = _parts(points, rows)
            units.append(((group, -(-meta.num_rows // parts)), parts))
        return units

    def read_unit(self, unit, layout, rows, skip):
        group, per = unit  # (rows per piece of this row group)
        file, metadata = self.file, self.handle.metadata
        try:
            # (a reader of its own: this runs in a decoding thread)
            reader = open_parquet(file, metadata)
            if metadata.row_group(group).num_rows <= per:
                pieces = iter([reader.read_row_group(group, columns=layout.columns,
                                                     use_threads=False)])
            else:  # a big row group: streamed, a piece at a time, its columns decoded in
                # parallel by pyarrow (the pieces of one row group come one after another)
                pieces = reader.iter_batches(batch_size=per, row_groups=[group],
                                             columns=layout.columns, use_threads=True)
            for part, piece in enumerate(pieces):
                if part >= skip:
                    yield _checked_text(piece, file)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {file}: {first_line(exc)}") from None

    def id_bounds(self, column):
        meta = self.handle.metadata
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
        at = self.schema_arrow.get_field_index(column)  # (-1: none, or several)
        if at < 0 or leaves.count(column) != 1 or \
                not pa.types.is_integer(self.schema_arrow.field(at).type):
            return None  # (only integer statistics are read: no text to decode)
        index, lo, hi = leaves.index(column), None, None
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(index).statistics
            if stats is None or not stats.has_min_max:
                return None
            if not isinstance(stats.min, int) or not isinstance(stats.max, int):
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
        return None if lo is None else (lo, hi)

    def rows_of(self, columns, id_column, value_set):
        # (row groups whose statistics exclude every id are not read)
        try:
            filesystem, inner = storage.locate(self.file)
            yield _checked_text(pq.read_table(inner, columns=columns, filesystem=filesystem,
                                              filters=[(id_column, "in",
                                                        value_set.to_pylist())]), self.file)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {self.file}: {first_line(exc)}") from None


class CsvSource(Source):
    """A CSV file with a header row, streamed by pyarrow's CSV reader a block at a time
    (``CSV_BLOCK``). Column types are inferred from the first block and then held for the
    whole file (and every pass): ids as inferred (integers, else strings), timestamps and
    dates as inferred, integer or empty value columns as float64 (so that a later "1.5" is
    a number, not an error). CSV holds long format only."""

    kind, label = "csv", "CSV"

    def __init__(self, file: str, spec: ColumnSpec):
        super().__init__(file)
        with self._reading():
            reader = pacsv.open_csv(storage.open_input_stream(file),
                                    read_options=pacsv.ReadOptions(block_size=CSV_BLOCK))
            first, inferred = _next_batch(reader), reader.schema
            reader.close()
        # (the first block held the whole file: its rows are counted)
        whole = not file.lower().endswith(COMPRESSED) and \
            storage.size(file) < CSV_BLOCK // 2
        values = (*spec.x_columns, spec.y, spec.weight)
        self.schema_arrow = pa.schema([
            field.with_type(pa.float64()) if field.name in values and (
                pa.types.is_integer(field.type) or pa.types.is_null(field.type)) else field
            for field in inferred])
        rows = 0 if first is None else first.num_rows
        self.num_rows = rows if whole else None
        self.has_rows = rows > 0
        if spec.format == "list":
            raise ValueError(f"{file} is CSV, which holds long format only (a row per "
                             "point): list format needs Parquet or Arrow IPC")
        x = inferred.field(spec.x) if spec.x in inferred.names else None
        if rows and x is not None and pa.types.is_string(x.type):
            texts = pc.drop_null(first.column(spec.x))
            if len(texts) and str(texts[0].as_py()).lstrip().startswith("["):
                raise ValueError(f"column {spec.x!r} of {file} holds lists as text; CSV holds "
                                 "long format only (a row per point): write list format "
                                 "as Parquet or Arrow IPC")

    def _batches(self, columns, rows):
        types = {name: self.schema_arrow.field(name).type for name in columns}
        convert = pacsv.ConvertOptions(column_types=types, include_columns=columns)
        yield from pacsv.open_csv(storage.open_input_stream(self.file),
                                  convert_options=convert,
                                  read_options=pacsv.ReadOptions(block_size=CSV_BLOCK))


class IpcSource(Source):
    """An Arrow IPC file (Feather v2) or stream, memory-mapped (from a store: read through):
    batches are read in place (decompressed if compressed), only the columns asked for."""

    kind, label = "ipc", "Arrow IPC"

    def __init__(self, file: str):
        super().__init__(file)
        self.stream = not first_bytes(file).startswith(b"ARROW1")
        with self._reading(), _mapped(file) as source:
            if self.stream:
                reader = paipc.open_stream(source)
                self.schema_arrow = reader.schema
                self.has_rows = any(batch.num_rows for batch in reader)
            else:
                reader = paipc.open_file(source)
                self.schema_arrow = reader.schema
                self.num_rows = reader.count_rows()
                self.has_rows = bool(self.num_rows)

    def _batches(self, columns, rows):
        fields = [self.schema_arrow.get_field_index(name) for name in columns]
        options = paipc.IpcReadOptions(included_fields=sorted(fields))
        with _mapped(self.file) as source:
            if self.stream:
                batches = paipc.open_stream(source, options=options)
            else:
                reader = paipc.open_file(source, options=options)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                # (damaged offsets would be read out of bounds: an error, not a crash)
                batch.validate(full=True)
                yield batch.select(columns)


def _mapped(file: str):
    return storage.open_input_file(file) if storage.is_remote(file) else pa.memory_map(file)


def _next_batch(reader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None
