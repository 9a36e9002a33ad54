"""Readers of batchfit's own artefacts: coefficient files, histories, metadata, and the
points of chosen series (for plots). Nothing read is ever evaluated or unpickled: metadata
is parsed as JSON and checked."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from batchfit.core.names import FAMILY_PARAMS, MAX_DEGREE, family_columns, poly_columns
from batchfit.io import storage
from batchfit.io.listing import list_files
from batchfit.io.schema import first_line


def read_metadata(path: str) -> dict:
    """The ``batchfit`` metadata entry of an output file."""
    filesystem, inner = storage.locate(path)
    metadata = pq.read_schema(inner, filesystem=filesystem).metadata or {}
    return json.loads(metadata.get(b"batchfit", b"{}"))


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
            filesystem, inner = storage.locate(file)
            tables.append(pq.read_table(inner, columns=columns, filters=filters,
                                        filesystem=filesystem))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"cannot read {file}: {first_line(exc)}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_coefficients(path: str) -> tuple[pa.Table, dict]:
    """An output file of ``batchfit run``: its table (the id column as ``series_id``) and
    ``batchfit`` metadata (see ``coefficient_table``)."""
    return coefficient_table(read_parquet(path), path)


def coefficient_table(table: pa.Table, source: str) -> tuple[pa.Table, dict]:
    """An output table (``source`` names it in errors): the table with its id column as
    ``series_id``, and its ``batchfit`` metadata with ``model``, ``degree`` and ``columns``
    ((name, parameter index) of the coefficients) read from the columns there."""
    path = source
    names = table.column_names
    meta = _json_object((table.schema.metadata or {}).get(b"batchfit", b"{}"))
    id_name = meta.get("id_column") if meta.get("id_column") in names else "series_id"
    if "status" not in names or id_name not in names:
        raise ValueError(f"{path} is not a batchfit coefficients table")
    if id_name != "series_id":  # (the output keeps the input's name; here it is series_id)
        names = ["series_id" if name == id_name else name for name in names]
        table = table.rename_columns(names)
    choice = meta.get("candidate_columns")  # a model choice: every candidate's columns
    if isinstance(choice, dict) and "model" in names and all(
            name in names for columns in choice.values() for name in columns):
        return table, {**meta, "model": "auto", "degree": None, "columns": []}
    stated = meta.get("param_columns")
    if meta.get("model") == "formula":  # (before the polynomial: a formula's a, b, c)
        if not (isinstance(meta.get("formula"), str) and _named_columns(stated, names)):
            raise ValueError(f"{path} was written from a formula model but its metadata lacks "
                             f"the formula or its parameter columns")
        return table, {**meta, "degree": None,
                       "columns": [(name, i) for i, name in enumerate(stated)]}
    # The metadata may only name a built-in family; the columns must then be there.
    family = meta.get("model") if meta.get("model") in FAMILY_PARAMS else None
    if family is not None and all(name in names for name, _ in family_columns(family)):
        return table, {**meta, "model": family, "degree": None,
                       "columns": list(family_columns(family))}
    degree = next((d for d in range(MAX_DEGREE, -1, -1)
                   if all(name in names for name, _ in poly_columns(d))), None)
    if degree is not None:
        return table, {**meta, "model": "poly", "degree": degree,
                       "columns": list(poly_columns(degree))}
    if _named_columns(stated, names):  # a custom model: its columns, if really there
        return table, {**meta, "model": None, "degree": None,
                       "columns": [(name, i) for i, name in enumerate(stated)]}
    raise ValueError(f"{path} has no coefficient columns")


def _named_columns(stated, names) -> bool:
    """Whether the metadata's ``param_columns`` are a list of columns that are there."""
    return isinstance(stated, list) and bool(stated) and all(
        isinstance(name, str) and name in names for name in stated)
