"""Schemas of series datasets: which columns hold what, and checking a file's schema
against that (one-line errors naming the column and the file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMATS = ("auto", "long", "list")


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what. ``weight`` is used when present; required if ``weight_given``.

    ``x`` names one column, or several (a sequence, e.g. ``("x0", "x1")``: x with d columns,
    the models' x of shape (N, d)); ``x`` is then the first and ``x_columns`` all of them.
    """

    series_id: str = "series_id"
    x: str = "x"
    y: str = "y"
    weight: str = "weight"
    weight_given: bool = False
    format: str = "auto"
    more_x: tuple[str, ...] = ()  # x's columns after the first (set from a sequence ``x``)

    def __post_init__(self):
        if not isinstance(self.x, str):
            names = tuple(self.x)
            if not names or not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"x must name one column or several, got {self.x!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"x names a column twice: {', '.join(names)}")
            object.__setattr__(self, "x", names[0])
            object.__setattr__(self, "more_x", names[1:])

    @property
    def x_columns(self) -> tuple[str, ...]:
        return (self.x, *self.more_x)


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def is_numeric(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    # null: a column with no values (an all-None column from pandas); every point is skipped
    return (pa.types.is_integer(type_) or pa.types.is_floating(type_)
            or pa.types.is_decimal(type_) or pa.types.is_null(type_))


def is_temporal(type_: pa.DataType) -> bool:
    """A timestamp, date or duration: an x read as float seconds (see ``to_seconds``)."""
    type_ = decoded(type_)
    return (pa.types.is_timestamp(type_) or pa.types.is_date(type_)
            or pa.types.is_duration(type_))


X_UNITS = {"timestamp": "seconds since 1970-01-01 UTC", "date": "seconds since 1970-01-01 UTC",
           "duration": "seconds"}


def x_unit(type_: pa.DataType) -> str | None:
    """What the numbers of a temporal x column mean once read (None: the column's own)."""
    type_ = decoded(type_.value_type if is_list_type(type_) else type_)
    for kind, unit in X_UNITS.items():
        if getattr(pa.types, f"is_{kind}")(type_):
            return unit
    return None


_PER_SECOND = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}


def to_seconds(array):
    """A temporal Arrow array as float64 seconds (timestamps and dates since the epoch in
    UTC: a timezone changes how a time is shown, not the instant; durations as lengths);
    lists of them element-wise; nulls stay null (skipped points)."""
    if isinstance(array, pa.ChunkedArray):
        return pa.chunked_array([to_seconds(array.combine_chunks())])
    if is_list_type(array.type):
        return pa.ListArray.from_arrays(_offsets(array), to_seconds(pc.list_flatten(array)),
                                        mask=array.is_null())
    type_ = array.type
    if pa.types.is_dictionary(type_):
        array, type_ = array.dictionary_decode(), type_.value_type
    # (unsafe: nanoseconds since 1970 exceed 2**53 and round, as numpy's would, to the
    # nearest float64; in seconds that is below float64's own resolution there)
    if pa.types.is_date32(type_):
        return pc.multiply(pc.cast(pc.cast(array, pa.int32()), pa.float64()), 86400.0)
    count = pc.cast(pc.cast(array, pa.int64()), pa.float64(), safe=False)
    return pc.divide(count, 1e3 if pa.types.is_date64(type_) else _PER_SECOND[type_.unit])


def _offsets(array) -> pa.Array:
    """The offsets of a list array's values (its null rows given zero length)."""
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def is_list_type(type_: pa.DataType) -> bool:
    return (pa.types.is_list(type_) or pa.types.is_large_list(type_)
            or pa.types.is_fixed_size_list(type_))  # as pyarrow writes a 2-D numpy array


def is_id_type(type_: pa.DataType) -> bool:
    return (pa.types.is_integer(type_) or pa.types.is_string(type_)
            or pa.types.is_large_string(type_))


