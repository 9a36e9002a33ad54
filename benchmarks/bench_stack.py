"""Pixel-wise fits of an image stack: batchfit next to xarray's polyfit and curvefit.

    python benchmarks/bench_stack.py [--size 512] [--frames 40] [--curvefit-pixels 2000]

A (size, size, frames) float32 stack: per pixel a quadratic in t (polyfit rows), and an
exponential decay a exp(-b t) + c (the ``exp`` family next to ``xarray.curvefit``, timed on
a subset of pixels and extrapolated: it loops scipy's curve_fit per pixel). Each method's
best of ``--repeats`` runs; agreement with xarray is the largest relative coefficient
difference.
"""

import argparse
import time

import numpy as np

import batchfit


def timed(fn, repeats):
    best, out = None, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--curvefit-pixels", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import xarray as xr

    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, args.frames)
    shape = (args.size, args.size)
    a, b, c = rng.uniform(1, 3, shape), rng.uniform(-1, 1, shape), rng.uniform(0, 1, shape)
    quad = (a[..., None] * t**2 + b[..., None] * t + c[..., None]
            + rng.normal(0, 0.05, (*shape, args.frames))).astype(np.float32)
    pixels = args.size * args.size
    rows = []

    seconds, fit = timed(lambda: batchfit.fit(t, quad), args.repeats)
    rows.append(("batchfit.fit(t, stack) quadratic", seconds, pixels / seconds))
    stack = xr.DataArray(quad, dims=("y", "x", "t"), coords={"t": t})
    seconds, ref = timed(lambda: stack.polyfit("t", 2).polyfit_coefficients.values,
                         args.repeats)
    rows.append(("xarray DataArray.polyfit('t', 2)", seconds, pixels / seconds))
    ours = fit.params.numpy()  # (a, b, c): highest power first, as xarray's degree order
    agree = np.abs(np.moveaxis(ref, 0, -1) - ours).max() / np.abs(ours).max()

    rate = rng.uniform(1, 4, shape)
    decay = (a[..., None] * np.exp(-rate[..., None] * t) + c[..., None]
             + rng.normal(0, 0.02, (*shape, args.frames))).astype(np.float32)
    seconds, _ = timed(lambda: batchfit.fit(t, decay, model="exp"), args.repeats)
    rows.append(("batchfit.fit(t, stack, model='exp')", seconds, pixels / seconds))
    few = min(args.curvefit_pixels, pixels)
    subset = xr.DataArray(decay.reshape(-1, args.frames)[:few], dims=("p", "t"),
                          coords={"t": t})

    def curvefit():
        return subset.curvefit("t", lambda t, a, b, c: a * np.exp(-b * t) + c,
                               p0={"a": 2.0, "b": 2.0, "c": 0.5})

    seconds, _ = timed(curvefit, 1)
    rows.append((f"xarray curvefit (timed on {few:,} pixels)", seconds * pixels / few,
                 few / seconds))
    print(f"stack {args.size} x {args.size} x {args.frames} float32, {pixels:,} pixels")
    print(f"{'method':45} {'seconds':>9} {'pixels/s':>12}")
    for name, seconds, per_second in rows:
        print(f"{name:45} {seconds:9.3f} {per_second:12,.0f}")
    print(f"quadratic coefficients, batchfit vs xarray polyfit: max rel. difference {agree:.1e}")


if __name__ == "__main__":
    main()
