"""The peers of batchfit's main job, written as a data engineer would: a DuckDB or Polars
GROUP BY of the per-series power sums, then a vectorised 3x3 solve in numpy (float64).

Used by ``batchfit bench`` (on an in-memory Arrow table) and ``benchmarks/peers.py`` (on
files, each a fresh process). Imports neither torch nor the peers until asked; duckdb and
polars come with the ``bench`` extra.
"""

from __future__ import annotations

import numpy as np

POWER_SUMS = {"n": "count(*)", "s1": "sum(x)", "s2": "sum(x*x)", "s3": "sum(x*x*x)",
              "s4": "sum(x*x*x*x)", "t0": "sum(y)", "t1": "sum(x*y)", "t2": "sum(x*x*y)"}
TOOLS = ("duckdb", "polars")


def solve(sums: dict) -> np.ndarray:
    """(B, 3) coefficients, highest power first (a, b, c), from the power sums."""
    n = np.asarray(sums["n"], dtype=np.float64)
    s1, s2, s3, s4 = (sums[k] for k in ("s1", "s2", "s3", "s4"))
    gram = np.stack([np.stack([n, s1, s2], -1), np.stack([s1, s2, s3], -1),
                     np.stack([s2, s3, s4], -1)], -2)
    rhs = np.stack([sums["t0"], sums["t1"], sums["t2"]], -1)
    return np.linalg.solve(gram, rhs[..., None])[..., ::-1, 0]


def _missing(tool: str) -> ValueError:
    return ValueError(f"{tool} is not installed: pip install 'batchfit[bench]'")


def duckdb_sums(source, list_format: bool = False) -> dict:
    """Per-series power sums of ``source``: a list of Parquet paths or an Arrow table with
    columns series_id, x, y."""
    try:
        import duckdb
    except ImportError:
        raise _missing("duckdb") from None
    con = duckdb.connect()
    if isinstance(source, list):
        relation = f"read_parquet({source!r})"
    else:
        con.register("points", source)
        relation = "points"
    if list_format:
        relation = f"(SELECT series_id, unnest(x) AS x, unnest(y) AS y FROM {relation})"
    sums = ", ".join(f"{expr} AS {name}" for name, expr in POWER_SUMS.items())
    table = con.sql(f"SELECT series_id, {sums} FROM (SELECT series_id, x::DOUBLE AS x, "
                    f"y::DOUBLE AS y FROM {relation}) GROUP BY series_id").to_arrow_table()
    return {name: table[name].to_numpy() for name in table.column_names}


def polars_sums(source, list_format: bool = False) -> dict:
    """As ``duckdb_sums``, with a lazy Polars query."""
    try:
        import polars as pl
    except ImportError:
        raise _missing("polars") from None
    frame = pl.scan_parquet(source) if isinstance(source, list) else pl.from_arrow(source).lazy()
    if list_format:
        frame = frame.explode(["x", "y"])
    x, y = pl.col("x").cast(pl.Float64), pl.col("y").cast(pl.Float64)
    powers = {"s1": x, "s2": x * x, "s3": x * x * x, "s4": x * x * x * x, "t0": y,
              "t1": x * y, "t2": x * x * y}
    out = frame.group_by("series_id").agg(
        pl.len().alias("n"), *(e.sum().alias(name) for name, e in powers.items())).collect()
    return {name: out[name].to_numpy() for name in out.columns}


def fit(tool: str, source, list_format: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(series ids, (B, 3) coefficients a, b, c) by ``tool``'s GROUP BY and the numpy solve."""
    sums = (duckdb_sums if tool == "duckdb" else polars_sums)(source, list_format)
    return sums["series_id"], solve(sums)
