"""The peers of `batchfit run` on its main job, as a user would write them: a DuckDB or Polars
GROUP BY of the per-series power sums, then a vectorised 3x3 solve in numpy (float64).

    python benchmarks/peers.py duckdb|polars|floor INPUT OUTPUT [--format long|list]

Each run is a fresh process (what bench_run.py times): imports, reading, the aggregation,
the solve and writing the coefficients (series_id, a, b, c) to OUTPUT. ``floor`` is pyarrow
alone: reading the input's columns and writing a table of the output's size.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

POWER_SUMS = ["count(*) AS n", "sum(x) AS s1", "sum(x*x) AS s2", "sum(x*x*x) AS s3",
              "sum(x*x*x*x) AS s4", "sum(y) AS t0", "sum(x*y) AS t1", "sum(x*x*y) AS t2"]


def solve(sums: dict) -> np.ndarray:
    """(B, 3) coefficients, lowest power first, from the power sums."""
    n = sums["n"].astype(np.float64)
    s1, s2, s3, s4 = (sums[k] for k in ("s1", "s2", "s3", "s4"))
    gram = np.stack([np.stack([n, s1, s2], -1), np.stack([s1, s2, s3], -1),
                     np.stack([s2, s3, s4], -1)], -2)
    rhs = np.stack([sums["t0"], sums["t1"], sums["t2"]], -1)
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]


def duckdb_sums(path: str, fmt: str) -> dict:
    import duckdb

    source = f"read_parquet({files(path)!r})"
    if fmt == "list":
        source = f"(SELECT series_id, unnest(x) AS x, unnest(y) AS y FROM {source})"
    query = (f"SELECT series_id, {', '.join(POWER_SUMS)} FROM (SELECT series_id, "
             f"x::DOUBLE AS x, y::DOUBLE AS y FROM {source}) GROUP BY series_id")
    table = duckdb.connect().sql(query).to_arrow_table()
    return {name: table[name].to_numpy() for name in table.column_names}


def polars_sums(path: str, fmt: str) -> dict:
    import polars as pl

    frame = pl.scan_parquet(files(path))
    if fmt == "list":
        frame = frame.explode(["x", "y"])
    frame = frame.with_columns(pl.col("x").cast(pl.Float64), pl.col("y").cast(pl.Float64))
    x, y = pl.col("x"), pl.col("y")
    out = frame.group_by("series_id").agg(
        pl.len().alias("n"), x.sum().alias("s1"), (x * x).sum().alias("s2"),
        (x * x * x).sum().alias("s3"), (x * x * x * x).sum().alias("s4"),
        y.sum().alias("t0"), (x * y).sum().alias("t1"), (x * x * y).sum().alias("t2")).collect()
    return {name: out[name].to_numpy() for name in out.columns}


def floor(path: str, output: str, series: int, fmt: str):
    """pyarrow streaming the input's three columns (nothing else done with them), then
    writing a table of the output's size (13 columns, one row per series)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files(path):
        for _ in pq.ParquetFile(file, pre_buffer=False).iter_batches(
                batch_size=1 << 20 if fmt == "long" else 1 << 14,
                columns=["series_id", "x", "y"]):
            pass
    columns = {"series_id": np.arange(series)}
    columns |= {name: np.zeros(series) for name in ("a", "b", "c", "a_stderr", "b_stderr",
                                                     "c_stderr", "loss", "rmse", "r2")}
    columns |= {"n_points": np.zeros(series, np.int64), "iterations": np.ones(series, np.int64),
                "status": pa.array(["ok"] * series)}
    pq.write_table(pa.table(columns), output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=["duckdb", "polars", "floor"])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--format", choices=["long", "list"], default="long")
    parser.add_argument("--series", type=int, default=0, help="floor: the output's rows")
    args = parser.parse_args()
    if args.tool == "floor":
        floor(args.input, args.output, args.series, args.format)
        return
    sums = (duckdb_sums if args.tool == "duckdb" else polars_sums)(args.input, args.format)
    p = solve(sums)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"series_id": sums["series_id"], "a": p[:, 2], "b": p[:, 1],
                             "c": p[:, 0]}), args.output)


if __name__ == "__main__":
    main()
