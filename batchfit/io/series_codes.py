"""Dense integer codes 0, 1, 2, ... for series ids, so that the aggregation can give each
series a row of its statistics table. ``DenseCodes`` takes integer ids whose range the files'
statistics give, small enough for a row per id in it: the code is the id less the smallest,
with no hashing. ``HashedCodes`` takes any ids, in order of first appearance, through a hash
table that looks up each run of equal ids once. Both split their work in two: ``prepare``
(thread-safe, in the decoding threads) and ``encode`` (in input order, in one thread, which
assigns the codes and, in list format, refuses an id seen before). ``dense_row_bytes`` is
what a code costs the aggregation, to decide between them; ``run_starts`` finds where runs of
equal ids begin (for the hash table, and for cutting whole series)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchfit.moments import layout as moments


def dense_row_bytes(degree: int, weighted: bool) -> int:
    """Memory per series code of the aggregation of a ``degree`` polynomial: its statistics
    row, a refinement's Chebyshev coefficients and residual moments (``job._refine``), and
    its seen, taken and flagged bytes."""
    k = degree + 1
    return 8 * (moments.width(degree, weighted) + k + (k + 1) * (2 if weighted else 1)) + 3


def run_starts(ids: pa.Array) -> np.ndarray:
    """Indices where a new series id begins (0 included)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    changes = pc.indices_nonzero(pc.not_equal(ids[1:], ids[:-1])).to_numpy()
    return np.concatenate([[0], changes.astype(np.int64) + 1])


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
            starts = run_starts(ids)
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
