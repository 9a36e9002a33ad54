"""Decoding a piece of the input into what the aggregation kernel takes: flat numpy arrays of
x, y and weights, all float32 or all float64, and the piece's ids prepared for coding
(``SeriesCodes.prepare``). ``decode`` runs in the reader's threads, one unit of a file (a
Parquet row group, or a whole CSV or IPC file) at a time; the ids are coded later, in input
order, into a ``Batch``. Errors of a piece (an id that does not fit the common id type, a
null id) name its file."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchfit.io.chunks import list_chunk
from batchfit.io.schema import Layout, cast_to, first_line, has_types, single, to_float


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


def decode(task, layout: Layout, codes) -> Iterator[tuple]:
    """The pieces of one unit of a file, decoded in turn: (ids, x, y, w, file) with x, y, w
    flat float arrays of one dtype and ids per point (long format) or per series (list),
    as ``codes.prepare`` gives them. ``task``: (source, unit, rows per piece, pieces to
    skip)."""
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
            empty = np.zeros(0)
            return codes.prepare(ids, np.zeros(0, np.int64), file), *_flat(
                empty, empty, empty if layout.has_weight else None, file)
        chunk = list_chunk(table.combine_chunks().to_batches()[0], layout)
        lengths = np.diff(chunk.offsets)
        return codes.prepare(ids, lengths, file), *_flat(chunk.x, chunk.y, chunk.w, file)
    x, y = to_float(table.column(layout.spec.x)), to_float(table.column(layout.spec.y))
    w = to_float(table.column(layout.spec.weight)) if layout.has_weight else None
    return codes.prepare(ids, None, file), *_flat(x, y, w, file)


def _flat(x, y, w, file: str):
    """x, y, w of one float dtype (float32 only when all three are), and where they come
    from (for errors found later)."""
    values = [v for v in (x, y, w) if v is not None]
    if any(v.dtype != np.float32 for v in values):
        x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
        w = None if w is None else w.astype(np.float64, copy=False)
    return x, y, w, file
