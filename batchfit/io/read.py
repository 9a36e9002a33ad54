"""Reading series datasets: a Parquet, CSV or Arrow IPC file, or a directory of them, as a
stream of decoded batches.

Each file is a ``Source`` (``ParquetSource``, ``CsvSource``, ``IpcSource``): its schema, its
row count when the format records one, and its rows as a stream of record batches, read a
bounded piece at a time. ``Dataset`` holds the logic, the same for every format. Two ways to
read, for two kinds of solver:

* ``Dataset.batches`` (the aggregation path of MSE polynomial fits): row groups (of a CSV
  or IPC input: its files) decoded in parallel threads (pyarrow releases the GIL), handed
  over in input order as flat numpy arrays with each point's series code (``SeriesCodes``).
  Nothing is sorted or gathered: a series may be spread anywhere.
* ``Dataset.chunks`` (solvers that need each series' points together: robust losses,
  nonlinear models, GD/Adam): whole series back to back, in a canonical point order, so that
  a series' fit never depends on how the input was laid out.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from batchfit.core.names import MAX_DEGREE
from batchfit.io.footer import vet as vet_footer
from batchfit.io.schema import (
    ColumnSpec,
    Layout,
    cast_to,
    describe,
    first_line,
    has_types,
    is_list_type,
    is_temporal,
    single,
    to_float,
    unified,
)
from batchfit.moments import layout as moments

MIN_FREE_MEMORY_FACTOR = 4  # sorting an unsorted input needs about this many copies of it
BATCH_ROWS = 1 << 20  # points per decoded batch (a row group is cut into pieces about this big)

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


INPUT_FORMATS = ("auto", "parquet", "csv", "ipc")
EXTENSIONS = {"parquet": (".parquet", ".pq", ".parq"),
              "csv": (".csv", ".csv.gz", ".csv.bz2", ".csv.zst"),  # (pyarrow decompresses)
              "ipc": (".arrow", ".arrows", ".feather", ".ipc")}
LABELS = {"parquet": "Parquet", "csv": "CSV", "ipc": "Arrow IPC", "feather1": "Feather v1"}
# Bytes of CSV text parsed at a time (the first block's also give the column types):
# pyarrow's default, and here its fastest and leanest (a 340 MB file streamed through in
# 1.9 s with 40 MiB of Arrow memory at the peak; 16 MiB blocks: 2.8 s and 340 MiB).
CSV_BLOCK = 1 << 20
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # what pyarrow decompresses, by the name


def format_by_name(name: str) -> str | None:
    """The format a file's extension names (None: no known extension)."""
    lower = name.lower()
    return next((kind for kind, ends in EXTENSIONS.items() if lower.endswith(ends)), None)


def _format_by_content(file: str) -> str | None:
    """The format a file's first bytes show: Parquet ("PAR1"), an Arrow IPC file ("ARROW1")
    or stream (the continuation marker 0xFFFFFFFF); None for anything else (CSV has none)."""
    head = _head(file)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "ipc"
    return "feather1" if head.startswith(b"FEA1") else None


def _head(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(8)
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {first_line(exc)}") from None


def file_format(file: str, input_format: str = "auto") -> str:
    """How ``file`` is read: ``input_format`` if given, else by its extension, else by its
    first bytes. A file whose first bytes show another binary format is refused."""
    check_input_format(input_format)
    named = input_format if input_format != "auto" else format_by_name(file)
    content = _format_by_content(file)
    kind = named or content
    if content == "feather1" and kind in ("ipc", "feather1"):
        return "feather1"  # (refused when opened, with what to do)
    if kind is None:
        raise ValueError(f"cannot tell the format of {file} from its name or its first bytes: "
                         "set input_format to parquet, csv or ipc")
    if content is not None and content != kind:
        said = "input_format says" if input_format != "auto" else "its name says"
        article = "an" if LABELS[content][0] in "AEIOU" else "a"
        raise ValueError(f"{file} is {article} {LABELS[content]} file (by its first bytes), not "
                         f"{LABELS[kind]} as {said}")
    return kind


def check_input_format(input_format: str):
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got "
                         f"{input_format!r}")


