"""hill4 on many dose-response curves: ``batchfit.fit`` next to a ``scipy.optimize.curve_fit``
loop on the same curves.

    python benchmarks/bench_hill4.py [--series 100000] [--doses 10] [--scipy 2000]
                                     [--json benchmarks/results-hill4-cpu.json]

Curves: ``doses`` log-spaced doses from 1e-3 to 1e2, bottom U(0, 1), top U(4, 6), log_ec50
U(-1.5, 0.5), slope U(0.7, 2), Gaussian noise of sd 0.2. Each dtype is timed in three fresh
processes, a first call and a warm second call in each, all with the default policy
(``compile="auto"``): with an empty kernel cache and no background builder (eager: what a
machine sees before any kernel is kept); with the machine's cache as it is (a missing kernel
runs eager, and is built in the background after the process ends); and, once those
builders are done, again (loading the kept kernels). scipy's loop fits the first ``scipy``
curves from batchfit's own data-driven starts (not timed) and is extrapolated to fits/s.
Agreement: batchfit's float64 parameters against scipy's on those curves.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np
from scipy.optimize import curve_fit

NOISE = 0.2
RUNS = ("eager", "as is", "kept")
LABELS = {"eager": "no kept kernels (eager)", "as is": "machine's cache as it was",
          "kept": "kernels kept"}
RANGES = ((0.0, 1.0), (4.0, 6.0), (-1.5, 0.5), (0.7, 2.0))


def curves(series: int, doses: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = 10 ** np.linspace(-3, 2, doses)
    low, high = np.array(RANGES).T
    truth = rng.uniform(low, high, (series, 4))
    y = hill(x[None], *truth.T[:, :, None]) + NOISE * rng.normal(size=(series, doses))
    return x, y, truth


def hill(x, bottom, top, log_ec50, slope):
    return bottom + (top - bottom) / (1 + 10 ** ((log_ec50 - np.log10(x)) * slope))


def worker(args):
    """One dtype in this (fresh) process: first and warm calls; the subset's parameters."""
    import batchfit

    x, y, _ = curves(args.series, args.doses)
    times, fit = [], None
    for _ in range(2):
        start = time.perf_counter()
        fit = batchfit.fit(x, y, model="hill4", dtype=args.worker)
        times.append(time.perf_counter() - start)
    subset = slice(0, args.scipy)
    np.savez(args.out, params=fit.params.numpy()[subset], stderr=fit.stderr.numpy()[subset],
             status=fit.status.numpy(), ic50=fit.derived["ic50"][subset])
    print(json.dumps({"first_s": times[0], "warm_s": times[1],
                      "ok": float((fit.status_labels() == "ok").mean())}))


def wait_for_builders(limit_s: float = 900):
    """Until no kernel is being built in the background (a ``.building`` lock in the cache)."""
    from batchfit.core.cache import configured_root

    locks = os.path.join(configured_root(), "aot", "*", "*.building")
    deadline = time.monotonic() + limit_s
    time.sleep(2)  # (the builders start as their parents exit)
    while glob.glob(locks) and time.monotonic() < deadline:
        time.sleep(5)


