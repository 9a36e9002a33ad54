"""Command-line glue: parse, call the library, print, map errors to exit codes.

Exit codes: 0 the command finished (series may still carry a non-ok status); 2 bad usage or
bad input (one line on stderr, ``batchfit: error: ...``); 130 interrupted (SIGINT, Ctrl-C),
143 terminated (SIGTERM): temporary files are removed first, older outputs are untouched
(at any moment: ``batchfit.core.interrupts``).
"""

from __future__ import annotations

import argparse
import re
import sys

from batchfit._version import __version__
from batchfit.core import interrupts
from batchfit.core.names import (
    BUILTIN_LOSSES,
    DEVICES,
    DTYPES,
    FAMILY_PARAMS,
    FAMILY_X_COLUMNS,
    FORMULA_FUNCTIONS,
    MODELS,
    RESIDUAL_LOSSES,
    SOLVERS,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other bad-usage error
        self.exit(2, f"batchfit: error: {message}\n")


def _say(message: str):
    print(f"batchfit: {message}", file=sys.stderr)


def _progress_bar(enabled: bool):
    """A tqdm bar on stderr, only when stderr is a terminal; returns (callback, close)."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="series", unit_scale=True, file=sys.stderr, leave=False)

    def update(done: int, total: int):
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def _run(args) -> int:
    import numpy as np
    import pyarrow as pa

    from batchfit.io import ColumnSpec
    from batchfit.pipeline.job import run_job

    # pyarrow imports pandas (where installed) on its first conversion, which would come
    # mid-run; here, so that no signal cuts it off half-way
    with interrupts.deferred():
        pa.array(np.zeros(0))

    columns = ColumnSpec(series_id=args.id_col, x=_x_columns(args.x_col), y=args.y_col,
                         weight=args.weight_col or "weight",
                         weight_given=args.weight_col is not None, format=args.format)
    fit_options = dict(degree=args.degree, model=args.model, loss=args.loss, f_scale=args.f_scale,
                       solver=args.solver, lr=args.lr, epochs=args.epochs, tol=args.tol,
                       device=args.device, dtype=args.dtype,
                       compile=False if args.no_compile else "auto", restarts=args.restarts,
                       covariance=args.covariance, param_names=args.params, p0=args.p0,
                       bounds=args.bounds)
    if args.engine == "ray":
        from batchfit.pipeline.distributed import run_ray

        if not args.output:
            raise ValueError("--engine ray needs -o OUTPUT (a directory, or a URI)")
        if args.history:
            raise ValueError("--history is not available with --engine ray")
        summary = run_ray(args.input, args.output, columns=columns, address=args.address,
                          workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                          input_format=args.input_format,
                          storage_options=_storage_options(args), **fit_options)
        _report(summary)
        return 0
    elif args.address or args.workers or args.num_gpus_per_worker:
        raise ValueError("--address, --workers and --num-gpus-per-worker need --engine ray")
    update, close = _progress_bar(not args.no_progress)
    try:
        summary = run_job(args.input, args.output, columns=columns, batch_size=args.batch_size,
                          history_path=args.history, track=args.track,
                          track_ids=args.track_ids.split(",") if args.track_ids else None,
                          resume=args.resume, progress=update,
                          input_format=args.input_format,
                          storage_options=_storage_options(args), **fit_options)
    finally:
        close()
    _report(summary)
    return 0


def _x_columns(text: str):
    """``--x-col``: one column, or a comma list of several (x with d columns)."""
    return tuple(name.strip() for name in text.split(",")) if "," in text else text


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(name.isidentifier() for name in names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got "
                                         f"{text!r}") from None


def _bounds(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    lower, colon, upper = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"expected LOWER:UPPER (two comma lists), got "
                                         f"{text!r}")
    return _numbers(lower), _numbers(upper)


def _storage_options(args) -> dict[str, str]:
    from batchfit.io.storage import parse_options

    return parse_options(args.storage_option or [])


def _add_storage_option(parser):
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="an option of the store a URI names (repeatable; S3: "
                             "endpoint_override, region, scheme, ...)")


def _report(summary):
    statuses = ", ".join(f"{name} {count:,}" for name, count in summary.status_counts.items())
    statuses = f" ({statuses})" if statuses else ""
    weight = (summary.metadata.get("columns") or {}).get("weight")
    weighted = f", weighted by column {weight!r}" if weight else ""
    _say(f"fitted {summary.n_series:,} series{statuses} from {summary.n_points:,} points"
         f"{weighted} in {summary.seconds:.2f} s ({summary.series_per_second:,.0f} series/s)")
    _say(f"wrote {summary.output}" + (f" and {summary.history}" if summary.history else ""))


def _generate(args) -> int:
    from batchfit.app.generate import generate

    info = generate(args.output, series=args.series, points=args.points, noise=args.noise,
                    seed=args.seed, fmt=args.format, x_kind=args.x,
                    min_points=args.min_points, max_points=args.max_points,
                    outliers=args.outliers, degree=args.degree, model=args.model)
    _say(f"wrote {info['series']:,} series ({info['points']:,} points, {info['format']} "
         f"format) to {info['path']} and their true coefficients to {info['truth']}")
    return 0


def _plot(args) -> int:
    from batchfit.app.plots import plot_all
    from batchfit.io import ColumnSpec

    columns = ColumnSpec(series_id=args.id_col, x=_x_columns(args.x_col), y=args.y_col)
    series = args.series.split(",") if args.series else None
    paths = plot_all(args.data, args.coeffs, args.output, history_path=args.history,
                     truth_path=args.truth, reference_path=args.compare, series=series,
                     sample=args.sample, seed=args.seed, columns=columns,
                     input_format=args.input_format,
                     storage_options=_storage_options(args))
    _say("wrote " + ", ".join(paths))
    return 0


def _bench(args) -> int:
    from batchfit.app import bench

    options = dict(bench.QUICK) if args.quick else {}
    for name in ("sizes", "gauss_sizes", "peaks_sizes", "points", "devices", "dtypes", "repeats", "epochs",
                 "cpu_max", "long_series"):
        value = getattr(args, name)
        if value is not None:
            options[name] = (tuple(int(v) for v in value) if name.endswith("sizes")
                             else int(value) if name in ("cpu_max", "long_series")
                             else value)
    if args.devices and "cuda" in args.devices:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--devices cuda was asked for but no CUDA GPU is available")
    result = bench.run(quick=args.quick, progress=lambda m: print(m, file=sys.stderr),
                       **options)
    print(bench.table(result))
    written = bench.save(result, args.json, args.plot)
    if written:
        _say("wrote " + ", ".join(written))
    return 0


def _warmup(args) -> int:
    from batchfit.engine import warmup

    for line in warmup(losses=args.loss, dtypes=args.dtype, degree=args.degree):
        if not args.quiet:
            _say(line)
    return 0


def _demo(args) -> int:
    from batchfit.app.demo import run_demo

    report = run_demo(args.output, n_series=args.series, points=args.points, seed=args.seed)
    print(f"batchfit demo: {report['n_series']:,} series x {report['points']} points, "
          "each y = a x^2 + b x + c + noise with (a, b, c) drawn around the seed's (20, 5, -3)")
    for label, entry in report["solvers"].items():
        err = entry["median_abs_error"]
        statuses = ", ".join(f"{name} {count:,}" for name, count in entry["statuses"].items())
        print(f"  {label}: {entry['seconds']:.2f} s ({entry['series_per_second']:,.0f} series/s)"
              f"; median |fitted - true| a {err['a']:.3f}, b {err['b']:.3f}, c {err['c']:.3f}"
              f"; status: {statuses}")
    print("  The seed's GD protocol (lr 1e-3, 15,000 epochs) is far too short to converge on "
          "x in [0, 1]: batchfit says so (not_converged) and the exact solver is the answer.")
    print(f"  Outputs in {report['dir']}/: " + ", ".join(report["files"]))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value




INPUT_FORMAT_HELP = ("how the input is read: parquet, csv (with a header row; long format "
                     "only) or ipc (Arrow IPC file or stream, Feather v2) [auto: each file by "
                     "its extension (.parquet .pq, .csv .csv.gz, .arrow .feather .ipc), else "
                     "by its first bytes]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchfit", description="Fit very many curves at once.")
    parser.add_argument("--version", action="version", version=f"batchfit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser(
        "run", help="fit every series in a Parquet, CSV or Arrow IPC file (or a directory of "
                    "them), write coefficients",
        description="Fit every series of INPUT; write one row per series to OUTPUT. "
                    "Example: batchfit run data.parquet -o fits.parquet --loss huber")
    run.add_argument("input", help="a Parquet, CSV or Arrow IPC file, or a directory of them; "
                                  "a path or a URI (s3://bucket/key, gs://, abfs://, ...)")
    run.add_argument("-o", "--output", help="output Parquet file, a path or a URI "
                                            "[INPUT.coeffs.parquet]")
    run.add_argument("--input-format", choices=["auto", "parquet", "csv", "ipc"],
                     default="auto", help=INPUT_FORMAT_HELP)
    run.add_argument("--format", choices=["auto", "long", "list"], default="auto",
                     help="long: a row per point; list: a row per series [auto: by x's type]")
    run.add_argument("--id-col", default="series_id", help="series id column [series_id]")
    run.add_argument("--x-col", default="x",
                     help="x column [x], or a comma list of several for a model of "
                          "multi-dimensional x (--model gauss2d --x-col x0,x1)")
    run.add_argument("--y-col", default="y", help="y column [y]")
    run.add_argument("--weight-col", help="weight column, >= 0 [weight, used when present]")
    run.add_argument("--model", default="poly",
                     help="poly: the polynomial of --degree; a family ("
                          + ", ".join(FAMILY_PARAMS) + "); a formula such as "
                          "'a*exp(-x/tau) + c' (x, or x0, x1, ... for several --x-col; "
                          "+ - * / ** and " + ", ".join(FORMULA_FUNCTIONS) + "); "
                          "package.module:function, your own f(x, params); auto:A,B,...: each series' model chosen "
                          "among these candidates (families, poly, polyD) by AICc [poly]")
    run.add_argument("--degree", default="2",
                     help="polynomial degree, or auto[:D]: each series' degree in 0..D "
                          "(default 3) chosen by BIC, recorded in a degree column [2]")
    run.add_argument("--loss", default="mse",
                     choices=BUILTIN_LOSSES,
                     help="poisson: the Poisson deviance of counts y >= 0 (nonlinear models) "
                          "[mse]")
    run.add_argument("--f-scale", type=float, default=1.0,
                     help="residual scale of the robust losses [1.0]")
    run.add_argument("--solver", default="auto",
                     choices=SOLVERS,
                     help="[auto: exact for mse, newton otherwise]")
    run.add_argument("--lr", type=float, help="learning rate of gd/adam [1e-3]")
    run.add_argument("--epochs", type=int,
                     help="gd/adam epochs [15000]; newton iteration cap "
                          "[50; for a model 100 (k + 1)]")
    run.add_argument("--tol", type=float,
                     help="relative excess-loss tolerance of the iterative solvers [1e-6; "
                          "1e-10 for nonlinear models in float64]")
    run.add_argument("--params", type=_names, metavar="A,B,...",
                     help="a formula's or a module model's parameter names, in order [a "
                          "formula's: as they first appear; a module's: p0, p1, ...]")
    run.add_argument("--p0", type=_numbers, metavar="V,V,...",
                     help="starting parameters of a nonlinear model, one per parameter [a "
                          "family's data-driven start; a formula's all ones]")
    run.add_argument("--bounds", type=_bounds, metavar="LOWER:UPPER",
                     help="box constraints, two comma lists (inf, -inf: free), e.g. "
                          "0,0,-inf:inf,10,inf")
    run.add_argument("--restarts", type=int, default=0, metavar="K",
                     help="nonlinear models: K more starts per series, each parameter of the "
                          "first scaled by a random factor in [1/10, 10]; keeps the best "
                          "converged fit and writes converged_starts [0]")
    run.add_argument("--covariance", action="store_true",
                     help="also write each series' parameter covariance, its upper triangle "
                          "as cov_<name_i>_<name_j> columns (what predict's interval uses)")
    run.add_argument("--device", default="auto", choices=DEVICES,
                     help="[auto: the CPU for MSE polynomial jobs (an aggregation), CUDA when "
                          "present for the others]")
    run.add_argument("--dtype", default="float32", choices=DTYPES,
                     help="[float32]")
    run.add_argument("--no-compile", action="store_true", help="never use torch.compile")
    run.add_argument("--batch-size", type=_positive_int, default=100_000,
                     help="series per fit call [100000]")
    run.add_argument("--history", metavar="PATH",
                     help="also write the training history of gd/adam/newton (Parquet)")
    run.add_argument("--track", type=int, default=5,
                     help="series whose whole loss curve the history keeps [5, spread out]")
    run.add_argument("--track-ids", metavar="ID,ID,...", help="track these series instead")
    run.add_argument("--resume", action="store_true",
                     help="checkpoint finished chunks beside the output, and continue an "
                          "interrupted run that used --resume (same input and options)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="ray: fit on a Ray cluster (pip install 'batchfit[ray]') [local]")
    run.add_argument("--address", help="Ray cluster to join (auto, ray://...) [start a local one]")
    run.add_argument("--workers", type=_positive_int, help="Ray: concurrent fitting tasks")
    run.add_argument("--num-gpus-per-worker", type=float, default=0,
                     help="Ray: GPUs per fitting task (0: CPU workers) [0]")
    _add_storage_option(run)
    run.set_defaults(handler=_run)

    gen = commands.add_parser(
        "generate", help="write a synthetic dataset (and its true coefficients)",
        description="Write noisy series around the seed's y = 20x^2 + 5x - 3, and their true "
                    "coefficients to OUTPUT.truth.parquet. "
                    "Example: batchfit generate data.parquet --series 100000 --points 100")
    gen.add_argument("output", help="the Parquet file to write")
    gen.add_argument("--series", type=_positive_int, default=10_000, help="[10000]")
    gen.add_argument("--points", type=_positive_int, default=100, help="points per series [100]")
    gen.add_argument("--noise", type=float,
                     help="Gaussian noise sd [1.0 for poly, 0.1 for the other models]")
    gen.add_argument("--seed", type=int, default=0, help="[0]")
    gen.add_argument("--format", choices=["long", "list"], default="long", help="[long]")
    gen.add_argument("--x", choices=["linspace", "uniform"], default="linspace",
                     help="x = linspace(0, 1, n) or sorted uniform draws [linspace]")
    gen.add_argument("--min-points", type=int, help="ragged lengths: shortest series")
    gen.add_argument("--max-points", type=int, help="ragged lengths: longest series")
    gen.add_argument("--outliers", type=float, default=0.0,
                     help="fraction of points pushed 10-30 noise sds away [0]")
    gen.add_argument("--degree", type=int, default=2, help="[2]")
    gen.add_argument("--model", default="poly",
                     choices=[m for m in MODELS if m not in FAMILY_X_COLUMNS],  # (1-D x)
                     help="poly: around the seed's quadratic; a family: parameters and x "
                          "range from batchfit.app.generate.FAMILY_EXAMPLES [poly]")
    gen.set_defaults(handler=_generate)

    plot = commands.add_parser(
        "plot", help="PNG pictures of data, fits, training loss and coefficients",
        description="Write data.png, fits.png, loss.png (with --history), coefficients.png and "
                    "residuals.png. Example: batchfit plot data.parquet data.coeffs.parquet "
                    "--truth data.truth.parquet -o plots")
    plot.add_argument("data", help="the input of the run (a Parquet, CSV or Arrow IPC file, "
                                   "or a directory of them)")
    plot.add_argument("--input-format", choices=["auto", "parquet", "csv", "ipc"],
                      default="auto", help=INPUT_FORMAT_HELP)
    plot.add_argument("coeffs", help="the output of the run")
    plot.add_argument("--history", help="the run's --history file")
    plot.add_argument("--truth", help="true coefficients (from batchfit generate)")
    plot.add_argument("--compare", metavar="COEFFS",
                      help="another run's output, drawn as a dashed curve")
    plot.add_argument("-o", "--output", default="plots", help="directory for the PNGs [plots]")
    plot.add_argument("--series", metavar="ID,ID,...", help="draw these series")
    plot.add_argument("--sample", type=_positive_int, default=9,
                      help="else draw this many (the tracked ones, or a random sample) [9]")
    plot.add_argument("--seed", type=int, default=0, help="of the random sample [0]")
    plot.add_argument("--id-col", default="series_id")
    plot.add_argument("--x-col", default="x")
    plot.add_argument("--y-col", default="y")
    _add_storage_option(plot)
    plot.set_defaults(handler=_plot)

    bench = commands.add_parser(
        "bench", help="throughput table: solvers x devices x sizes x peers",
        description="Time batchfit's solvers next to numpy/scipy/torch peers and the memory "
                    "floor, with accuracy. Example: batchfit bench --quick")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes, float32, no compiles of the loops (under a minute)")
    bench.add_argument("--sizes", type=float, nargs="+", help="series counts [1e3 1e4 1e5 1e6]")
    bench.add_argument("--gauss-sizes", type=float, nargs="*",
                       help="series counts of the Gaussian-family rows (none: skip them) "
                            "[1e4 1e5 1e6]")
    bench.add_argument("--peaks-sizes", type=float, nargs="*",
                       help="series counts of the 8-parameter, 250-point model rows (two "
                            "peaks on a baseline, float64; none: skip them) [1e4]")
    bench.add_argument("--points", type=_positive_int, help="points per series [100]")
    bench.add_argument("--long-series", type=float,
                       help="series of the long-series rows (10,000 points; 0: skip) [1000]")
    bench.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                       help="[cpu, and cuda when present]")
    bench.add_argument("--dtypes", nargs="+", choices=["float32", "float64"],
                       help="[float32 float64]")
    bench.add_argument("--repeats", type=_positive_int, help="timed repeats after warm-up [3]")
    bench.add_argument("--epochs", type=_positive_int, help="GD/Adam epochs [15000]")
    bench.add_argument("--cpu-max", type=float,
                       help="run the CPU rows and the numpy/scipy peers only up to this size")
    bench.add_argument("--json", help="write the results (and the machine) as JSON here")
    bench.add_argument("--plot", help="write a throughput-vs-batch-size PNG here")
    bench.set_defaults(handler=_bench)

    warm = commands.add_parser(
        "warmup", help="compile batchfit's kernels for this machine, once (an installer step)",
        description="Build the ahead-of-time kernels of robust polynomial fits, kept in the cache directory ($BATCHFIT_CACHE_DIR, "
                    "else ~/.cache/batchfit) for every later process. Without it, the first run "
                    "that needs a kernel builds it (and says so). Example: batchfit warmup")
    warm.add_argument("--loss", nargs="+", default=["huber"],
                      choices=[name for name in RESIDUAL_LOSSES if name != "mse"],
                      help="robust losses to build for [huber]")
    warm.add_argument("--dtype", nargs="+", default=["float32"], choices=DTYPES,
                      help="working precisions to build for [float32]")
    warm.add_argument("--degree", type=int, default=2, help="[2]")
    warm.add_argument("--quiet", action="store_true", help="print nothing")
    warm.set_defaults(handler=_warmup)

    demo = commands.add_parser(
        "demo", help="generate -> run (exact and the seed's GD) -> plot, with a summary",
        description="Example: batchfit demo -o batchfit-demo")
    demo.add_argument("-o", "--output", default="batchfit-demo",
                      help="directory for data, coefficients, history and plots [batchfit-demo]")
    demo.add_argument("--series", type=_positive_int, default=10_000, help="[10000]")
    demo.add_argument("--points", type=_positive_int, default=100,
                      help="points per series [100]")
    demo.add_argument("--seed", type=int, default=0, help="random seed [0]")
    demo.set_defaults(handler=_demo)
    return parser


# The library's errors name its parameters; on the command line they are these flags.
PARAMETER_FLAGS = {"batch_size": "--batch-size", "history_path": "--history",
                   "storage_option": "--storage-option",
                   "resume": "--resume", "track": "--track", "track_ids": "--track-ids",
                   "format": "--format", "fmt": "--format", "workers": "--workers",
                   "num_gpus_per_worker": "--num-gpus-per-worker", "noise": "--noise",
                   "outliers": "--outliers", "x_kind": "--x", "min_points": "--min-points",
                   "max_points": "--max-points", "epochs": "--epochs", "tol": "--tol",
                   "lr": "--lr", "f_scale": "--f-scale", "dtype": "--dtype",
                   "restarts": "--restarts", "input_format": "--input-format",
                   "degree": "--degree", "p0": "--p0", "param_names": "--params",
                   "params": "--params", "bounds": "--bounds", "model": "--model"}
_UNDERSCORED = r"\b(" + "|".join(n for n in PARAMETER_FLAGS if "_" in n) + r")\b"


def as_flags(message: str) -> str:
    """A library error in the CLI's words: a leading parameter name, and any parameter name
    with an underscore, become the flag (plain words elsewhere are left alone; words that
    also open data errors, such as "series", are not parameter names here)."""
    head, _, rest = message.partition(" ")
    if head in PARAMETER_FLAGS:
        message = f"{PARAMETER_FLAGS[head]} {rest}"
    return re.sub(_UNDERSCORED, lambda m: PARAMETER_FLAGS[m.group(1)], message)


def main(argv: list[str] | None = None) -> int:
    owner = interrupts.install()  # (the entry point's first line did, before its imports)
    try:
        interrupts.release()
        return _command(argv)
    except KeyboardInterrupt as exc:  # (while an error was being reported)
        return _interrupted(exc, None)
    finally:
        interrupts.finish()  # the exit that follows is not cut short
        if owner:
            interrupts.uninstall()


def _command(argv) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    except (ValueError, OSError, MemoryError) as exc:  # bad input: one line, no traceback
        interrupts.finish()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, MemoryError) and "memory" not in message:
            message = f"out of memory: {message}"
        print(f"batchfit: error: {as_flags(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(exc, args)


def _interrupted(exc: KeyboardInterrupt, args) -> int:
    interrupts.clean_up()
    hint = ("; finished chunks are checkpointed: run the same command again to continue"
            if getattr(args, "resume", False) else
            "; no output was written" if getattr(args, "command", "run") == "run" else "")
    terminated = isinstance(exc, interrupts.Terminated)
    print(f"batchfit: {'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
    return 143 if terminated else 130