def list_files(path: str, input_format: str = "parquet") -> list[str]:
    """The files of a dataset path: the file itself, or the files of a directory whose
    extension is ``input_format``'s (auto: any format's; names starting with . or _ are
    not data). The default, Parquet, is what batchfit's own outputs are."""
    check_input_format(input_format)
    if not os.path.exists(path):
        raise ValueError(f"input not found: {path}")
    if not os.path.isdir(path):
        return [path]
    kinds = list(EXTENSIONS) if input_format == "auto" else [input_format]
    files = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if format_by_name(name) in kinds and name[0] not in "._"
                   and os.path.isfile(os.path.join(path, name)))
    if not files:
        patterns = ", ".join(f"*{end}" for kind in kinds for end in EXTENSIONS[kind])
        others = [LABELS[kind] for kind in kinds if kind != "parquet"]
        what = "Parquet files" if "parquet" in kinds else f"{others.pop(0)} files"
        if others:
            what += f" (nor {' or '.join(others)} files)"
        raise ValueError(f"no {what} ({patterns}) in directory {path}")
    seen = {}
    for file in files:  # (two links to one file would count its every point twice)
        info = os.stat(file)
        first = seen.setdefault((info.st_dev, info.st_ino), file)
        if first != file:
            raise ValueError(f"directory {path} holds one file twice: "
                             f"{os.path.basename(first)} and {os.path.basename(file)} "
                             "(links to one file); its points would count twice")
    return files


def dataset_files(path: str, input_format: str = "auto") -> list[tuple[str, str]]:
    """(file, format) of every file of a dataset path. The files of a directory must be of
    one format (a CSV copy beside the Parquet original would count every point twice): a
    directory holding several is refused, unless ``input_format`` picks one."""
    files = [(file, file_format(file, input_format))
             for file in list_files(path, input_format)]
    kinds = sorted({kind for _, kind in files})
    if len(kinds) > 1:
        firsts = [next(file for file, k in files if k == kind) for kind in kinds]
        raise ValueError(f"directory {path} holds files of more than one format ("
                         + ", ".join(f"{LABELS[k]}: {os.path.basename(f)}"
                                     for k, f in zip(kinds, firsts))
                         + "): set input_format to read one of them")
    return files


def open_parquet(file: str) -> pq.ParquetFile:
    try:
        # pre_buffer would read every requested row group up front; stream instead. Pages
        # written with checksums (Spark's default, and batchfit's) are verified as read.
        return pq.ParquetFile(file, pre_buffer=False, page_checksum_verification=True)
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
    """One input file as the reader sees it, whatever its format: its schema, its row count
    when known without reading it, and its rows as a stream of record batches. The
    Dataset's logic is the same for every format; only these methods differ."""

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
            yield from self.handle.iter_batches(batch_size=rows, columns=columns)
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
            reader = pq.ParquetFile(file, metadata=metadata, pre_buffer=False,
                                    page_checksum_verification=True)
            if metadata.row_group(group).num_rows <= per:
                pieces = iter([reader.read_row_group(group, columns=layout.columns,
                                                     use_threads=False)])
            else:  # a big row group: streamed, a piece at a time, its columns decoded in
                # parallel by pyarrow (the pieces of one row group come one after another)
                pieces = reader.iter_batches(batch_size=per, row_groups=[group],
                                             columns=layout.columns, use_threads=True)
            for part, piece in enumerate(pieces):
                if part >= skip:
                    yield piece
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
            yield pq.read_table(self.file, columns=columns,
                                filters=[(id_column, "in", value_set.to_pylist())])
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
            reader = pacsv.open_csv(file, read_options=pacsv.ReadOptions(
                block_size=CSV_BLOCK))
            first, inferred = _next_batch(reader), reader.schema
            reader.close()
        # (the first block held the whole file: its rows are counted)
        whole = not file.lower().endswith(COMPRESSED) and \
            os.path.getsize(file) < CSV_BLOCK // 2
        values = (spec.x, spec.y, spec.weight)
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
        yield from pacsv.open_csv(self.file, convert_options=convert,
                                  read_options=pacsv.ReadOptions(block_size=CSV_BLOCK))


class IpcSource(Source):
    """An Arrow IPC file (Feather v2) or stream, memory-mapped: batches are read in place
    (decompressed if compressed), only the columns asked for."""

    kind, label = "ipc", "Arrow IPC"

    def __init__(self, file: str):
        super().__init__(file)
        self.stream = not _head(file).startswith(b"ARROW1")  # (else a stream)
        with self._reading(), pa.memory_map(file) as source:
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
        with pa.memory_map(self.file) as source:
            if self.stream:
                batches = paipc.open_stream(source, options=options)
            else:
                reader = paipc.open_file(source, options=options)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                # (damaged offsets would be read out of bounds: an error, not a crash)
                batch.validate(full=True)
                yield batch.select(columns)


