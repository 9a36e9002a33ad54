"""A Parquet footer vetted before pyarrow's column-chunk metadata is touched.

pyarrow's reader turns a damaged footer into an exception, but its metadata accessors
(``RowGroupMetaData.column``, ``ColumnChunkMetaData.statistics``) let some of the C++
library's exceptions escape as an abort (SIGABRT) of the whole process. batchfit reads
those accessors for its footer checks and id statistics, so it first walks the footer's
Thrift structures itself (the compact protocol, in Python) and refuses, as a ValueError,
each condition under which pyarrow 26's accessors throw:

* a row group whose column chunks do not match the schema's columns one for one;
* a column chunk whose metadata is encrypted or missing;
* size statistics whose level histograms do not fit the schema's levels, or that give
  unencoded byte-array sizes for a column that is not byte arrays;
* statistics of a column chunk whose type differs from its schema column's, or whose
  minimum or maximum is too short for a value of a fixed-width type.
"""

from __future__ import annotations

import pyarrow.parquet as pq

# Thrift field ids (parquet.thrift)
SCHEMA, ROW_GROUPS = 2, 4  # FileMetaData
TYPE, TYPE_LENGTH, REPETITION, NUM_CHILDREN = 1, 2, 3, 5  # SchemaElement
COLUMNS = 1  # RowGroup
META_DATA, CRYPTO_METADATA = 3, 8  # ColumnChunk
CHUNK_TYPE, PATH, STATISTICS, SIZE_STATISTICS = 1, 3, 12, 16  # ColumnMetaData
BOUNDS = (1, 2, 5, 6)  # Statistics: max, min, max_value, min_value
UNENCODED_BYTES, REPETITION_HISTOGRAM, DEFINITION_HISTOGRAM = 1, 2, 3  # SizeStatistics

OPTIONAL, REPEATED = 1, 2  # FieldRepetitionType (0 is REQUIRED)
BYTE_ARRAY, FIXED_LEN_BYTE_ARRAY = 6, 7
WIDTH = {1: 4, 2: 8, 3: 12, 4: 4, 5: 8}  # bytes of a plain value: INT32 INT64 INT96 FLOAT DOUBLE
TYPES = ("BOOLEAN", "INT32", "INT64", "INT96", "FLOAT", "DOUBLE", "BYTE_ARRAY",
         "FIXED_LEN_BYTE_ARRAY")

# compact-protocol type codes
TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)


class Damaged(Exception):
    pass


class ThriftReader:
    """Values of Thrift's compact protocol: structs as {field id: value}, lists as lists."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            raise Damaged("it ends inside a structure")
        self.at += 1
        return self.data[self.at - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 70:
                raise Damaged("a number runs over 10 bytes")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, kind: int, depth: int):
        if kind in (TRUE, FALSE):  # (a list's booleans are a byte each; a field's are its type)
            return kind == TRUE
        if kind == BYTE:
            return self.byte()
        if kind in (I16, I32, I64):
            return self.zigzag()
        if kind in (DOUBLE, BINARY):
            size = 8 if kind == DOUBLE else self.varint()
            if self.at + size > len(self.data):
                raise Damaged("a value runs past its end")
            self.at += size
            return self.data[self.at - size:self.at]
        if depth > 64:
            raise Damaged("structures nest too deeply")
        if kind in (LIST, SET):
            header = self.byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            if element in (TRUE, FALSE):
                return [self.byte() == TRUE for _ in range(size)]
            return [self.value(element, depth + 1) for _ in range(size)]
        if kind == MAP:
            size = self.varint()
            types = self.byte() if size else 0
            return [(self.value(types >> 4, depth + 1), self.value(types & 0x0F, depth + 1))
                    for _ in range(size)]
        if kind == STRUCT:
            return self.struct(depth + 1)
        raise Damaged(f"an unknown value type {kind}")

    def struct(self, depth: int = 0) -> dict:
        fields, last = {}, 0
        while True:
            header = self.byte()
            if header == 0:
                return fields
            delta, kind = header >> 4, header & 0x0F
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind, depth)


def vet(metadata: pq.FileMetaData, file: str):
    """Raise ValueError where pyarrow's column-chunk accessors would abort on this footer."""
    serialised = metadata.__reduce__()[1][0].to_pybytes()  # (pickling's own bytes: no I/O)
    try:
        footer = ThriftReader(serialised).struct()
        leaves = _leaves(footer.get(SCHEMA, []))
        for group, row_group in enumerate(footer.get(ROW_GROUPS, [])):
            chunks = row_group.get(COLUMNS, [])
            if len(chunks) != len(leaves):
                raise Damaged(f"row group {group} has {len(chunks)} column chunks, its "
                              f"schema {len(leaves)} columns")
            for chunk, leaf in zip(chunks, leaves):
                _vet_chunk(chunk, leaf, group)
    except Damaged as exc:
        raise ValueError(f"cannot read {file} as Parquet: its footer is damaged ({exc})") \
            from None


