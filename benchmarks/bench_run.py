"""End-to-end `batchfit run` on generated long-format data, next to the Parquet floor.

Run:  python benchmarks/bench_run.py [--sizes 1e5 1e6] [--points 100] [--big 2e6] [--dir D]

For each size: generate the data (not timed), then time in one process run
  * the floor: pyarrow reading the input's columns plus writing a table of the output's size;
  * `batchfit run` as a user runs it (a subprocess: start-up included), wall and peak RSS
    (from the kernel's rusage of the child);
  * the same input shuffled (rows in random order, 4 files), for the sorted/shuffled ratio.
Plus `batchfit run` on a 10,000-series file (wall incl. start-up), and with --big N the
peak RSS of one run over an N-series input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchfit.generate import generate


def floor_seconds(path: str, n_series: int) -> float:
    """pyarrow streaming the input's columns (faster here than read_table, which buffers the
    whole table) plus writing a table of the output's size."""
    start = time.perf_counter()
    for _ in pq.ParquetFile(path, pre_buffer=False).iter_batches(
            batch_size=1 << 20, columns=["series_id", "x", "y"]):
        pass
    out = pa.table({name: np.zeros(n_series) for name in
                    ["a", "b", "c", "a_stderr", "b_stderr", "c_stderr", "loss", "rmse", "r2"]}
                   | {"series_id": np.arange(n_series), "n_points": np.zeros(n_series, int),
                      "iterations": np.zeros(n_series, int),
                      "status": pa.array(["ok"] * n_series)})
    with tempfile.NamedTemporaryFile(suffix=".parquet", dir=os.path.dirname(path)) as f:
        pq.write_table(out, f.name)
    return time.perf_counter() - start


def run_cli(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `batchfit run ...` in a fresh process, measured by
    GNU time (the process tree's own peak, not the largest child seen so far)."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", sys.executable, "-m",
                        "batchfit", "run", *args, "--no-progress"], check=True,
                       capture_output=True)
        wall = time.perf_counter() - start
        return wall, int(report.read().split()[-1]) / 1024


def shuffled_copy(path: str, directory: str, seed: int = 0) -> str:
    table = pq.read_table(path)
    table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    os.makedirs(directory)
    for i, rows in enumerate(np.array_split(np.arange(table.num_rows), 4)):
        pq.write_table(table.take(rows), os.path.join(directory, f"part-{i}.parquet"))
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--big", type=float, default=0, help="also: peak RSS at this size")
    parser.add_argument("--dir", default=None, help="scratch directory [a temporary one]")
    args = parser.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="batchfit-bench-")
    try:
        small = os.path.join(scratch, "small.parquet")
        generate(small, series=10_000, points=args.points)
        run_cli(small, "-o", small + ".out")  # warm the OS caches and inductor's disk cache
        wall, rss = run_cli(small, "-o", small + ".out")
        print(f"10,000 series x {args.points}: batchfit run {wall:.2f} s wall incl. start-up, "
              f"peak RSS {rss:.0f} MB")
        print(f"\n{'series':>10} {'floor':>8} {'run':>8} {'run/floor':>10} {'series/s':>11} "
              f"{'peak RSS':>9} {'shuffled':>9} {'shuf/sorted':>12}")
        for size in args.sizes:
            n = int(size)
            path = os.path.join(scratch, f"d{n}.parquet")
            generate(path, series=n, points=args.points)
            floor = floor_seconds(path, n)
            run_cli(path, "-o", path + ".out")  # first run may compile; report the next
            wall, rss = run_cli(path, "-o", path + ".out")
            shuffled = shuffled_copy(path, os.path.join(scratch, f"s{n}"))
            shuffled_wall, _ = run_cli(shuffled, "-o", path + ".shuf.out")
            same = pq.read_table(path + ".out").equals(pq.read_table(path + ".shuf.out"))
            print(f"{n:>10,} {floor:>7.2f}s {wall:>7.2f}s {wall / floor:>10.1f} "
                  f"{n / wall:>11,.0f} {rss:>7.0f}MB {shuffled_wall:>8.2f}s "
                  f"{shuffled_wall / wall:>12.2f}{'' if same else '  OUTPUT DIFFERS'}")
        if args.big:
            n = int(args.big)
            path = os.path.join(scratch, f"big{n}.parquet")
            generate(path, series=n, points=args.points)
            wall, rss = run_cli(path, "-o", path + ".out")
            print(f"\n{n:,} series x {args.points}: {wall:.2f} s, peak RSS {rss:.0f} MB "
                  f"(input {os.path.getsize(path) / 2**20:.0f} MB on disk)")
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