def _next_batch(reader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


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

            self._scanned = _scan_ids(
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
        return sum(os.stat(file).st_size for file, _ in self.files) // 4

    def stamp(self) -> list:
        """What identifies this input's contents cheaply: each file's path, size and
        modification time (a checkpoint is only resumed on the same input)."""
        stats = [(os.path.abspath(file), os.stat(file)) for file, _ in self.files]
        return [[path, stat.st_size, stat.st_mtime_ns] for path, stat in stats]

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
        for ids, x, y, w, file in _ordered_streams(
                tasks, lambda task: _decode(task, layout, codes), workers):
            index += 1
            if index <= start:
                continue  # (decoded only to be counted)
            points, series = codes.encode(ids)  # (after the ids' own errors: weights')
            if w is not None and bool(((w < 0) & np.isfinite(w)).any()):  # (NaN, inf: skipped)
                raise ValueError(f"weights must be >= 0 (a weight multiplies a squared "
                                 f"residual): column {layout.spec.weight!r} of {file} has "
                                 "negative values")
            yield Batch(index - 1, points, x, y, w, codes.offset, series)

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
                yield table.take(_canonical_order(table, self.layout.spec))


# ---------------------------------------------------------------- decoded batches



@dataclass(frozen=True)
class Batch:
    """Decoded points of a piece of the input: point i belongs to series ``codes[i]``."""

    index: int  # the piece's position in the input (for --resume)
    codes: np.ndarray  # int64: point i belongs to series ``codes[i] - offset``
    x: np.ndarray  # float32 or float64, all three of one type
    y: np.ndarray
    w: np.ndarray | None
    offset: int = 0
    series: np.ndarray | None = None  # list format: each row's code (+ offset), in order


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


def _ordered_streams(tasks: list, stream, workers: int, depth: int = 2) -> Iterator:
    """The items of ``stream(task)`` (an iterator) for every task, in task order, from
    ``workers`` threads with up to ``2 * workers + 1`` tasks under way, each at most
    ``depth`` items ahead of the consumer (bounded memory, however big a task)."""
    if workers <= 1:
        for task in tasks:
            yield from stream(task)
        return
    done = object()
    stop = threading.Event()

    def hand_over(out: queue.Queue, item) -> bool:
        """Put ``item`` once there is room; False when the consumer stopped instead (it
        may never take another item: a worker waiting for room would wait for ever)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(task, out: queue.Queue):
        try:
            for item in stream(task):
                if not hand_over(out, item):
                    return
            hand_over(out, done)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            hand_over(out, exc)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="batchfit-read")
    try:
        outs = deque()
        for task in tasks[:2 * workers + 1]:
            outs.append(queue.Queue(depth))
            pool.submit(run, task, outs[-1])
        started = len(outs)
        while outs:
            item = outs[0].get()
            if item is done:
                outs.popleft()
                if started < len(tasks):
                    outs.append(queue.Queue(depth))
                    pool.submit(run, tasks[started], outs[-1])
                    started += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _decode(task, layout: Layout, codes) -> Iterator[tuple]:
    """The pieces of one unit of a file, decoded in turn: (ids, x, y, w, file) with x, y, w
    flat float arrays of one dtype and ids per point (long format) or per series (list)."""
    source, unit, rows, skip = task
    for piece in source.read_unit(unit, layout, rows, skip):
        try:
            yield _piece(piece, layout, codes, source.file)
        except (pa.ArrowException, OSError) as exc:  # (a cast: an id that does not fit)
            raise ValueError(f"cannot read {source.file}: {first_line(exc)}") from None


def _piece(piece, layout: Layout, codes, file: str) -> tuple:
    table = piece if isinstance(piece, pa.Table) else pa.Table.from_batches([piece])
    schema = layout.schema()
    if not has_types(table, schema):
        table = cast_to(table, schema, layout.spec.series_id)
    ids = single(table.column(layout.spec.series_id))
    if ids.null_count:
        raise ValueError(f"column {layout.spec.series_id!r} has null ids (in {file})")
    if layout.format == "list":
        if not table.num_rows:
            return codes.prepare(ids, np.zeros(0, np.int64), file), *_flat(
                layout, np.zeros(0), np.zeros(0), np.zeros(0) if layout.has_weight else None)
        chunk = _list_chunk(table.combine_chunks().to_batches()[0], layout)
        lengths = np.diff(chunk.offsets)
        return codes.prepare(ids, lengths, file), *_flat(layout, chunk.x, chunk.y, chunk.w, file)
    x, y = to_float(table.column(layout.spec.x)), to_float(table.column(layout.spec.y))
    w = to_float(table.column(layout.spec.weight)) if layout.has_weight else None
    return codes.prepare(ids, None, file), *_flat(layout, x, y, w, file)


def _flat(layout: Layout, x, y, w, file: str = ""):
    """x, y, w of one float dtype (float32 only when all three are), and where they come
    from (for errors found later)."""
    values = [v for v in (x, y, w) if v is not None]
    if any(v.dtype != np.float32 for v in values):
        x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
        w = None if w is None else w.astype(np.float64, copy=False)
    return x, y, w, file


class SeriesCodes:
    """Dense codes 0, 1, 2, ... for series ids. ``prepare`` (thread-safe, in the decoding
    threads) turns a batch's ids into what ``encode`` (in input order, in one thread) needs.
    List format (``unique_rows``): ids are one per series; ``encode`` then returns each
    point's code and refuses an id seen before."""

    offset = 0  # encode gives codes + offset (DenseCodes: the ids themselves)

    def __init__(self, id_type: pa.DataType, unique_rows: bool):
        self.id_type, self.unique_rows = id_type, unique_rows

    def prepare(self, ids: pa.Array, lengths: np.ndarray | None = None, file: str = ""):
        """(``file``: where the ids come from, for errors)"""
        raise NotImplementedError

    def encode(self, prepared) -> np.ndarray:
        raise NotImplementedError

    def ids(self, codes: np.ndarray) -> pa.Array:
        """The ids of ``codes``."""
        raise NotImplementedError

    def sorted_by_id(self, codes: np.ndarray) -> np.ndarray:
        """``codes`` ordered by their ids."""
        return codes[np.asarray(pc.sort_indices(self.ids(codes)))]

    def _duplicate(self, value):
        raise ValueError(f"series ids repeat in list format (id {value!r}): each row must be "
                         "its own series")


class DenseCodes(SeriesCodes):
    """Integer ids in [lo, hi] (from the files' statistics): code = id - lo, no hashing."""

    def __init__(self, lo: int, hi: int, id_type, unique_rows: bool):
        super().__init__(id_type, unique_rows)
        self.lo, self.hi = lo, hi
        self.offset = lo
        self.size = hi - lo + 1
        self.taken = np.zeros(self.size, dtype=bool) if unique_rows else None

    def prepare(self, ids: pa.Array, lengths: np.ndarray | None = None, file: str = ""):
        # int64 ids pass as they are (no copy); the kernel subtracts the offset
        values = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if len(values) and (values.min() < self.lo or values.max() > self.hi):
            raise ValueError(f"series ids in {file} lie outside the range that its footer's "
                             f"statistics give ({self.lo} to {self.hi}): the file's "
                             "metadata is wrong")
        return values, lengths

    def encode(self, prepared) -> tuple:
        values, lengths = prepared
        if lengths is None:  # long format: the ids are the codes (+ offset)
            return values, None
        self._check_unique(values - self.lo)  # list format: one id per series
        return np.repeat(values, lengths), values

    def _check_unique(self, codes):
        if self.unique_rows:
            first = np.unique(codes, return_counts=True)
            if (first[1] > 1).any() or self.taken[codes].any():
                repeated = codes[np.flatnonzero(self.taken[codes])[:1]] if \
                    self.taken[codes].any() else first[0][first[1] > 1][:1]
                self._duplicate(int(repeated[0]) + self.lo)
            self.taken[codes] = True

    def ids(self, codes: np.ndarray) -> pa.Array:
        return pa.array(codes + self.lo).cast(self.id_type)

    def sorted_by_id(self, codes: np.ndarray) -> np.ndarray:
        return np.sort(codes)  # codes are ids, offset

    def state(self) -> dict:
        return {} if self.taken is None else {"taken": self.taken}

    def load_state(self, state: dict):
        if self.taken is not None:
            self.taken[:] = state["taken"]


class HashedCodes(SeriesCodes):
    """Any ids: codes in order of first appearance, through a hash table. A batch's runs of
    equal ids are looked up once per run (grouped input: once per series)."""

    def __init__(self, id_type, unique_rows: bool):
        super().__init__(id_type, unique_rows)
        self.table: dict = {}
        self.values: list = []

    def prepare(self, ids: pa.Array, lengths: np.ndarray | None = None, file: str = ""):
        if lengths is None and len(ids):
            starts = _run_starts(ids)
            runs = ids.take(pa.array(starts))
            repeat = np.diff(np.append(starts, len(ids)))
        elif lengths is None:
            runs, repeat = ids, np.zeros(0, np.int64)
        else:
            runs, repeat = ids, lengths
        encoded = pc.dictionary_encode(runs)
        return (encoded.indices.to_numpy(zero_copy_only=False),
                encoded.dictionary.to_pylist(), repeat, lengths is not None)

    def encode(self, prepared) -> tuple:
        indices, distinct, repeat, rows = prepared
        table, values = self.table, self.values
        if self.unique_rows and (len(distinct) < len(indices)
                                 or any(v in table for v in distinct)):
            seen = [v for v in distinct if v in table]
            self._duplicate(seen[0] if seen else distinct[np.bincount(indices).argmax()])
        local = np.empty(len(distinct), dtype=np.int64)
        for i, value in enumerate(distinct):
            code = table.get(value)
            if code is None:
                code = table[value] = len(values)
                values.append(value)
            local[i] = code
        codes = local[indices]
        return np.repeat(codes, repeat), (codes if rows else None)

    def ids(self, codes: np.ndarray) -> pa.Array:
        return pa.array(self.values, type=self.id_type).take(pa.array(codes))

    def state(self) -> dict:
        return {"values": pa.array(self.values, type=self.id_type)}

    def load_state(self, state: dict):
        self.values = state["values"].to_pylist()
        self.table = {value: code for code, value in enumerate(self.values)}

    @property
    def size(self) -> int:
        return len(self.values)


def table_chunks(table: pa.Table, spec: ColumnSpec) -> Iterator[Chunk]:
    """The chunks of an in-memory table (long or list format), as ``Dataset.chunks``."""
    layout = describe(table.schema, spec, "the table")
    table = table.select(layout.columns)
    if not has_types(table, layout.schema()):  # dictionaries decoded, null columns float64
        table = cast_to(table, layout.schema(), spec.series_id)
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


def dense_row_bytes(degree: int, weighted: bool) -> int:
    """Memory per series code of the aggregation of a ``degree`` polynomial: its statistics
    row, a refinement's Chebyshev coefficients and residual moments (``job._refine``), and
    its seen, taken and flagged bytes."""
    k = degree + 1
    return 8 * (moments.width(degree, weighted) + k + (k + 1) * (2 if weighted else 1)) + 3


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
    changes = pc.indices_nonzero(pc.not_equal(ids[1:], ids[:-1])).to_numpy()
    return np.concatenate([[0], changes.astype(np.int64) + 1])


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


def ids_of_type(values, id_type: pa.DataType, what: str) -> pa.Array:
    """Series ids given by a user (``--track-ids``) in the dataset's id type."""
    try:
        return pa.array(list(values)).cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ValueError(f"{what} must be {id_type} series ids") from None


def positions_in(ids: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Positions of ``ids`` that are in ``value_set``."""
    return np.flatnonzero(pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False))


def indices(positions: np.ndarray) -> pa.Array:
    return pa.array(positions, pa.int64())


def arrow_table(data) -> pa.Table:
    """An in-memory table of series as Arrow: a pyarrow Table, a pandas or polars DataFrame,
    or any object with the Arrow PyCapsule stream interface (``__arrow_c_stream__``)."""
    if isinstance(data, pa.Table):
        return data
    kind = type(data).__module__.split(".")[0]
    try:
        if kind == "pandas":
            return pa.Table.from_pandas(data, preserve_index=False)
        if kind == "polars" and hasattr(data, "to_arrow"):
            return data.to_arrow()
        if hasattr(data, "__arrow_c_stream__"):
            return pa.table(data)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"table cannot be read as Arrow: {first_line(exc)}") from None
    raise ValueError("table must be a pyarrow Table, a pandas or polars DataFrame, or an "
                     "object with the Arrow PyCapsule stream interface; got "
                     f"{type(data).__name__}")


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
