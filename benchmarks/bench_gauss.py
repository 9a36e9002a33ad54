"""The Gaussian family next to Gpufit's published figures and a scipy curve_fit loop, and a
user model of 8 parameters on 250 points next to a scipy least_squares loop.

    python benchmarks/bench_gauss.py [--sizes 1e4 1e5 1e6] [--peaks-sizes 1e4]
                                     [--json benchmarks/results-gauss-cpu.json]

The rows of ``batchfit bench`` for ``model="gauss"`` only (25 points per series, the size of
Gpufit's 5 x 5 benchmark fits), on every device present, float32 and float64.
Gpufit's published figures (Przybylski et al., Sci. Rep. 7, 15722 (2017)): about 3 M fits/s
for 2-D Gaussians of 25 points on a GTX 1070-class GPU, about 60-100 k fits/s for its CPU
implementation (Gpufit's "Cpufit").
"""

import argparse
import json
import sys

from batchfit.app import bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e4, 1e5, 1e6])
    parser.add_argument("--peaks-sizes", type=float, nargs="*", default=[1e4],
                        help="the 8-parameter, 250-point model (two peaks on a baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"])
    parser.add_argument("--json")
    args = parser.parse_args()
    result = bench.run(sizes=(), long_series=0, repeats=args.repeats, devices=args.devices,
                       gauss_sizes=tuple(int(s) for s in args.sizes),
                       peaks_sizes=tuple(int(s) for s in args.peaks_sizes),
                       progress=lambda m: print(m, file=sys.stderr))
    print(bench.table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "rows": bench.multiples(result["rows"])}, f, indent=1)


if __name__ == "__main__":
    main()
