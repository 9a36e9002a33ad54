"""Throughput benchmark: batchfit's solvers next to the tools people use, and the floor.

``batchfit bench`` (and ``benchmarks/bench.py``) run every method on the same data in one
process and report seconds (median of repeats after a warm-up, devices synchronised), fits/s,
multiples of the memory floor and of the ``numpy.polyfit`` loop, compile time apart, and the
accuracy of every method against float64 ``numpy.polyfit`` (or scipy for the robust loss).
Slow peers run on a subset (or for fewer epochs) and are extrapolated, marked ``~``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.func import grad, vmap

from batchfit.app import peers
from batchfit.engine.front import fit

SEED_EPOCHS = 15_000
ACCURACY_SERIES = 200  # series checked against the float64 reference
WRONG = {"float32": 1e-3, "float64": 1e-8}  # relative error above which a result is wrong
ROBUST_AGREEMENT = 1e-5  # two robust solvers agree this well (their own tolerances differ)


@dataclass
class Row:
    method: str
    device: str
    dtype: str
    series: int
    points: int
    seconds: float
    fits_per_s: float
    first_call_s: float = float("nan")  # includes compiling, where there is one
    extrapolated: bool = False
    error: float = float("nan")  # max relative coefficient error vs the reference
    verdict: str = ""  # "ok", "WRONG", or why the error is expected
    note: str = ""
    extra: dict = field(default_factory=dict)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, float, object]:
    """(first call s, median of ``repeats`` later calls s, last result)."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) if times else first, out


