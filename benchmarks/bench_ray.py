"""`batchfit run --engine ray` next to the single-machine run, on generated long format.

Run:  python benchmarks/bench_ray.py [--series 1e6] [--points 100] [--dir D]
Both are fresh processes (`python -m batchfit run ...`), timed wall-clock with peak RSS by
GNU time (the Ray run's RSS is the driver's; its workers are separate processes). The
outputs are checked equal.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq

from batchfit.generate import generate


def timed(*args):
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", sys.executable,
                               "-m", "batchfit", "run", *args, "--no-progress"],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        wall = time.perf_counter() - start
        return wall, int(report.read().split()[-1]) / 1024, done.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=float, default=1e6)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--dir")
    args = parser.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="batchfit-ray-")
    try:
        data = os.path.join(scratch, "d.parquet")
        if not os.path.exists(data):
            generate(data, series=int(args.series), points=args.points)
        single, single_rss, _ = timed(data, "-o", os.path.join(scratch, "one.parquet"))
        ray_wall, ray_rss, log = timed(data, "-o", os.path.join(scratch, "ray"),
                                       "--engine", "ray")
        one = pq.read_table(os.path.join(scratch, "one.parquet")).sort_by("series_id")
        out = pq.read_table(os.path.join(scratch, "ray")).sort_by("series_id")
        same = one.replace_schema_metadata(None).equals(out.replace_schema_metadata(None))
        print(f"{int(args.series):,} series x {args.points}: single machine {single:.1f} s "
              f"(peak RSS {single_rss:.0f} MB); --engine ray {ray_wall:.1f} s (driver RSS "
              f"{ray_rss:.0f} MB); outputs equal: {same}")
        print(log.strip().splitlines()[-2])
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
