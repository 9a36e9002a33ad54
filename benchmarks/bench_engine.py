"""Throughput of the engine: exact (eager, compiled) vs numpy.polyfit vs the memory floor.

Run:  python benchmarks/bench_engine.py [--sizes 1e4 1e5 1e6] [--points 100] [--json out.json]

Times are medians of repeats after a warm-up; compile time (the first call) is reported apart.
The numpy.polyfit loop runs on a subset and is extrapolated (marked ``~``). Also times the
seed's GD protocol (lr 1e-3, 15,000 epochs) on --gd-series series.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np
import torch

import batchfit
from batchfit.demo import seed_dataset


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def polyfit_loop(x, y, limit: int) -> tuple[float, bool]:
    """Seconds for a numpy.polyfit loop over all rows, extrapolated from ``limit`` rows."""
    rows = min(limit, len(y))
    start = time.perf_counter()
    for i in range(rows):
        np.polyfit(x[i], y[i], 2)
    return (time.perf_counter() - start) * len(y) / rows, rows < len(y)


def bench_sizes(sizes, points, repeats, polyfit_rows) -> list[dict]:
    rows = []
    read_once = torch.compile(lambda x, y: x.sum(1) + y.sum(1), dynamic=True)
    for batch in sizes:
        x, y = seed_dataset(batch, points)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        _, floor = timed(lambda xt=xt, yt=yt: read_once(xt, yt), repeats)
        compile_s, compiled = timed(lambda xt=xt, yt=yt: batchfit.fit(xt, yt, compile=True),
                                    repeats)
        _, eager = timed(lambda xt=xt, yt=yt: batchfit.fit(xt, yt, compile=False),
                         max(1, repeats // 2))
        loop, extrapolated = polyfit_loop(x, y, polyfit_rows)
        rows.append({"series": batch, "points": points, "floor_s": floor,
                     "exact_compiled_s": compiled, "exact_first_call_s": compile_s,
                     "exact_eager_s": eager, "polyfit_loop_s": loop,
                     "polyfit_extrapolated": extrapolated})
    return rows


def bench_gd(batch: int, points: int) -> dict:
    x, y = seed_dataset(batch, points)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    batchfit.fit(xt[:64], yt[:64], solver="gd", epochs=20, compile=True)  # compile once
    warm = time.perf_counter() - start
    start = time.perf_counter()
    result = batchfit.fit(xt, yt, solver="gd", compile=True)
    seconds = time.perf_counter() - start
    return {"series": batch, "points": points, "epochs": 15000, "seconds": seconds,
            "ms_per_epoch": 1e3 * seconds / 15000, "compile_and_warmup_s": warm,
            "statuses": result.status_counts()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--polyfit-rows", type=int, default=20_000)
    parser.add_argument("--gd-series", type=int, default=100_000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"gpu {info['gpu']}")
    rows = bench_sizes([int(s) for s in args.sizes], args.points, args.repeats,
                       args.polyfit_rows)
    print(f"\n{'series':>9} {'floor':>9} {'exact cmp':>10} {'exact eager':>12} "
          f"{'polyfit loop':>13} {'fits/s cmp':>12} {'floor/cmp':>10} {'vs polyfit':>11}")
    for r in rows:
        mark = "~" if r["polyfit_extrapolated"] else " "
        print(f"{r['series']:>9,} {r['floor_s']:>8.4f}s {r['exact_compiled_s']:>9.4f}s "
              f"{r['exact_eager_s']:>11.4f}s {mark}{r['polyfit_loop_s']:>11.2f}s "
              f"{r['series'] / r['exact_compiled_s']:>12,.0f} "
              f"{r['floor_s'] / r['exact_compiled_s']:>10.2f} "
              f"{r['polyfit_loop_s'] / r['exact_compiled_s']:>10.0f}x")
    print("(~ = extrapolated from a subset; floor = one compiled read of x and y; "
          f"first compiled call incl. compile: {rows[0]['exact_first_call_s']:.1f} s)")
    gd = bench_gd(args.gd_series, args.points) if args.gd_series else None
    if gd:
        print(f"\nGD, seed protocol (lr 1e-3, 15,000 epochs), {gd['series']:,} series: "
              f"{gd['seconds']:.2f} s ({gd['ms_per_epoch']:.3f} ms/epoch), "
              f"statuses {gd['statuses']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "exact": rows, "gd": gd}, f, indent=2)


if __name__ == "__main__":
    main()