def dataset(series: int, points: int, seed: int = 0):
    """The seed's problem: shared x = linspace(0, 1), y = 20x^2 + 5x - 3 + noise, per-series
    coefficients around it, outliers in 2 % of the points (so robust losses matter)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, points)
    coef = rng.normal([-3.0, 5.0, 20.0], [0.5, 1.0, 2.0], (series, 3))  # c, b, a (as always)
    y = coef[:, :1] + coef[:, 1:2] * x + coef[:, 2:] * x**2 + rng.normal(0, 1, (series, points))
    outliers = rng.random(y.shape) < 0.02
    y[outliers] += rng.choice([-1.0, 1.0], outliers.sum()) * 20
    return x, y


def reference(x, y, robust: bool = False) -> np.ndarray:
    """Float64 coefficients (a, b, c: highest power first, as batchfit's params) of the first
    ACCURACY_SERIES series."""
    rows = min(ACCURACY_SERIES, len(y))
    if not robust:
        return np.polyfit(x, y[:rows].T, 2).T
    from scipy.optimize import least_squares

    out = []
    for i in range(rows):
        start = np.polyfit(x, y[i], 2)
        out.append(least_squares(lambda p, i=i: p[0] * x**2 + p[1] * x + p[2] - y[i], start,
                                 loss="huber", xtol=1e-12, ftol=1e-12, gtol=1e-12).x)
    return np.array(out)


def relative_error(params, ref: np.ndarray) -> float:
    got = np.asarray(params[: len(ref)], dtype=np.float64)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    return float(np.max(np.abs(got - ref) / scale))


_read_once = torch.compile(lambda x, y: x.sum(1) + y.sum(1), dynamic=True)


def naive_gd(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, lr: float, epochs: int):
    """The seed's loop batched the obvious way: vmap(grad) of the MSE over the raw points;
    ``p`` (B, 3): a, b, c."""
    def loss(p, x, y):
        return ((p[0] * x * x + p[1] * x + p[2] - y) ** 2).mean()

    step = vmap(grad(loss))
    for _ in range(epochs):
        p = p - lr * step(p, x, y)
    return p


class Bench:
    def __init__(self, repeats: int, epochs: int, quick: bool):
        self.repeats, self.epochs, self.quick = repeats, epochs, quick
        self.rows: list[Row] = []

    def add(self, row: Row, params=None, ref=None, expected: str = "", wrong_above=None):
        if params is not None and ref is not None:
            row.error = relative_error(params, ref)
            wrong = row.error > max(WRONG[row.dtype], wrong_above or 0)
            row.verdict = expected if (wrong and expected) else ("WRONG" if wrong else "ok")
        self.rows.append(row)

    def case(self, method, device, dtype, series, points, fn, *, ref=None, expected="",
             scale=1.0, note="", repeats=None, wrong_above=None):
        """Time ``fn`` (which returns coefficients); ``scale`` extrapolates to all series."""
        first, seconds, params = timed(fn, device, self.repeats if repeats is None else repeats)
        seconds *= scale
        if isinstance(params, torch.Tensor):
            params = params.detach().cpu().numpy()
        self.add(Row(method, device, dtype, series, points, seconds, series / seconds,
                     first_call_s=first * scale, extrapolated=scale != 1.0, note=note),
                 params, ref, expected, wrong_above)


def run(sizes=(1_000, 10_000, 100_000, 1_000_000), points=100, long_series=1_000,
        long_points=10_000, devices=None, dtypes=("float32", "float64"), repeats=3,
        epochs=SEED_EPOCHS, iterative_max=100_000, peer_subset=2_000, quick=False,
        cpu_max=None, gauss_sizes=(10_000, 100_000, 1_000_000), peaks_sizes=(10_000,),
        progress=print) -> dict:
    """Run the whole table; returns {"machine": ..., "rows": [...]}."""
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    bench = Bench(repeats, epochs, quick)
    for series in gauss_sizes:
        progress(f"bench: gauss, {series:,} series x {GAUSS_POINTS} points")
        _gauss(bench, series, devices, dtypes, cpu_max, quick)
    for series in peaks_sizes:
        progress(f"bench: two peaks on a baseline, {series:,} series x {PEAKS_POINTS} points")
        _peaks(bench, series, devices, cpu_max, quick)
    shapes = [(s, points) for s in sizes] + ([(long_series, long_points)] if long_series else [])
    for series, n in shapes:
        progress(f"bench: {series:,} series x {n:,} points")
        x_np, y_np = dataset(series, n)
        ref, ref_robust = reference(x_np, y_np), None
        on_cpu = cpu_max is None or series <= cpu_max  # the CPU rows and peers, or GPU only
        if on_cpu:
            _peers(bench, x_np, y_np, ref, series, n, peer_subset)
        for device in devices if on_cpu else [d for d in devices if d != "cpu"]:
            for dtype in dtypes:
                tdtype = getattr(torch, dtype)
                x = torch.as_tensor(x_np, dtype=tdtype, device=device).expand(series, n)
                x = x.contiguous()  # per-series x, as real data has
                y = torch.as_tensor(y_np, dtype=tdtype, device=device)
                bench.case("floor: read x and y once", device, dtype, series, n,
                           lambda x=x, y=y: _read_once(x, y))
                bench.case("batchfit exact (moments)", device, dtype, series, n,
                           lambda x=x, y=y: fit(x, y).params, ref=ref)
                bench.case("torch.linalg.lstsq (Vandermonde)", device, dtype, series, n,
                           lambda x=x, y=y: _lstsq(x, y), ref=ref)
                if series > iterative_max:
                    continue
                if ref_robust is None:
                    ref_robust = reference(x_np, y_np, robust=True)
                loops = not quick  # quick mode: no compiles for the iterative solvers
                tag = f"compile={loops}"
                bench.case(f"batchfit newton mse, {tag}", device, dtype, series, n,
                           lambda x=x, y=y, c=loops: fit(x, y, solver="newton", compile=c).params,
                           ref=ref)
                bench.case(f"batchfit newton huber, {tag}", device, dtype, series, n,
                           lambda x=x, y=y, c=loops: fit(x, y, loss="huber", compile=c,
                                                         tol=1e-12).params, ref=ref_robust,
                           wrong_above=ROBUST_AGREEMENT)
                if n > points:
                    continue  # the iterative loops only at the seed's shape
                for solver, lr in (("gd", 1e-3), ("adam", 1e-2)):
                    bench.case(f"batchfit {solver}, {epochs:,} epochs, {tag}", device,
                               dtype, series, n,
                               lambda x=x, y=y, s=solver, lr=lr, c=loops: fit(
                                   x, y, solver=s, lr=lr, epochs=epochs, tol=0.0,
                                   compile=c).params,
                               ref=ref, expected="not converged (by design)", repeats=1)
                naive_epochs = max(1, min(epochs, 20 if quick else 100))
                p0 = torch.zeros(series, 3, dtype=tdtype, device=device)
                xs = torch.as_tensor(x_np, dtype=tdtype, device=device).expand(series, n)
                bench.case(f"naive vmap(grad) GD loop, {epochs:,} epochs, eager", device,
                           dtype, series, n,
                           lambda xs=xs, y=y, p0=p0, e=naive_epochs: naive_gd(xs, y, p0, 1e-3, e),
                           scale=epochs / naive_epochs, repeats=1,
                           note=f"timed for {naive_epochs} epochs")
    return {"machine": machine(), "rows": [asdict(r) for r in bench.rows]}


def _long_table(x: np.ndarray, y: np.ndarray):
    """The batch as long-format rows (series_id, x, y), as a Parquet file would hold them."""
    import pyarrow as pa

    series, n = y.shape
    return pa.table({"series_id": np.repeat(np.arange(series), n),
                     "x": np.tile(x, series), "y": y.ravel()})


def _in_order(ids: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """A GROUP BY's rows (any order) as (series, 3) coefficients a, b, c by series id."""
    out = np.empty_like(coef)
    out[ids] = coef
    return out


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    design = torch.stack([x * x, x, torch.ones_like(x)], dim=-1)  # a, b, c
    return torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)


