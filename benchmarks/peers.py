"""The peers of `batchfit run` on its main job (batchfit/peers.py: a DuckDB or Polars GROUP BY
of the per-series power sums, then a vectorised 3x3 solve in numpy, float64) on files.

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

from batchfit.app import peers


def files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]


def floor(path: str, output: str, series: int, fmt: str):
    """pyarrow streaming the input's three columns (nothing else done with them), then
    writing a table of the output's size (``batchfit run``'s 18 columns, one row per series:
    the frame's among them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files(path):
        for _ in pq.ParquetFile(file, pre_buffer=False).iter_batches(
                batch_size=1 << 20 if fmt == "long" else 1 << 14,
                columns=["series_id", "x", "y"]):
            pass
    columns = {"series_id": np.arange(series)}
    columns |= {name: np.zeros(series) for name in ("a", "b", "c", "a_stderr", "b_stderr",
                                                     "c_stderr", "x_centre", "x_scale",
                                                     "a_frame", "b_frame", "c_frame")}
    columns |= {"n_points": np.zeros(series, np.int64)}
    columns |= {name: np.zeros(series) for name in ("loss", "rmse", "r2")}
    columns |= {"iterations": np.ones(series, np.int64), "status": pa.array(["ok"] * series)}
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
    ids, p = peers.fit(args.tool, files(args.input), list_format=args.format == "list")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"series_id": ids, "a": p[:, 0], "b": p[:, 1], "c": p[:, 2]}),
                   args.output)


if __name__ == "__main__":
    main()