def scipy_loop(x, y, count):
    import torch

    from batchfit.fitting.models import FAMILIES

    family = FAMILIES["hill4"]
    starts = family.start(torch.from_numpy(np.tile(x, (count, 1))), torch.from_numpy(y[:count]),
                          torch.ones(count, len(x), dtype=torch.float64)).numpy()
    params = np.full((count, 4), np.nan)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(count):
            try:
                params[i] = curve_fit(hill, x, y[i], p0=starts[i], maxfev=2000)[0]
            except RuntimeError:  # (not converged within maxfev: left NaN)
                pass
    seconds = time.perf_counter() - start
    swap = params[:, 0] > params[:, 1]  # (batchfit's canonical form: bottom <= top)
    params[swap] = params[swap][:, [1, 0, 2, 3]] * [1, 1, 1, -1]
    return params, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=float, default=1e5)
    parser.add_argument("--doses", type=int, default=10)
    parser.add_argument("--scipy", type=int, default=2000)
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.series = int(args.series)
    if args.worker:
        return worker(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            if run == "kept":
                wait_for_builders()
            for dtype in ("float32", "float64"):
                out = os.path.join(tmp, f"{dtype}.npz")
                env = dict(os.environ)
                if run == "eager":
                    env.update(BATCHFIT_CACHE_DIR=os.path.join(tmp, "cache"),
                               BATCHFIT_BACKGROUND="0")
                done = subprocess.run([sys.executable, __file__, "--worker", dtype, "--out",
                                       out, "--series", str(args.series), "--doses",
                                       str(args.doses), "--scipy", str(args.scipy)],
                                      capture_output=True, text=True, check=True, env=env)
                rows[dtype, run] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                                    **dict(np.load(out))}
                print(f"{dtype} {run}: {rows[dtype, run]['first_s']:.2f} s, then "
                      f"{rows[dtype, run]['warm_s']:.2f} s", file=sys.stderr)
    x, y, _ = curves(args.series, args.doses)
    theirs, seconds = scipy_loop(x, y, args.scipy)
    scipy_rate = args.scipy / seconds
    mine = rows["float64", "kept"]
    usable = (mine["status"][:args.scipy] == 0) & np.isfinite(theirs).all(1)
    z = np.abs(mine["params"] - theirs)[usable] / mine["stderr"][usable]
    relative = np.abs(mine["params"] - theirs)[usable] / np.maximum(np.abs(theirs[usable]),
                                                                    1e-12)
    report = {"series": args.series, "doses": args.doses, "scipy_curves": args.scipy,
              "scipy_fits_per_s": scipy_rate, "scipy_s": seconds,
              "agreement": {"curves_compared": int(usable.sum()),
                            "max_diff_over_stderr": float(z.max()),
                            "median_relative_diff": float(np.median(relative)),
                            "within_1e-3_stderr": float((z < 1e-3).mean()),
                            "float32_vs_float64_max_over_stderr": float(np.nanmax(
                                np.abs(rows["float32", "kept"]["params"] - mine["params"])[usable]
                                / mine["stderr"][usable]))},
              "rows": {}}
    import torch

    title = f"hill4: {args.series:,} curves x {args.doses} doses, torch {torch.__version__}"
    lines = [title, f"{'run':<52}{'seconds':>9}{'fits/s':>11}{'vs scipy':>9}"]
    for dtype in ("float32", "float64"):
        for run in RUNS:
            row = rows[dtype, run]
            for state in ("first", "warm"):
                rate = args.series / row[f"{state}_s"]
                label = f"{dtype} {LABELS[run]}, {state} call"
                report["rows"][label] = {"seconds": row[f"{state}_s"], "fits_per_s": rate,
                                         "x_scipy": rate / scipy_rate,
                                         "ok_fraction": row["ok"]}
                lines.append(f"{label:<52}{row[f'{state}_s']:>9.2f}{rate:>11,.0f}"
                             f"{rate / scipy_rate:>8.1f}x")
    lines.append(f"{'scipy curve_fit loop (float64)':<52}{args.series / scipy_rate:>9.1f}"
                 f"{scipy_rate:>11,.0f}{1:>8.1f}x  (measured on {args.scipy:,}, extrapolated)")
    a = report["agreement"]
    lines.append(f"agreement on {a['curves_compared']:,} curves (float64 vs scipy): max |diff|"
                 f" {a['max_diff_over_stderr']:.1e} stderr, median relative "
                 f"{a['median_relative_diff']:.1e}; float32 vs float64 max "
                 f"{a['float32_vs_float64_max_over_stderr']:.1e} stderr; ok fraction float32 "
                 f"{rows['float32', 'kept']['ok']:.4f}, float64 {mine['ok']:.4f}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