def _peers(bench: Bench, x, y, ref, series, n, subset):
    """numpy/scipy peers, and the DuckDB and Polars GROUP BY of power sums on the points as
    an in-memory Arrow table (where installed), on the CPU in float64 (what they compute in)."""
    rows = min(subset, series)
    scale = series / rows
    points = _long_table(x, y)
    for tool in peers.TOOLS:
        if importlib.util.find_spec(tool) is None:
            continue  # the bench extra is not installed
        bench.case(f"{tool} GROUP BY power sums + numpy solve", "cpu", "float64", series, n,
                   lambda tool=tool: _in_order(*peers.fit(tool, points)), ref=ref)
    bench.case("numpy.polyfit loop", "cpu", "float64", series, n,
               lambda: np.array([np.polyfit(x, y[i], 2) for i in range(rows)]),
               ref=ref, scale=scale, repeats=1, note=f"timed on {rows:,} series")
    bench.case("numpy.polyfit, 2-D y (shared x)", "cpu", "float64", series, n,
               lambda: np.polyfit(x, y.T, 2).T, ref=ref, repeats=1)
    if n <= 100:
        from scipy.optimize import least_squares

        few = min(rows, 200)

        def scipy_loop():
            return np.array([least_squares(lambda p, i=i: p[0] * x**2 + p[1] * x + p[2] - y[i],
                                           np.zeros(3), loss="huber").x for i in range(few)])
        bench.case("scipy least_squares huber loop", "cpu", "float64", series, n, scipy_loop,
                   scale=series / few, repeats=1, note=f"timed on {few} series")


GAUSS_POINTS = 25  # Gpufit's benchmark: 5 x 5 pixels per 2-D Gaussian fit
GAUSS_REFERENCE_SERIES = 50


