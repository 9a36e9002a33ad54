"""Command-line glue: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys

from . import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other bad-usage error
        self.exit(2, f"batchfit: error: {message}\n")


def _demo(args) -> int:
    from .demo import TRUTH, run_demo

    report = run_demo(n_series=args.series, points=args.points, seed=args.seed)
    print(f"batchfit demo: {report['n_series']:,} series x {report['points']} points of "
          f"y = {TRUTH['a']:g}x^2 + {TRUTH['b']:g}x - {-TRUTH['c']:g} + noise")
    for label, entry in report["solvers"].items():
        med = entry["median_params"]
        err = entry["median_abs_error"]
        statuses = ", ".join(f"{name} {count:,}" for name, count in entry["statuses"].items())
        print(f"  {label}: {entry['seconds']:.2f} s, "
              f"{report['n_series'] / entry['seconds']:,.0f} series/s")
        print(f"    median a, b, c = {med['a']:.3f}, {med['b']:.3f}, {med['c']:.3f}   "
              f"median |error| = {err['a']:.3f}, {err['b']:.3f}, {err['c']:.3f}")
        print(f"    status: {statuses}")
    print("  (the seed's GD protocol is too short to converge on x in [0, 1]; "
          "batchfit reports that as not_converged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchfit", description="Fit very many curves at once.")
    parser.add_argument("--version", action="version", version=f"batchfit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo", help="fit 10,000 generated seed series with the exact solver and with GD",
        description="Example: batchfit demo --series 10000")
    demo.add_argument("--series", type=int, default=10_000, help="number of series [10000]")
    demo.add_argument("--points", type=int, default=100, help="points per series [100]")
    demo.add_argument("--seed", type=int, default=0, help="random seed [0]")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:  # bad input: one line, no traceback
        print(f"batchfit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchfit: interrupted", file=sys.stderr)
        return 130
