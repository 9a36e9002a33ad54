"""Whole series, back to back, for the solvers that need each series' points together
(robust losses, nonlinear models, GD/Adam). A ``Chunk`` holds some series' points as flat
arrays and the offsets where each series begins. ``whole_series`` turns a stream of batches
whose series are contiguous into chunks: in list format a row is a series; in long format a
series cut by a batch boundary is carried into the next batch. Every series' points come in
one canonical order, by (x, y), so that a fit never depends on how the input was laid out;
``canonical_order`` also sorts a table by series id first, for input whose series are
scattered. ``scan_ids`` is the one pass over the ids that tells whether they are contiguous,
and ``table_chunks`` does all of it for a table in memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchfit.io.schema import ColumnSpec, Layout, cast_to, describe, has_types, to_float
from batchfit.io.series_codes import run_starts


@dataclass(frozen=True)
class Chunk:
    """Whole series, back to back: series i owns ``x[offsets[i]:offsets[i + 1]]``."""

    ids: pa.Array  # one per series, the input's id type
    x: np.ndarray  # (points,), or (points, d) for x with d columns (``ColumnSpec.x_columns``)
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


def table_chunks(table: pa.Table, spec: ColumnSpec) -> Iterator[Chunk]:
    """The chunks of an in-memory table (long or list format), as ``Dataset.chunks``."""
    layout = describe(table.schema, spec, "the table")
    table = table.select(layout.columns)
    if not has_types(table, layout.schema()):  # dictionaries decoded, null columns float64
        table = cast_to(table, layout.schema(), spec.series_id)
    contiguous, _, _ = scan_ids(table.select([spec.series_id]).to_batches(), layout)
    if layout.format == "long" and not contiguous:
        table = table.take(canonical_order(table, spec))
    yield from whole_series(table.to_batches(), layout)


def scan_ids(batches: Iterator[pa.RecordBatch], layout: Layout):
    """One pass over the ids (each batch: the id column alone): are the series contiguous,
    how many are there, and (when they are not contiguous) their distinct ids, sorted."""
    run_ids, last = [], None
    for batch in batches:
        ids = batch.column(0)
        if ids.null_count:
            raise ValueError(f"column {layout.spec.series_id!r} has null ids")
        if layout.format == "list":
            run_ids.append(ids)
            continue
        starts = run_starts(ids)
        if last is not None and len(ids) and ids[0] == last:
            starts = starts[1:]  # the previous batch's last series goes on
        run_ids.append(ids.take(pa.array(starts, pa.int64())))
        if len(ids):
            last = ids[-1]
    runs = pa.chunked_array(run_ids, type=layout.id_type)
    if pa.types.is_integer(layout.id_type):
        # An in-place numpy sort needs ~8 bytes per series; Arrow's hash-based distinct
        # count needs ~15x that (1.5 GB for 1e7 series).
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


def whole_series(batches, layout: Layout) -> Iterator[Chunk]:
    """Batches (or tables) whose series are contiguous, as chunks of whole series."""
    if layout.format == "list":
        for batch in batches:
            if batch.num_rows:
                yield list_chunk(batch, layout)
    else:
        yield from _long_chunks(batches, layout)


def canonical_order(table: pa.Table, spec: ColumnSpec) -> pa.Array:
    """Sort by (series id, x, y) (x's columns in turn): equal inputs in any row order give
    equal sums."""
    return pc.sort_indices(table, sort_keys=[(spec.series_id, "ascending")] + [
        (name, "ascending") for name in (*spec.x_columns, spec.y)])


def _is_canonical(keys: list[np.ndarray], starts: np.ndarray) -> bool:
    """Are the points of every series already sorted by ``keys`` (x's columns, then y)?"""
    if len(keys[0]) < 2:
        return True
    new_series = np.zeros(len(keys[0]) - 1, dtype=bool)
    new_series[starts[1:] - 1] = True
    with np.errstate(invalid="ignore"):  # inf - inf is NaN: "not sorted" (only costs a sort)
        step = np.diff(keys[0])
        rising = (step > 0) | new_series
        if rising.all():  # the common case (x increasing within each series): y is not read
            return True
        ordered = np.diff(keys[-1]) >= 0  # (lexicographic: the last key decides ties)
        for key in reversed(keys[1:-1]):
            later = np.diff(key)
            ordered = (later > 0) | ((later == 0) & ordered)
    return bool(np.all(rising | ((step == 0) & ordered)))


def _stacked_x(columns: list[np.ndarray]) -> np.ndarray:
    """x of one column as it is; of d columns (points, d), of one float dtype."""
    if len(columns) == 1:
        return columns[0]
    return np.stack(columns, axis=1).astype(np.result_type(*columns), copy=False)


def _long_chunks(batches, layout: Layout) -> Iterator[Chunk]:
    """Contiguous long-format batches (or tables) -> whole-series chunks; a series cut by a
    batch boundary is carried into the next batch, and the last series joins the last chunk
    (a chunk of one series would be fitted alone, and slowly)."""
    spec = layout.spec
    # carry: the pieces of the last series so far, joined only once it ends (joining them
    # at every batch would copy a series of millions of points once per batch: quadratic)
    carry, pending = [], None
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if not table.num_rows:
            continue
        table = table.combine_chunks()
        ids = table.column(spec.series_id).chunk(0)
        starts = run_starts(ids)
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
        pending = (table, run_starts(table.column(spec.series_id).chunk(0)))
    if pending is not None:
        yield _long_chunk(*pending, layout)


def _long_chunk(table: pa.Table, starts: np.ndarray, layout: Layout) -> Chunk:
    spec = layout.spec
    ids = table.column(spec.series_id).combine_chunks()
    xs = [to_float(table.column(name)) for name in spec.x_columns]
    y = to_float(table.column(spec.y))
    w = to_float(table.column(spec.weight)) if layout.has_weight else None
    offsets = np.append(starts, len(ids)).astype(np.int64)
    x = _stacked_x(xs)
    if not _is_canonical([*xs, y], starts):
        # Sort the points of each series by (x, y) and leave the series where they are:
        # sorting by id would reorder series whose ids are not ascending (grouped input
        # need not be sorted), and ``starts`` would then cut the wrong series.
        run = np.repeat(np.arange(len(starts)), np.diff(offsets))
        keys = {"run": run, **{f"x{j}": values for j, values in enumerate(xs)}, "y": y}
        order = pc.sort_indices(pa.table(keys), sort_keys=[
            (name, "ascending") for name in keys]).to_numpy()
        x, y, w = x[order], y[order], None if w is None else w[order]
    return Chunk(ids.take(pa.array(starts, pa.int64())), x, y, w, offsets)


def list_chunk(batch: pa.RecordBatch, layout: Layout) -> Chunk:
    """A list-format batch as a chunk: each row one series, its lists' elements its points
    (the lists of a row must be of one length; a null list: a series without points)."""
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
    d = len(spec.x_columns)
    return Chunk(ids, _stacked_x(values[:d]), values[d],
                 values[d + 1] if layout.has_weight else None, offsets)
