"""A T2 map: batchfit.xarray.fit next to xarray's DataArray.curvefit on one MRI-like stack.

    python benchmarks/bench_xarray_fit.py [--size 128] [--echoes 12] [--curvefit-voxels 1000]
                                          [--chunk 32] [--json results-xarray-cpu.json]

A (size, size, echoes) float32 multi-echo stack: per voxel S = S0 exp(-TE / T2) plus Gaussian
noise (2 % of the median S0), S0 in [500, 1500], T2 in [40, 150] ms, TE = 10, 20, ... ms.
Fitted three ways by batchfit (the mono-exponential as a user model ``f(TE, [S0, T2])``, in
memory and as a dask array in chunks of ``--chunk`` rows; the ``exp`` family a exp(-b TE) + c,
T2 = 1/b) and by ``DataArray.curvefit`` (scipy's curve_fit per voxel) on the same model and
start, timed on ``--curvefit-voxels`` voxels and extrapolated. The bench_stack.py benchmark
has the polynomial rows (``polyfit``) and the generic exp stack; this one is the worked T2 map.
Each batchfit row: its first call (the process's first fits also pay one-time costs) and
the best of ``--repeats``; curvefit's is extrapolated to the whole map.
"""

import argparse
import json
import time

import numpy as np
import torch

import batchfit.xarray as bx


def mono_exp(te, p):
    """S0 exp(-TE / T2) on one voxel: p = (S0, T2)."""
    return p[0] * torch.exp(-te / p[1])


def timed(fn, repeats):
    """(seconds of the first call, of the best call, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--echoes", type=int, default=12)
    parser.add_argument("--curvefit-voxels", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=32, help="dask chunk (rows of voxels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    import xarray as xr

    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    te = 10.0 * np.arange(1, args.echoes + 1)
    s0, t2 = rng.uniform(500, 1500, shape), rng.uniform(40, 150, shape)
    signal = s0[..., None] * np.exp(-te / t2[..., None])
    signal += rng.normal(0, 0.02 * np.median(s0), signal.shape)
    stack = xr.DataArray(signal.astype(np.float32), dims=("y", "x", "te"),
                         coords={"te": te, "y": np.arange(args.size), "x": np.arange(args.size)},
                         name="signal")
    voxels = args.size * args.size
    start = {"p0": [1000.0, 80.0], "param_names": ["S0", "T2"]}
    rows = []

    def row(name, first, seconds, t2_map, count=voxels):
        error = np.abs(t2_map / t2.reshape(-1)[:count] - 1)
        rows.append({"method": name, "first_seconds": first, "seconds": seconds,
                     "voxels_per_s": voxels / seconds,
                     "median_t2_error": float(np.nanmedian(error))})

    *times, mono = timed(lambda: bx.fit(stack, "te", mono_exp, **start), args.repeats)
    row("batchfit.xarray.fit, S0 exp(-TE/T2)", *times,
        mono.curvefit_coefficients.sel(param="T2").values.reshape(-1))
    chunked = stack.chunk({"y": args.chunk})
    *times, lazy = timed(lambda: bx.fit(chunked, "te", mono_exp, **start).compute(),
                         args.repeats)
    row(f"same, dask chunks of {args.chunk} rows", *times,
        lazy.curvefit_coefficients.sel(param="T2").values.reshape(-1))
    *times, family = timed(lambda: bx.fit(stack, "te", "exp"), args.repeats)
    row("batchfit.xarray.fit, model='exp' (+ offset)", *times,
        1 / family.curvefit_coefficients.sel(param="b").values.reshape(-1))

    few = min(args.curvefit_voxels, voxels)
    subset = xr.DataArray(stack.values.reshape(voxels, -1)[:few], dims=("voxel", "te"),
                          coords={"te": te})
    _, seconds, ref = timed(lambda: subset.curvefit(
        "te", lambda te, S0, T2: S0 * np.exp(-te / T2), p0={"S0": 1000.0, "T2": 80.0}), 1)
    ref_t2 = ref.curvefit_coefficients.sel(param="T2").values
    row(f"xarray curvefit, S0 exp(-TE/T2) ({few:,} voxels)", *[seconds * voxels / few] * 2,
        ref_t2, count=few)
    ours_t2 = mono.curvefit_coefficients.sel(param="T2").values.reshape(-1)[:few]
    agree = float(np.max(np.abs(ours_t2 / ref_t2 - 1)))
    same_lazy = bool(np.array_equal(lazy.curvefit_coefficients.values,
                                    mono.curvefit_coefficients.values, equal_nan=True))
    statuses = {str(k): int(v) for k, v in zip(*np.unique(mono.status.values,
                                                          return_counts=True))}

    print(f"T2 map: {args.size} x {args.size} voxels x {args.echoes} echoes float32, "
          f"{voxels:,} voxels")
    print(f"{'method':50} {'first s':>8} {'best s':>8} {'voxels/s':>10} {'median |T2 err|':>16}")
    for r in rows:
        print(f"{r['method']:50} {r['first_seconds']:8.3f} {r['seconds']:8.3f} "
              f"{r['voxels_per_s']:10,.0f} {r['median_t2_error']:16.2%}")
    print(f"T2 batchfit vs curvefit on the same voxels: max rel. difference {agree:.1e}; "
          f"dask result identical to in-memory: {same_lazy}; statuses {statuses}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "echoes": args.echoes, "rows": rows,
                       "t2_max_rel_difference": agree, "dask_identical": same_lazy,
                       "statuses": statuses}, f, indent=1)


if __name__ == "__main__":
    main()