def gauss_dataset(series: int, seed: int = 0):
    """1-D Gaussian peaks on x = linspace(-5, 5, 25): a ~ U(2, 6), mu ~ U(-2, 2),
    sigma ~ U(0.5, 1.5), c ~ U(-1, 1), noise 0.1; returns x, y and the truth."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-5.0, 5.0, GAUSS_POINTS)
    truth = rng.uniform([2, -2, 0.5, -1], [6, 2, 1.5, 1], (series, 4))
    a, mu, sigma, c = (truth[:, [j]] for j in range(4))
    y = a * np.exp(-((x - mu) ** 2) / (2 * sigma**2)) + c + rng.normal(0, 0.1, (series, x.size))
    return x, y, truth


def _curve_fit_loop(x, y, truth, rows):
    from scipy.optimize import curve_fit

    def gauss(x, a, mu, sigma, c):
        return a * np.exp(-((x - mu) ** 2) / (2 * sigma**2)) + c

    out = []
    for i in range(rows):
        p = curve_fit(gauss, x, y[i], p0=truth[i], xtol=1e-12, ftol=1e-12, gtol=1e-12)[0]
        out.append(np.array([p[0], p[1], abs(p[2]), p[3]]))
    return np.array(out)


def _gauss(bench: Bench, series: int, devices, dtypes, cpu_max, quick: bool):
    """batchfit's Levenberg-Marquardt on the Gaussian family next to a curve_fit loop (the
    CPU peer; started from the truth, so it does the least work it can)."""
    x_np, y_np, truth = gauss_dataset(series)
    ref = _curve_fit_loop(x_np, y_np, truth, min(GAUSS_REFERENCE_SERIES, series))
    on_cpu = cpu_max is None or series <= cpu_max
    if on_cpu:
        few = min(series, 200 if not quick else 50)
        bench.case("scipy curve_fit loop, gauss", "cpu", "float64", series, GAUSS_POINTS,
                   lambda: _curve_fit_loop(x_np, y_np, truth, few), ref=ref,
                   scale=series / few, repeats=1, note=f"timed on {few} series")
    for device in devices if on_cpu else [d for d in devices if d != "cpu"]:
        for dtype in dtypes:
            tdtype = getattr(torch, dtype)
            x = torch.as_tensor(x_np, dtype=tdtype, device=device)
            y = torch.as_tensor(y_np, dtype=tdtype, device=device)
            compiled = not quick
            bench.case(f"batchfit newton (LM) gauss, compile={compiled}", device, dtype,
                       series, GAUSS_POINTS,
                       lambda x=x, y=y, c=compiled: fit(x, y, model="gauss", compile=c).params,
                       ref=ref, wrong_above=ROBUST_AGREEMENT)


# NIST's Gauss1 model (8 parameters): an exponential baseline under two Gaussian peaks, on
# x = 1..250; per-series truths scattered 5 % around NIST's certified values, noise 2.5.
PEAKS_POINTS = 250
PEAKS_CENTRE = np.array([98.778, 0.010497, 100.49, 67.481, 23.130, 71.994, 178.998, 18.389])
PEAKS_REFERENCE_SERIES = 50


def peaks(x, b):
    """``b0 exp(-b1 x) + b2 exp(-(x - b3)^2 / b4^2) + b5 exp(-(x - b6)^2 / b7^2)``."""
    return (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
            + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2))


def peaks_dataset(series: int, seed: int = 0):
    """x, y, the truth and a start within 10 % of it (the same for every method)."""
    rng = np.random.default_rng(seed)
    x = np.arange(1.0, PEAKS_POINTS + 1)
    truth = PEAKS_CENTRE * (1 + 0.05 * rng.uniform(-1, 1, (series, 8)))
    clean = peaks(torch.from_numpy(x), torch.from_numpy(truth.T[:, :, None])).numpy()
    y = clean + rng.normal(0, 2.5, (series, PEAKS_POINTS))
    return x, y, truth, truth * (1 + 0.1 * rng.uniform(-1, 1, (series, 8)))


def _peaks_scipy_loop(x, y, p0, rows):
    """``scipy.optimize.least_squares(method="lm")`` per series, the model in numpy."""
    from scipy.optimize import least_squares

    def model(b):
        return (b[0] * np.exp(-b[1] * x) + b[2] * np.exp(-((x - b[3]) ** 2) / b[4] ** 2)
                + b[5] * np.exp(-((x - b[6]) ** 2) / b[7] ** 2))

    return np.array([least_squares(lambda b, i=i: model(b) - y[i], p0[i], method="lm").x
                     for i in range(rows)])


def _peaks(bench: Bench, series: int, devices, cpu_max, quick: bool):
    """batchfit's LM on a user model of 8 parameters and 250 points, float64, next to a
    scipy loop from the same starts (the issue-13 benchmark)."""
    x_np, y_np, _, p0 = peaks_dataset(series)
    ref = _peaks_scipy_loop(x_np, y_np, p0, min(PEAKS_REFERENCE_SERIES, series))
    on_cpu = cpu_max is None or series <= cpu_max
    if on_cpu:
        few = min(series, 200 if not quick else PEAKS_REFERENCE_SERIES)
        bench.case("scipy least_squares loop, peaks", "cpu", "float64", series, PEAKS_POINTS,
                   lambda: _peaks_scipy_loop(x_np, y_np, p0, few), ref=ref, scale=series / few,
                   repeats=1, note=f"timed on {few} series")
    for device in devices if on_cpu else [d for d in devices if d != "cpu"]:
        x = torch.as_tensor(x_np, device=device)
        y = torch.as_tensor(y_np, device=device)
        start = torch.as_tensor(p0, device=device)
        for compiled in (False,) if quick else (False, True):
            bench.case(f"batchfit newton (LM) peaks, compile={compiled}", device, "float64",
                       series, PEAKS_POINTS,
                       lambda c=compiled, x=x, y=y, p0=start: fit(
                           x, y, model=peaks, p0=p0, dtype="float64", compile=c).params, ref=ref,
                       wrong_above=ROBUST_AGREEMENT)


QUICK = dict(sizes=(1_000, 10_000), long_series=0, dtypes=("float32",), repeats=1, epochs=300,
             peer_subset=500, gauss_sizes=(1_000,), peaks_sizes=(200,))


def multiples(rows: list[dict]) -> list[dict]:
    """Add each row's speed as a multiple of the floor (same shape, device, dtype) and of the
    numpy.polyfit loop (same shape)."""
    for row in rows:
        same = [r for r in rows if r["series"] == row["series"] and r["points"] == row["points"]]
        floor = [r for r in same if r["method"].startswith("floor") and
                 r["device"] == row["device"] and r["dtype"] == row["dtype"]]
        loop = [r for r in same if r["method"] in ("numpy.polyfit loop",
                                                    "scipy curve_fit loop, gauss",
                                                    "scipy least_squares loop, peaks")]
        row["x_floor"] = floor[0]["seconds"] / row["seconds"] if floor else float("nan")
        row["x_polyfit_loop"] = loop[0]["seconds"] / row["seconds"] if loop else float("nan")
    return rows


def table(result: dict) -> str:
    rows = multiples(result["rows"])
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, gpu {m['gpu']}, torch {m['torch']}",
             (f"{'series':>9} {'N':>6} {'method':<48} {'dev':<4} {'dtype':<7} {'seconds':>10} "
              f"{'fits/s':>12} {'x floor':>8} {'x loop':>8} {'compile':>8} {'rel err':>8}  "
              "verdict")]
    for r in rows:
        mark = "~" if r["extrapolated"] else " "
        compile_s = r["first_call_s"] - r["seconds"] if "compile=True" in r["method"] else 0
        lines.append(
            f"{r['series']:>9,} {r['points']:>6,} {r['method']:<48} {r['device']:<4} "
            f"{r['dtype']:<7} {mark}{r['seconds']:>9.4f} {r['fits_per_s']:>12,.0f} "
            f"{r['x_floor']:>8.3f} {r['x_polyfit_loop']:>8.1f} "
            f"{compile_s:>8.1f} {r['error']:>8.1e}  {r['verdict']}"
            + (f" ({r['note']})" if r["note"] else ""))
    lines.append("~ extrapolated (see note); x floor: fits/s as a multiple of the floor's "
                 "(1 = as fast as reading x and y once); x loop: multiple of the numpy.polyfit "
                 "loop (for gauss: of the scipy curve_fit loop); compile: first call minus a later one (compile=True lets batchfit "
                 "compile kernels whose eager work is not trivial); rel err: max |coef - ref| / "
                 "max |ref| over 200 series vs float64 numpy.polyfit (scipy for huber and "
                 "gauss)")
    return "\n".join(lines)


def plot(result: dict, path: str, points: int = 100) -> str:
    """Throughput (fits/s) against batch size: a panel per dtype, a colour per method
    (batchfit solid, peers dashed, the floor dotted black), a line style per device."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["rows"] if r["points"] == points]
    dtypes = sorted({r["dtype"] for r in rows})
    methods = sorted({r["method"] for r in rows if not r["method"].startswith("floor")})
    devices = sorted({r["device"] for r in rows})
    colours = dict(zip(methods, colormaps["tab20"].colors))
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(dtypes), squeeze=False, sharey=True)[0]
    for ax, dtype in zip(axes, dtypes):
        for method in ["floor"] + methods:
            for device in devices:
                values = sorted((r["series"], r["fits_per_s"]) for r in rows
                                if r["dtype"] == dtype and r["device"] == device
                                and (r["method"] == method or method == "floor"
                                     and r["method"].startswith("floor")))
                if not values:
                    continue
                peer = not method.startswith("batchfit") and method != "floor"
                style = ":" if method == "floor" else ("--" if peer else "-")
                colour = "black" if method == "floor" else colours[method]
                label = (method if method != "floor" else "floor: read x and y once") + (
                    f" [{device}]" if len(devices) > 1 else "")
                ax.plot(*zip(*values), style, color=colour, marker="o", ms=3,
                        lw=2 if method == "floor" else 1.3, label=label,
                        alpha=0.6 if device == "cpu" and len(devices) > 1 else 1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("series in the batch")
        ax.set_title(f"{dtype} (numpy/scipy peers compute in float64)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"fits per second ({points} points per series)")
    m = result["machine"]
    fig.suptitle(f"batchfit throughput: {m['cpu']}, {m['cores']} cores"
                 + (f", {m['gpu']}" if m["gpu"] else "") + f", torch {m['torch']}")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def save(result: dict, json_path: str | None, plot_path: str | None) -> list[str]:
    written = []
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**result, "rows": multiples(result["rows"])}, f, indent=1)
        written.append(json_path)
    if plot_path:
        written.append(plot(result, plot_path))
    return written
