"""Arrow for what callers hold in memory rather than in files: a table of series given as a
pyarrow Table, a pandas or polars DataFrame or any Arrow stream (``arrow_table``), series ids
given by a user in a dataset's id type (``ids_of_type``, for ``--track-ids`` and plots), and
the positions of chosen ids among a chunk's (``positions_in``, ``indices``), so that the
layers above handle ids without importing pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchfit.io.schema import first_line


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
    """Positions as an Arrow array, to ``take`` with."""
    return pa.array(positions, pa.int64())
