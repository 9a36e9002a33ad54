"""`batchfit run` end to end next to its peers on the same files, each a fresh process.

    python benchmarks/bench_run.py [--sizes 1e6 2e6] [--points 100] [--dir D] [--repeats 2]
                                   [--contended] [--json out.json]

For each size, three layouts of the same data (written once, not timed): rows sorted by
series (`batchfit generate`), the same rows shuffled over 4 files, and list format. On each,
in one run and one after another: `batchfit run` (exact, the defaults), the DuckDB and
Polars GROUP BY of power sums plus a numpy solve (benchmarks/peers.py), and pyarrow's
read-plus-write floor; wall time (best of --repeats) and peak RSS by GNU time.

Reported: steady-state throughput, the marginal rate between the two sizes (series/s), and
fixed start-up, the intercept of time against size; batchfit's throughput as a multiple of
each peer's; shuffled against sorted; accuracy of every method against float64
numpy.polyfit (2,000 series), and correct digits on Unix-timestamp x against exact rational
least squares. ``--contended``: batchfit again with one CPU-bound process running beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchfit.app.generate import generate

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("batchfit", "duckdb", "polars", "floor")
LAYOUTS = ("sorted", "shuffled", "list")
ACCURACY_SERIES = 2000


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a fresh process, by GNU time."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *command],
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
        return wall, int(report.read().split()[-1]) / 1024


def command(method: str, path: str, out: str, layout: str, series: int) -> list[str]:
    fmt = "list" if layout == "list" else "long"
    if method == "batchfit":
        return [sys.executable, "-m", "batchfit", "run", path, "-o", out, "--no-progress"]
    extra = ["--series", str(series)] if method == "floor" else []
    return [sys.executable, os.path.join(HERE, "peers.py"), method, path, out,
            "--format", fmt, *extra]


def make_layouts(directory: str, n: int, points: int) -> dict[str, str]:
    paths = {"sorted": os.path.join(directory, f"sorted-{n}.parquet"),
             "list": os.path.join(directory, f"list-{n}.parquet"),
             "shuffled": os.path.join(directory, f"shuffled-{n}")}
    if not os.path.exists(paths["sorted"]):
        generate(paths["sorted"], series=n, points=points)
    if not os.path.exists(paths["list"]):
        generate(paths["list"], series=n, points=points, fmt="list")
    if not os.path.exists(paths["shuffled"]):
        table = pq.read_table(paths["sorted"])
        table = table.take(np.random.default_rng(0).permutation(table.num_rows))
        os.makedirs(paths["shuffled"])
        for i, rows in enumerate(np.array_split(np.arange(table.num_rows), 4)):
            pq.write_table(table.take(rows), os.path.join(paths["shuffled"], f"part-{i}.parquet"))
        del table
    return paths


def reference(path: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy.polyfit of the first ``count`` series of a sorted file: ids, (count, 3)."""
    rows = pq.read_table(path, filters=[("series_id", "<", count)])
    ids, x, y = (rows[c].to_numpy() for c in ("series_id", "x", "y"))
    order = np.argsort(ids, kind="stable")
    ids, x, y = ids[order], x[order].astype(float), y[order].astype(float)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    coefs = np.array([np.polyfit(x[a:b], y[a:b], 2) for a, b in zip(starts, ends)])
    return ids[starts], coefs


def accuracy(out: str, ids: np.ndarray, want: np.ndarray) -> float:
    """Max over the series of |coef - polyfit| / max |polyfit coef|."""
    table = pq.read_table(out, columns=["series_id", "a", "b", "c"])
    got_ids = table["series_id"].to_numpy()
    pick = {sid: i for i, sid in enumerate(got_ids)}
    rows = np.array([pick[i] for i in ids])
    got = np.stack([table[c].to_numpy()[rows] for c in ("a", "b", "c")], 1)
    return float(np.max(np.abs(got - want).max(1) / np.abs(want).max(1)))


