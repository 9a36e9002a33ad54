"""Load run: `batchfit run` over very many short series, streamed, then reconciled.

    python benchmarks/bench_load.py --series 1e7 --points 10 --dir /tmp/load

Generates the data with `batchfit generate` (unless it exists), times `batchfit run` under
`/usr/bin/time -v` (wall time, peak RSS), and reconciles the output with the input: the same
series ids, each exactly once, and the statuses counted. Prints one JSON line.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


def timed(command: list[str]) -> dict:
    done = subprocess.run(["/usr/bin/time", "-v", *command], check=False, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(v) if v else 0.0 for v in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"wall_s": hours * 3600 + minutes * 60 + seconds, "peak_rss_mb": rss / 1024,
            "stderr": done.stderr.split("\tCommand being timed")[0].strip()}


def unique_ids(path: str, column: str) -> np.ndarray:
    """The distinct ids of a (long-format) file, read a row group at a time."""
    handle = pq.ParquetFile(path)
    seen = [np.unique(handle.read_row_group(i, columns=[column])[column].to_numpy())
            for i in range(handle.num_row_groups)]
    return np.unique(np.concatenate(seen))


def reconcile(data: str, output: str) -> dict:
    ids_in = unique_ids(data, "series_id")
    table = pq.read_table(output, columns=["series_id", "status"])
    ids_out = table["series_id"].to_numpy()
    statuses = {row["values"]: row["counts"] for row in pc.value_counts(table["status"]).to_pylist()}
    return {"series_in": len(ids_in), "rows_out": len(ids_out),
            "duplicates_out": int(len(ids_out) - len(np.unique(ids_out))),
            "same_ids": bool(np.array_equal(np.sort(ids_out), ids_in)), "statuses": statuses}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=float, default=1e7)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--dir", default="/tmp/batchfit-load")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    series = int(args.series)
    data = os.path.join(args.dir, f"load-{series}x{args.points}.parquet")
    output = os.path.join(args.dir, "load.coeffs.parquet")
    report = {"series": series, "points": args.points}
    if not os.path.exists(data):
        report["generate"] = timed(["batchfit", "generate", data, "--series", str(series),
                                    "--points", str(args.points)])
    report["run"] = timed(["batchfit", "run", data, "-o", output, "--no-progress"])
    report["input_mb"] = os.path.getsize(data) / 2**20
    report["reconcile"] = reconcile(data, output)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