def decoded(type_: pa.DataType) -> pa.DataType:
    """A dictionary is an encoding, not a type: its column is read as its values."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def value_type(type_: pa.DataType) -> pa.DataType:
    """The type a value column (x, y, weight) is read as: dictionaries decoded, float16 as
    float32, and a null column (no values at all, as pandas writes an all-None column) as
    float64."""
    if is_list_type(type_):
        inner = value_type(type_.value_type)
        if inner == type_.value_type:
            return type_
        return (pa.large_list if pa.types.is_large_list(type_) else pa.list_)(inner)
    type_ = decoded(type_)
    if pa.types.is_float16(type_):  # exact in float32, which pyarrow can sort (float16 not)
        return pa.float32()
    if is_temporal(type_):
        return pa.float64()
    return pa.float64() if pa.types.is_null(type_) else type_


def cast_to(data, schema: pa.Schema, id_column: str):
    """A RecordBatch or Table with its columns cast to ``schema``'s types. Values are cast
    unsafely (an int64 beyond 2**53 rounds to the nearest float64, as numpy's would); ids
    safely (a common id type that cannot hold an id is an error, not a different id)."""
    def cast(field):
        column = data.column(field.name)
        inner = column.type.value_type if is_list_type(column.type) else column.type
        if is_temporal(inner):
            column = to_seconds(column)
        return pc.cast(column, field.type, safe=field.name == id_column)

    columns = [cast(field) for field in schema]
    return type(data).from_arrays(columns, schema=schema)


def has_types(data, schema: pa.Schema) -> bool:
    return all(data.schema.field(field.name).type == field.type for field in schema)


def single(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (a single chunk is used as it is: combining copies)."""
    if isinstance(array, pa.ChunkedArray):
        return array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    return array


def to_float(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numeric Arrow values as float32/float64 numpy, null -> NaN (float32 stays float32)."""
    array = single(array)
    if not (pa.types.is_float32(array.type) or pa.types.is_float64(array.type)):
        # unsafe: an integer beyond 2**53 rounds to the nearest float64 (as numpy would)
        # instead of failing the run
        array = pc.cast(array, pa.float64(), safe=False)
    if array.null_count:
        array = pc.fill_null(array, float("nan"))
    return array.to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Layout:
    """A checked schema: its format, id type, the columns to read and their read types."""

    spec: ColumnSpec
    format: str
    id_type: pa.DataType
    has_weight: bool
    types: tuple = ()  # of ``columns``, as read (see ``decoded`` and ``value_type``)
    x_unit: str | None = None  # a temporal x: what its float seconds count (``x_unit``)

    @property
    def columns(self) -> list[str]:
        spec = self.spec
        return [spec.series_id, *spec.x_columns, spec.y] + \
            ([spec.weight] if self.has_weight else [])

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
    duplicated = sorted({n for n in (spec.series_id, *spec.x_columns, spec.y, spec.weight)
                         if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"{where} has duplicate column names: {', '.join(duplicated)}")
    has_weight = spec.weight in names
    wanted = [spec.series_id, *spec.x_columns, spec.y] + \
        ([spec.weight] if spec.weight_given else [])
    for column in wanted:
        if column not in names:
            raise ValueError(f"missing column {column!r} in {where} "
                             f"(columns present: {', '.join(names)})")
    is_list = is_list_type(schema.field(spec.x).type)
    fmt = ("list" if is_list else "long") if spec.format == "auto" else spec.format
    if is_list != (fmt == "list"):
        raise ValueError(f"format {fmt} does not match column {spec.x!r} of type "
                         f"{schema.field(spec.x).type} in {where}")
    id_type = decoded(schema.field(spec.series_id).type)
    if not is_id_type(id_type):
        raise ValueError(f"column {spec.series_id!r} must hold integers or strings, "
                         f"got {id_type} (in {where})")  # which file, in a directory
    for column in [*spec.x_columns, spec.y] + ([spec.weight] if has_weight else []):
        type_ = schema.field(column).type

        def accepted(value_type, column=column):  # (x may also be a time: read as seconds)
            return is_numeric(value_type) or (column in spec.x_columns
                                              and is_temporal(value_type))

        if fmt == "list":
            if not is_list_type(type_) or not accepted(type_.value_type):
                raise ValueError(f"column {column!r} must be a list of numbers in list format, "
                                 f"got {type_} (in {where})")
        elif not accepted(type_):
            raise ValueError(f"column {column!r} must be numeric, got {type_} (in {where})")
    layout = Layout(spec, fmt, id_type, has_weight)
    values = [value_type(schema.field(column).type) for column in layout.columns[1:]]
    return Layout(spec, fmt, id_type, has_weight, (id_type, *values),
                  x_unit(schema.field(spec.x).type))


def unified(layouts: list[Layout], files: list[str]) -> Layout:
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
            if id_type is None or not is_id_type(id_type):
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
    for file, layout in zip(files, layouts):
        if layout.x_unit != first.x_unit:
            raise ValueError(f"column {first.spec.x!r} holds {layout.x_unit or 'numbers'} in "
                             f"{file} but {first.x_unit or 'numbers'} in {files[0]}")
    return Layout(first.spec, first.format, id_type, first.has_weight, tuple(types),
                  first.x_unit)