def timestamp_digits(directory: str) -> dict:
    """Correct digits of the raw coefficients on x = Unix timestamps (a day of samples at
    1.7e9 s, float64), against exact rational least squares, for batchfit and the peers."""
    sys.path.insert(0, HERE)
    from conditioning import coef_digits, oracle

    rng = np.random.default_rng(3)
    series, points = 20, 100
    x = 1.7e9 + np.sort(rng.uniform(0, 86400, (series, points)), axis=1)
    t = (x - 1.7e9) / 86400
    y = 20 + 3 * t - 5 * t**2 + rng.normal(0, 0.1, x.shape)
    path = os.path.join(directory, "timestamps.parquet")
    pq.write_table(pa.table({"series_id": np.repeat(np.arange(series), points),
                             "x": x.ravel(), "y": y.ravel()}), path)
    exact = [oracle(x[i], y[i], 2).coef for i in range(series)]  # a, b, c
    digits = {}
    for method in ("batchfit", "duckdb", "polars"):
        out = os.path.join(directory, f"timestamps-{method}.parquet")
        done = subprocess.run(command(method, path, out, "sorted", series),
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:  # (numpy's solve refuses a Gram matrix lost to rounding)
            digits[method] = 0.0
            print(f"{method} failed on timestamps: {done.stderr.strip().splitlines()[-1]}",
                  file=sys.stderr)
            continue
        table = pq.read_table(out).sort_by("series_id")
        got = np.stack([table[c].to_numpy() for c in ("a", "b", "c")], 1)
        digits[method] = min(coef_digits(got[i], exact[i]) for i in range(series))
    return digits


def busy():
    """A CPU-bound competitor: one process spinning on pure Python arithmetic."""
    return subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs=2, default=[1e6, 2e6])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--dir", default=None, help="scratch directory [a temporary one]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contended", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="batchfit-bench-")
    os.makedirs(scratch, exist_ok=True)
    sizes = [int(s) for s in args.sizes]
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "sizes": sizes,
               "points": args.points, "runs": {}}
    try:
        subprocess.run([sys.executable, "-m", "batchfit", "warmup", "--quiet"], check=True)
        layouts = {n: make_layouts(scratch, n, args.points) for n in sizes}
        ids, want = reference(layouts[sizes[0]]["sorted"], ACCURACY_SERIES)
        for layout in LAYOUTS:
            for n in sizes:
                for method in METHODS:
                    out = os.path.join(scratch, f"out-{method}-{layout}-{n}.parquet")
                    best = None
                    for _ in range(args.repeats):
                        wall, rss = timed(command(method, layouts[n][layout], out, layout, n))
                        best = (wall, rss) if best is None or wall < best[0] else best
                    entry = {"wall_s": best[0], "rss_mb": best[1]}
                    if method != "floor" and n == sizes[0]:
                        entry["max_rel_error"] = accuracy(out, ids, want)
                    results["runs"][f"{method}/{layout}/{n}"] = entry
                    print(f"{method:9} {layout:9} {n:>10,}: {best[0]:6.2f} s, "
                          f"{best[1]:6.0f} MB", file=sys.stderr)
        if args.contended:
            path = layouts[sizes[0]]["sorted"]
            out = os.path.join(scratch, "contended.parquet")
            quiet, _ = timed(command("batchfit", path, out, "sorted", sizes[0]))
            competitor = busy()
            try:
                time.sleep(1)
                loaded, _ = timed(command("batchfit", path, out, "sorted", sizes[0]))
            finally:
                competitor.kill()
            results["contended"] = {"quiet_s": quiet, "contended_s": loaded,
                                    "ratio": loaded / quiet}
        results["timestamp_digits"] = timestamp_digits(scratch)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    summarise(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def summarise(results: dict):
    """Print the tables: per layout and method, times, marginal throughput and start-up."""
    n1, n2 = results["sizes"]
    runs = results["runs"]
    print(f"\n| layout | method | {n1:,} s | {n2:,} s | steady series/s | start-up s | "
          f"peak RSS MB | max rel err |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = {}
    for layout in LAYOUTS:
        for method in METHODS:
            a, b = runs[f"{method}/{layout}/{n1}"], runs[f"{method}/{layout}/{n2}"]
            rate = (n2 - n1) / max(b["wall_s"] - a["wall_s"], 1e-9)
            start = a["wall_s"] - n1 / rate
            rates[layout, method] = rate
            err = a.get("max_rel_error")
            print(f"| {layout} | {method} | {a['wall_s']:.2f} | {b['wall_s']:.2f} | "
                  f"{rate:,.0f} | {start:.2f} | {max(a['rss_mb'], b['rss_mb']):.0f} | "
                  f"{'' if err is None else f'{err:.1e}'} |")
    print("\n| layout | batchfit / DuckDB | batchfit / Polars | batchfit wall / sorted "
          "(1st size) |")
    print("| --- | ---: | ---: | ---: |")
    sorted_wall = runs[f"batchfit/sorted/{n1}"]["wall_s"]
    for layout in LAYOUTS:
        print(f"| {layout} | {rates[layout, 'batchfit'] / rates[layout, 'duckdb']:.2f}x | "
              f"{rates[layout, 'batchfit'] / rates[layout, 'polars']:.2f}x | "
              f"{runs[f'batchfit/{layout}/{n1}']['wall_s'] / sorted_wall:.2f} |")
    print("\nshuffled / sorted, steady state: "
          f"{rates['sorted', 'batchfit'] / rates['shuffled', 'batchfit']:.2f}")
    if "contended" in results:
        c = results["contended"]
        print(f"\ncontended (one CPU-bound process beside it): {c['contended_s']:.2f} s vs "
              f"{c['quiet_s']:.2f} s quiet = {c['ratio']:.2f}x")
    if "timestamp_digits" in results:
        print("\ncorrect digits on Unix-timestamp x (vs exact least squares): " + ", ".join(
            f"{k} {v:.1f}" for k, v in results["timestamp_digits"].items()))


if __name__ == "__main__":
    main()