def _leaves(elements: list) -> list[tuple]:
    """(name, type, type length, max repetition level, max definition level) per leaf."""
    leaves, stack = [], []  # stack: [children left, repetition, definition] per open group
    for number, element in enumerate(elements):
        children = element.get(NUM_CHILDREN, 0)
        if number == 0:  # the root: its levels are 0
            stack.append([children, 0, 0])
            continue
        while stack and stack[-1][0] == 0:
            stack.pop()
        if not stack:
            raise Damaged("its schema has elements outside the root")
        stack[-1][0] -= 1
        kind = element.get(REPETITION, 0)
        rep = stack[-1][1] + (kind == REPEATED)
        defn = stack[-1][2] + (kind in (OPTIONAL, REPEATED))
        if children:
            stack.append([children, rep, defn])
        else:
            leaves.append((element.get(4, b"?").decode(errors="replace"), element.get(TYPE),
                           element.get(TYPE_LENGTH, 0), rep, defn))
    return leaves


def _vet_chunk(chunk: dict, leaf: tuple, group: int):
    name, kind, length, max_rep, max_def = leaf
    where = f"column {name!r} of row group {group}"
    if CRYPTO_METADATA in chunk:
        raise Damaged(f"{where} is encrypted, which batchfit cannot read")
    meta = chunk.get(META_DATA)
    if not isinstance(meta, dict):
        raise Damaged(f"{where} has no metadata")
    sizes = meta.get(SIZE_STATISTICS)
    if isinstance(sizes, dict):
        for field, levels, label in ((REPETITION_HISTOGRAM, max_rep, "repetition"),
                                     (DEFINITION_HISTOGRAM, max_def, "definition")):
            histogram = sizes.get(field) or []
            if len(histogram) not in (0, levels + 1):
                raise Damaged(f"{where}: a {label}-level histogram of {len(histogram)} "
                              f"entries where its schema allows {levels + 1}")
        if UNENCODED_BYTES in sizes and kind != BYTE_ARRAY:
            raise Damaged(f"{where}: byte-array sizes for a column of another type")
    stats = meta.get(STATISTICS)
    if isinstance(stats, dict):
        if meta.get(CHUNK_TYPE) != kind:
            raise Damaged(f"{where}: its chunk's type is {_type_name(meta.get(CHUNK_TYPE))}, "
                          f"its schema's {_type_name(kind)}")
        width = length if kind == FIXED_LEN_BYTE_ARRAY else WIDTH.get(kind, 0)
        for field in BOUNDS:
            bound = stats.get(field)
            if isinstance(bound, bytes) and len(bound) < width:
                raise Damaged(f"{where}: a statistic of {len(bound)} bytes for values of "
                              f"{width}")


def _type_name(kind) -> str:
    return TYPES[kind] if isinstance(kind, int) and 0 <= kind < len(TYPES) else str(kind)
