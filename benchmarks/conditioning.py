"""Accuracy on hard cases, against an exact rational oracle and NIST's certified values.

Run:  python benchmarks/conditioning.py [--json PATH] [--markdown PATH] [--device cpu]
          [--series 8] [--skip-compile]

For every hard case (offset x such as timestamps, x spanning many decades, nearly collinear
designs, huge and tiny |y|, degrees 2 to 6, NIST StRD Pontius and Wampler1-5) the reference
least-squares coefficients are computed EXACTLY from the float64 data: the data are exact
binary fractions, so the normal equations, solved by Gauss-Jordan elimination in
``fractions.Fraction`` arithmetic, give the true minimiser of the sum of squares of THESE
numbers (a certified oracle; no rounding anywhere). Its fitted values, residual sum of squares
and standard errors are exact too (the square root of the last is the only rounding).

Each method is then scored against it:

* coef digits: per coefficient ``-log10(|p - ref| / |ref|)`` (``|ref|`` replaced by
  ``max |ref|`` where ref is exactly 0), capped at 17, floored at 0; the minimum over the
  coefficients and over the case's series;
* curve digits: ``-log10(max |yhat - yhat_ref| / max |yhat_ref|)`` over the data points, both
  evaluated exactly (raw coefficients of offset-x fits are very ill-conditioned; the curve
  is what a fit is for), minimum over the series;
* cert digits (NIST cases): coef digits against NIST's certified values;
* float32 verdict (the aim "float32 is never silently wrong"): a series is OK when its status
  is not 'ok' (flagged), or when every ``|p32 - ref| / stderr_ref <= 0.1`` (the numerical
  error is well below the statistical uncertainty; stderr_ref is the exact float64 standard
  error), or, for exact-fit data (noise-free by construction), when coef digits >= 5;
* float64 aim: batchfit's coef and curve digits >= numpy.polyfit's, on every case.

Methods: batchfit exact and newton (loss mse) in float32 and float64 (compile=False), the
CLI (``batchfit run`` on a Parquet file, in process, float64 and float32), numpy.polyfit and
numpy.polynomial.Polynomial.fit(...).convert(). Plus one compiled float32 exact run
(compile=True, on a batch big enough that the kernel is really compiled) compared with eager.

Where the NIST data come from: see NIST_SOURCES below.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

# As tests/conftest.py: torch (imported lazily, below) shares the tests' inductor cache.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "batchfit-inductor-cache"))

CAP = 17.0  # digits of an exact answer
F32_STDERR_RATIO = 0.1  # float32 error allowed, in units of the float64 standard error
EXACT_DATA_DIGITS = 5.0  # float32 digits required on noise-free data (stderr 0)
# float64 aim: batchfit's digits >= polyfit's - AIM_MARGIN. Digits near the rounding level
# move by a few tenths between equally good methods (a factor 2-3 in error is luck of the
# rounding), so half a digit separates noise from a real loss.
AIM_MARGIN = 0.5
NOISE = 1e-3  # noise sd of the synthetic cases, relative to a signal of size ~1

# ---------------------------------------------------------------- NIST StRD data

NIST_SOURCES = {
    "Pontius": "NIST StRD Pontius.dat (https://www.itl.nist.gov/div898/strd/lls/data/"
               "Pontius.shtml), transcribed from GSL's multifit/test_pontius.c "
               "(github.com/ampl/gsl), which holds the 40 observations, the certified "
               "coefficients and their standard deviations; the same numbers appear in "
               "JDemetra's test DataSets and Octave's wpolyfit tests",
    "Wampler1": "rebuilt from its definition y = 1 + x + x^2 + x^3 + x^4 + x^5, x = 0..20 "
                "(NIST StRD Wampler1.dat); certified coefficients 1, standard deviations 0",
    "Wampler2": "rebuilt from its definition y = 1 + 0.1 x + 0.01 x^2 + ... + 1e-5 x^5, "
                "x = 0..20, rounded to 5 decimals as in NIST StRD Wampler2.dat; certified "
                "coefficients 1, 0.1, 0.01, 0.001, 1e-4, 1e-5, standard deviations 0",
    "Wampler3": "NIST StRD Wampler3.dat, transcribed from Apache Commons Math's "
                "OLSMultipleLinearRegressionTest.testWampler3 (github.com/apache/"
                "commons-math), data and certified values",
    "Wampler4": "NIST StRD Wampler4.dat, transcribed from Apache Commons Math's "
                "OLSMultipleLinearRegressionTest.testWampler4 (github.com/apache/"
                "commons-math), data and certified values",
    "Wampler5": "NIST StRD Wampler5.dat: data as in the EDA package's Wampler.m "
                "(github.com/tmprajwal/psi-nedm) and Octave's wpolyfit NIST tests, certified "
                "values as in Octave's wpolyfit tests and JDemetra's DataSets",
}

PONTIUS_X = [150000 * (i % 20 + 1) for i in range(40)]
PONTIUS_Y = [
    .11019, .21956, .32949, .43899, .54803, .65694, .76562, .87487, .98292, 1.09146,
    1.20001, 1.30822, 1.41599, 1.52399, 1.63194, 1.73947, 1.84646, 1.95392, 2.06128, 2.16844,
    .11052, .22018, .32939, .43886, .54798, .65739, .76596, .87474, .98300, 1.09150,
    1.20004, 1.30818, 1.41613, 1.52408, 1.63159, 1.73965, 1.84696, 1.95445, 2.06177, 2.16829]
PONTIUS_CERTIFIED = (["0.673565789473684E-03", "0.732059160401003E-06",
                      "-0.316081871345029E-14"],
                     ["0.107938612033077E-03", "0.157817399981659E-09",
                      "0.486652849992036E-16"])

# Wampler3 = Wampler1 + e, Wampler4 = Wampler1 + 100 e, Wampler5 = Wampler1 + 10000 e for one
# noise pattern e (orthogonal to the quintics: all three fit 1, 1, 1, 1, 1, 1 exactly);
# wampler_data checks that the transcriptions agree with this.
WAMPLER_Y = {
    3: [760, -2042, 2111, -1684, 3888, 1858, 11379, 17560, 39287, 64382, 113159, 175108,
        273291, 400186, 581243, 811568, 1121004, 1506550, 2002767, 2611612, 3369180],
    4: [75901, -204794, 204863, -204436, 253665, -200894, 214131, -185192, 221249, -138370,
        315911, -27644, 455253, 197434, 783995, 608816, 1370781, 1303798, 2205519, 2408860,
        3444321],
    5: [7590001, -20479994, 20480063, -20479636, 25231365, -20476094, 20489331, -20460392,
        18417449, -20413570, 20591111, -20302844, 18651453, -20077766, 21059195, -19666384,
        26348481, -18971402, 22480719, -17866340, 10958421],
}
WAMPLER_STDERR = {
    1: ["0"] * 6,
    2: ["0"] * 6,
    3: ["2152.32624678170", "2363.55173469681", "779.343524331583", "101.475507550350",
        "5.64566512170752", "0.112324854679312"],
    4: ["215232.624678170", "236355.173469681", "77934.3524331583", "10147.5507550350",
        "564.566512170752", "11.2324854679312"],
    5: ["21523262.4678170", "23635517.3469681", "7793435.24331583", "1014755.07550350",
        "56456.6512170752", "1123.24854679312"],
}


def wampler_data(number: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """x, y and certified coefficients of NIST's WamplerN (N = 1..5), as NIST lists them
    (B0 .. B5: lowest power first)."""
    x = np.arange(21)
    if number == 2:  # the certified data are the exact values rounded to 5 decimals
        y = [float(round(sum(Fraction(1, 10**j) * int(v) ** j for j in range(6)), 5))
             for v in x]
        return x.astype(float), np.array(y), ["1", "0.1", "0.01", "0.001", "1E-4", "1E-5"]
    base = [sum(int(v) ** j for j in range(6)) for v in x]
    if number == 1:
        y = base
    else:
        y = WAMPLER_Y[number]
        noise = [a - b for a, b in zip(WAMPLER_Y[3], base)]
        scale = {3: 1, 4: 100, 5: 10000}[number]
        if [a - b for a, b in zip(y, base)] != [scale * e for e in noise]:
            raise AssertionError(f"Wampler{number}'s transcription is not Wampler1 + "
                                 f"{scale} x Wampler3's noise")
    return x.astype(float), np.array(y, dtype=float), ["1"] * 6


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    group: str
    x: np.ndarray  # (B, N) float64
    y: np.ndarray  # (B, N) float64
    degree: int
    exact: bool = False  # noise-free by construction: stderr is 0, judge float32 by digits
    certified: list[str] | None = None  # NIST certified coefficients, highest power first
    certified_stderr: list[str] | None = None  # (in the same order)
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _frame_poly(name: str, x: np.ndarray, degree: int, scale: float = 1.0,
                noise: float = NOISE) -> np.ndarray:
    """y = scale * (sum_j q_j t^j + noise), t the series' x range mapped onto [-1, 1], q ~
    N(0, 1): a signal of size ~1 in the frame, whatever the raw coefficients become."""
    rng = _rng(name)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    t = (x - (lo + hi) / 2) / ((hi - lo) / 2)
    q = rng.normal(0, 1, (x.shape[0], degree + 1))
    signal = sum(q[:, [j]] * t**j for j in range(degree + 1))
    return scale * (signal + rng.normal(0, noise, x.shape))


def build_cases(series: int = 8, points: int | None = None, groups=None) -> list[Case]:
    """The hard cases; ``points`` (default: 200 for timestamps, 100 otherwise) and ``series``
    scale them down for the tests. ``groups`` selects groups by name."""
    cases: list[Case] = []

    def n_points(default):
        return points or default

    def uniform(name, lo, hi, n):
        return np.sort(lo + (hi - lo) * _rng(name + "/x").uniform(0, 1, (series, n)), axis=1)

    for offset in (1e6, 1e9):
        for span in (1.0, 100.0, 1e5):
            name = f"timestamps x = {offset:.0e} + [0, {span:g}]"
            x = uniform(name, offset, offset + span, n_points(200))
            cases.append(Case(name, "timestamps", x, _frame_poly(name, x, 2), 2))
    for lo, hi in ((-3, 3), (-6, 6)):
        name = f"decades x = logspace(1e{lo}, 1e{hi})"
        x = np.tile(np.logspace(lo, hi, n_points(100)), (series, 1))
        cases.append(Case(name, "decades", x, _frame_poly(name, x, 3), 3))
    for width in (1e-6, 1e-3):
        name = f"clustered x = 1 and 2 +- {width:g}"
        n = n_points(100)
        x = np.concatenate([np.ones((series, n // 2)),
                            2 + width * _rng(name + "/x").uniform(-1, 1, (series, n - n // 2))],
                           axis=1)
        cases.append(Case(name, "clustered", x, _frame_poly(name, x, 2), 2))
    for exponent in (-30, -20, 20, 30):
        name = f"|y| ~ 1e{exponent}"
        x = uniform(name, 0.0, 1.0, n_points(100))
        cases.append(Case(name, "y scale", x, _frame_poly(name, x, 2, scale=10.0**exponent),
                          2))
    for offset in (1e4, 1e6):  # y far from 0 next to its spread: float32 cannot hold it
        name = f"y = {offset:.0e} + signal ~ 1"
        x = uniform(name, 0.0, 1.0, n_points(100))
        cases.append(Case(name, "y offset", x, offset + _frame_poly(name, x, 2), 2))
    for lo, hi in ((0.0, 1.0), (-1.0, 3.0)):
        for degree in range(2, 7):
            name = f"degree {degree} on [{lo:g}, {hi:g}]"
            x = uniform(name, lo, hi, n_points(100))
            cases.append(Case(name, "degree", x, _frame_poly(name, x, degree), degree))
    # NIST lists B0 .. BD (lowest power first); the cases hold them highest first, as batchfit
    cases.append(Case("NIST Pontius", "nist", np.array([PONTIUS_X], dtype=float),
                      np.array([PONTIUS_Y]), 2, certified=PONTIUS_CERTIFIED[0][::-1],
                      certified_stderr=PONTIUS_CERTIFIED[1][::-1],
                      source=NIST_SOURCES["Pontius"]))
    for number in range(1, 6):
        x, y, certified = wampler_data(number)
        cases.append(Case(f"NIST Wampler{number}", "nist", x[None], y[None], 5,
                          exact=number <= 2, certified=certified[::-1],
                          certified_stderr=WAMPLER_STDERR[number][::-1],
                          source=NIST_SOURCES[f"Wampler{number}"]))
    if groups is not None:
        cases = [case for case in cases if case.group in groups]
    return cases


# ---------------------------------------------------------------- the exact oracle

def _scaled_ints(values) -> tuple[list[int], int]:
    """Exact integers and a shift s with ``values[i] == ints[i] / 2**s`` (finite floats)."""
    ratios = [float(v).as_integer_ratio() for v in values]
    shift = max(d.bit_length() - 1 for _, d in ratios)
    return [n << (shift - d.bit_length() + 1) for n, d in ratios], shift


def _gauss_jordan(matrix: list[list[int]], columns: list[list[int]]) -> list[list[Fraction]]:
    """Solve ``matrix @ X = columns`` exactly (Fraction Gauss-Jordan, exact pivots);
    returns X's columns."""
    k = len(matrix)
    rows = [[Fraction(v) for v in matrix[i]] + [Fraction(c[i]) for c in columns]
            for i in range(k)]
    for j in range(k):
        pivot = next((i for i in range(j, k) if rows[i][j] != 0), None)
        if pivot is None:
            raise ZeroDivisionError("the normal equations are exactly singular")
        rows[j], rows[pivot] = rows[pivot], rows[j]
        head = rows[j][j]
        rows[j] = [v / head for v in rows[j]]
        for i in range(k):
            if i != j and rows[i][j] != 0:
                factor = rows[i][j]
                rows[i] = [a - factor * b for a, b in zip(rows[i], rows[j])]
    return [[rows[i][k + c] for i in range(k)] for c in range(len(columns))]


@dataclass
class Oracle:
    """The exact least-squares fit of one series' float64 points."""

    coef: list[Fraction]  # highest power first (batchfit's order): x**(degree - j) for j
    fitted: list[Fraction]  # exact fitted values at the points
    sse: Fraction  # exact residual sum of squares
    stderr: np.ndarray  # sqrt(sse / (n - k) * inv(X^T X)_jj), rounded once (coef's order)
    x_ints: list[int] = field(repr=False)  # x == x_ints / 2**x_shift
    x_shift: int = 0

    @property
    def exact_fit(self) -> bool:
        return self.sse == 0


def oracle(x: np.ndarray, y: np.ndarray, degree: int) -> Oracle:
    """Exact least squares: with x = X / 2**sx and y = Y / 2**sy (integers), the normal
    equations in X units are the integer system ``sum_j S[i+j] g_j = T_i`` (S power sums of
    X, T moments of X with Y, g = coefficients of X**j times 2**sy); Gauss-Jordan in Fractions
    solves it, and the inverse of S for the standard errors, exactly."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    k = degree + 1
    big_x, sx = _scaled_ints(x)
    big_y, sy = _scaled_ints(y)
    powers = [[1] * len(big_x)]
    for _ in range(2 * degree):
        powers.append([p * v for p, v in zip(powers[-1], big_x)])
    sums = [sum(row) for row in powers]
    moments = [sum(p * v for p, v in zip(powers[j], big_y)) for j in range(k)]
    gram = [[sums[i + j] for j in range(k)] for i in range(k)]
    unit = [[int(i == c) for i in range(k)] for c in range(k)]
    solution, *inverse = _gauss_jordan(gram, [moments] + unit)
    # fitted values and residuals over one common denominator: integers only
    common = math.lcm(*(g.denominator for g in solution))
    numerators = [g.numerator * (common // g.denominator) for g in solution]
    fitted_num = [sum(numerators[j] * powers[j][n] for j in range(k))
                  for n in range(len(big_x))]
    denominator = common << sy
    fitted = [Fraction(f, denominator) for f in fitted_num]
    sse = Fraction(sum((yv * common - f) ** 2 for yv, f in zip(big_y, fitted_num)),
                   denominator**2)
    coef = [g * Fraction(2 ** (sx * j), 2**sy) for j, g in enumerate(solution)]
    dof = len(big_x) - k
    stderr = np.array([math.sqrt(sse / dof * inverse[j][j] * 4 ** (sx * j)) if dof > 0
                       else math.nan for j in range(k)])
    # (computed with index j = power of x; returned highest power first)
    return Oracle(coef[::-1], fitted, sse, stderr[::-1].copy(), big_x, sx)


# ---------------------------------------------------------------- scoring

def _log10(value: Fraction) -> float:
    """log10 of a positive Fraction of any size (floats would overflow or underflow)."""
    return math.log10(value.numerator) - math.log10(value.denominator)


def _digits(error: Fraction, scale: Fraction) -> float:
    if error == 0:
        return CAP
    if scale == 0:
        return 0.0
    return float(min(CAP, max(0.0, -_log10(error / scale))))


def coef_digits(params, reference) -> float:
    """min over coefficients of -log10(|p - ref| / |ref|) (``max |ref|`` where ref == 0),
    capped at 17 and floored at 0; 0 when a parameter is not finite."""
    params = np.asarray(params, dtype=np.float64)
    if not np.isfinite(params).all():
        return 0.0
    reference = [Fraction(r) for r in reference]
    top = max(abs(r) for r in reference)
    return min(_digits(abs(Fraction(float(p)) - r), abs(r) if r != 0 else top)
               for p, r in zip(params, reference))


def curve_digits(params, ref: Oracle) -> float:
    """-log10(max |yhat - yhat_ref| / max |yhat_ref|) over the points, all exact.
    ``params``: highest power first."""
    params = np.asarray(params, dtype=np.float64)
    if not np.isfinite(params).all():
        return 0.0
    big_p, sp = _scaled_ints(params[::-1])  # big_p[j] multiplies X**j
    degree, sx = len(params) - 1, ref.x_shift
    worst = Fraction(0)
    for xv, want in zip(ref.x_ints, ref.fitted):
        # yhat * 2**(sp + sx*degree) = sum_j P_j X^j 2**(sx*(degree - j)), by Horner on ints
        total = big_p[degree]
        for j in reversed(range(degree)):
            total = total * xv + (big_p[j] << (sx * (degree - j)))
        worst = max(worst, abs(Fraction(total, 1 << (sp + sx * degree)) - want))
    return _digits(worst, max(abs(f) for f in ref.fitted))


def stderr_ratio(params, ref: Oracle) -> float:
    """max_j |p_j - ref_j| / stderr_ref_j (inf when a parameter is not finite)."""
    params = np.asarray(params, dtype=np.float64)
    if not np.isfinite(params).all():
        return math.inf
    ratios = []
    for p, r, s in zip(params, ref.coef, ref.stderr):
        error = abs(Fraction(float(p)) - r)
        ratios.append(0.0 if error == 0 else math.inf if s == 0 else float(error / Fraction(s)))
    return max(ratios)


# ---------------------------------------------------------------- the methods

@dataclass
class Fit:
    params: np.ndarray  # (B, k) float64, highest power first (batchfit's order)
    status: np.ndarray  # (B,) str
    stderr: np.ndarray | None = None  # (B, k) the method's own standard errors
    seconds: float = 0.0


def _batchfit(solver: str, dtype: str, device: str, compile=False):
    def run(case: Case) -> Fit:
        import batchfit

        start = time.perf_counter()
        result = batchfit.fit(case.x, case.y, degree=case.degree, solver=solver, loss="mse",
                              dtype=dtype, device=device, compile=compile)
        return Fit(result.params.cpu().numpy(), np.asarray(result.status_labels()),
                   result.stderr.cpu().numpy(), time.perf_counter() - start)
    return run


def _cli(dtype: str, device: str):
    def run(case: Case) -> Fit:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from batchfit.app.cli import main
        from batchfit.fitting.models import polynomial

        batch, n = case.shape
        with tempfile.TemporaryDirectory() as tmp:
            source, target = Path(tmp, "in.parquet"), Path(tmp, "out.parquet")
            pq.write_table(pa.table({"series_id": np.repeat(np.arange(batch), n),
                                     "x": case.x.ravel(), "y": case.y.ravel()}), source)
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()) as said:
                code = main(["run", str(source), "-o", str(target), "--dtype", dtype,
                             "--degree", str(case.degree), "--device", device,
                             "--no-progress", "--no-compile"])
            seconds = time.perf_counter() - start
            if code != 0:
                raise RuntimeError(f"batchfit run failed ({code}): {said.getvalue()}")
            table = pq.read_table(target).to_pydict()
        order = np.argsort(table["series_id"])
        params = np.empty((batch, case.degree + 1))
        stderr = np.empty((batch, case.degree + 1))
        for name, index in polynomial(case.degree).columns:
            params[:, index] = np.asarray(table[name], dtype=np.float64)[order]
            stderr[:, index] = np.asarray(table[f"{name}_stderr"], dtype=np.float64)[order]
        return Fit(params, np.asarray(table["status"])[order], stderr, seconds)
    return run


def _numpy(kind: str):
    def run(case: Case) -> Fit:
        start = time.perf_counter()
        rows = []
        with warnings.catch_warnings():  # polyfit warns on ill-conditioned designs
            warnings.simplefilter("ignore")
            for x, y in zip(case.x, case.y):
                if kind == "polyfit":
                    rows.append(np.polyfit(x, y, case.degree))
                else:  # (Polynomial's coef: lowest power first)
                    coef = np.polynomial.Polynomial.fit(x, y, case.degree).convert().coef
                    rows.append(np.pad(coef, (0, case.degree + 1 - len(coef)))[::-1])
        return Fit(np.array(rows, dtype=np.float64), np.full(case.shape[0], "ok"),
                   seconds=time.perf_counter() - start)
    return run


def methods(device: str = "auto") -> dict[str, tuple[str, str, object]]:
    """name -> (label, dtype, runner)."""
    return {
        "exact32": ("batchfit exact", "float32", _batchfit("exact", "float32", device)),
        "exact64": ("batchfit exact", "float64", _batchfit("exact", "float64", device)),
        "newton32": ("batchfit newton", "float32", _batchfit("newton", "float32", device)),
        "newton64": ("batchfit newton", "float64", _batchfit("newton", "float64", device)),
        "cli32": ("batchfit run (CLI)", "float32", _cli("float32", device)),
        "cli64": ("batchfit run (CLI)", "float64", _cli("float64", device)),
        "polyfit": ("numpy.polyfit", "float64", _numpy("polyfit")),
        "polynomial": ("numpy Polynomial.fit.convert", "float64", _numpy("polynomial")),
    }


BATCHFIT64 = ("exact64", "newton64", "cli64")
CEILING = ("exact LS rounded to float64 (ceiling)", "float64")
BATCHFIT32 = ("exact32", "newton32", "cli32")


def oracles(case: Case) -> list[Oracle]:
    return [oracle(x, y, case.degree) for x, y in zip(case.x, case.y)]


def score(case: Case, refs: list[Oracle], fit: Fit, dtype: str) -> dict:
    """Digits (worst series) and, for float32, the verdict with its per-series evidence."""
    coef = [coef_digits(p, ref.coef) for p, ref in zip(fit.params, refs)]
    curve = [curve_digits(p, ref) for p, ref in zip(fit.params, refs)]
    labels, counts = np.unique(fit.status, return_counts=True)
    out = {"coef_digits": min(coef), "curve_digits": min(curve), "coef_digits_series": coef,
           "curve_digits_series": curve, "status_series": [str(s) for s in fit.status],
           "status": {str(k): int(v) for k, v in zip(labels, counts)},
           "seconds": fit.seconds}
    if case.certified is not None:
        out["cert_digits"] = min(coef_digits(p, case.certified) for p in fit.params)
    if dtype == "float32":
        out.update(float32_verdict(case, refs, fit, coef))
    return out


def float32_verdict(case: Case, refs: list[Oracle], fit: Fit, coef: list[float]) -> dict:
    """Per series: flagged (status not 'ok'), or error/stderr_ref <= 0.1, or (exact data)
    coef digits >= 5. ``f32_own_stderr_ratio``: the error in units of the method's OWN
    reported standard errors (how much its error bars cover; context only)."""
    ratios, wrong = [], 0
    own = [] if fit.stderr is None else [
        max(float(abs(Fraction(float(p)) - r) / Fraction(float(s))) if s > 0 else math.inf
            for p, r, s in zip(params, ref.coef, errors))
        if np.isfinite(params).all() and np.isfinite(errors).all() else None
        for params, ref, errors in zip(fit.params, refs, fit.stderr)]
    for status, params, ref, digits in zip(fit.status, fit.params, refs, coef):
        flagged = status != "ok"
        if case.exact:
            ratio = None
            good = flagged or digits >= EXACT_DATA_DIGITS
        else:
            ratio = stderr_ratio(params, ref)
            good = flagged or ratio <= F32_STDERR_RATIO
        ratios.append(ratio)
        wrong += not good
    return {"f32_ok": wrong == 0, "f32_silently_wrong": wrong, "f32_stderr_ratio": ratios,
            "f32_own_stderr_ratio": own, "f32_flagged": int((fit.status != "ok").sum())}


def run_case(case: Case, chosen: dict, refs: list[Oracle] | None = None) -> dict:
    refs = oracles(case) if refs is None else refs
    results = {}
    for key, (label, dtype, runner) in chosen.items():
        results[key] = {"method": label, "dtype": dtype,
                        **score(case, refs, runner(case), dtype)}
    rounded = Fit(np.array([[float(c) for c in ref.coef] for ref in refs]),
                  np.full(case.shape[0], "ok"))
    results["ceiling"] = {"method": CEILING[0], "dtype": CEILING[1],
                          **score(case, refs, rounded, "float64")}
    out = {"case": case.name, "group": case.group, "degree": case.degree,
           "series": case.shape[0], "points": case.shape[1], "exact_data": case.exact,
           "methods": results}
    if case.certified is not None:
        out["source"] = case.source
        out["oracle_cert_digits"] = min(coef_digits([float(c) for c in ref.coef],
                                                    case.certified) for ref in refs)
        if any(Fraction(s) for s in case.certified_stderr):
            out["oracle_stderr_cert_digits"] = min(
                coef_digits(ref.stderr, case.certified_stderr) for ref in refs)
        else:  # certified 0: the data are exact; say how far from exact the float64 data are
            out["oracle_stderr_cert_digits"] = CAP if all(ref.sse == 0 for ref in refs) \
                else None
            out["oracle_max_stderr"] = max(float(ref.stderr.max()) for ref in refs)
    out["aims"] = aims(out)
    return out


def float64_aim(entry: dict, polyfit: dict, ceiling: dict, margin: float = AIM_MARGIN) -> bool:
    """batchfit's coef and curve digits >= polyfit's - margin. Where polyfit beats the exact
    answer rounded to float64 (the ceiling: e.g. curve digits of x = 1e9 + [0, 1], where
    the rounded raw coefficients carry no digit of the curve), that is luck of the rounding:
    the bar is then the ceiling's digits."""
    return all(entry[key] >= min(polyfit[key], ceiling[key]) - margin
               for key in ("coef_digits", "curve_digits"))


def aims(result: dict) -> dict:
    """float64: batchfit's digits >= polyfit's (- AIM_MARGIN); float32: no series silently
    wrong."""
    ms = result["methods"]
    out = {}
    if "polyfit" in ms:
        for key in BATCHFIT64:
            if key in ms:
                out[f"{key}>=polyfit"] = float64_aim(ms[key], ms["polyfit"], ms["ceiling"])
    for key in BATCHFIT32:
        if key in ms:
            out[f"{key} not silently wrong"] = bool(ms[key]["f32_ok"])
    return out


# ---------------------------------------------------------------- compiled vs eager

def compiled_check(case: Case, refs: list[Oracle], eager: Fit, device: str,
                   min_points: int = 2_600_000) -> dict:
    """float32 exact with compile=True on the case's series tiled up to ``min_points`` points
    (below ~2.5 M points the engine leaves the kernel eager even with compile=True)."""
    import batchfit
    from batchfit import engine

    batch, n = case.shape
    copies = -(-min_points // (batch * n))
    before = len(engine._COMPILED)
    start = time.perf_counter()
    result = batchfit.fit(np.tile(case.x, (copies, 1)), np.tile(case.y, (copies, 1)),
                          degree=case.degree, solver="exact", dtype="float32", device=device,
                          compile=True)
    seconds = time.perf_counter() - start
    compiled = len(engine._COMPILED) - before
    params = result.params.cpu().numpy()
    status = np.asarray(result.status_labels())
    agree = min(coef_digits(params[row], eager.params[row % batch])
                for row in range(0, len(params), max(1, len(params) // 64)))
    same_status = bool((status == np.tile(eager.status, copies)).all())
    first = Fit(params[:batch], status[:batch])
    scored = score(case, refs, first, "float32")
    return {"case": case.name, "series": len(params), "points": n, "seconds": seconds,
            "kernels_compiled": compiled, "digits_vs_eager": agree,
            "same_status": same_status, "coef_digits": scored["coef_digits"],
            "curve_digits": scored["curve_digits"], "f32_ok": scored["f32_ok"]}


# ---------------------------------------------------------------- reporting

def _fmt(value: float) -> str:
    return f"{value:.1f}"


def _verdict(entry: dict, result: dict) -> str:
    if entry["dtype"] == "float32" and "f32_ok" in entry:
        flagged = entry["f32_flagged"]
        note = f"{flagged}/{result['series']} flagged" if flagged else ""
        if result["exact_data"]:
            evidence = f"exact data, {_fmt(entry['coef_digits'])} digits"
        else:
            finite = [r for r, s in zip(entry["f32_stderr_ratio"],
                                        entry["status_series"]) if s == "ok"]
            evidence = f"err/se <= {max(finite):.2g}" if finite else ""
        detail = ", ".join(part for part in (evidence, note) if part)
        if entry["f32_ok"]:
            return f"OK ({detail})" if detail else "OK"
        own = [r for r, s in zip(entry["f32_own_stderr_ratio"] or [],
                                 entry["status_series"]) if s == "ok" and r is not None]
        cover = f"; err <= {max(own):.2g} x its own stderr" if own else ""
        return f"**FAIL** ({entry['f32_silently_wrong']} silently wrong; {detail}{cover})"
    return ""


def _status_text(status: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(status.items()))


LEGEND = """\
Digits of agreement with the exact least-squares solution of each case's float64 data
(Fraction arithmetic, see benchmarks/conditioning.py), worst series of the case, capped at
17. coef: min over coefficients of -log10(relative error); curve: -log10(max |yhat -
yhat_ref| / max |yhat_ref|) over the data, evaluated exactly; cert: coef digits against NIST's
certified values. The ceiling row is the exact solution rounded to float64: raw coefficients
of offset x cannot carry the curve better than that. float32 verdict: OK when every series is
flagged (status not ok) or within 0.1 float64 standard errors of the exact answer (exact-fit
data: >= 5 digits); float64 aim: coef and curve digits >= numpy.polyfit's - 0.5 (or the
ceiling's - 0.5 where polyfit beats the ceiling by luck).
"""


def markdown(report: dict) -> str:
    lines = [LEGEND,
        ("| case | method | dtype | coef digits | curve digits | cert digits | status | "
         "float32 verdict / float64 aim |"),
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for result in report["cases"]:
        ms = result["methods"]
        base = ms.get("polyfit")
        for key, entry in ms.items():
            verdict = _verdict(entry, result)
            if key in BATCHFIT64 and base is not None:
                ok = result["aims"][f"{key}>=polyfit"]
                verdict = ">= polyfit" if ok else "**< polyfit** (by > 0.5 digit)"
            cert = _fmt(entry["cert_digits"]) if "cert_digits" in entry else ""
            lines.append(f"| {result['case']} | {entry['method']} | {entry['dtype']} | "
                         f"{_fmt(entry['coef_digits'])} | {_fmt(entry['curve_digits'])} | "
                         f"{cert} | {_status_text(entry['status'])} | {verdict} |")
    out = ["\n".join(lines), ""]
    nist = [r for r in report["cases"] if "source" in r]
    if nist:
        out.append("NIST data and the exact oracle (digits of the oracle, computed from the "
                   "float64 data, against NIST's certified coefficients / standard "
                   "deviations):")
        out.append("")
        for r in nist:
            se = r["oracle_stderr_cert_digits"]
            se = _fmt(se) if se is not None else (
                f"certified 0, the float64 data give at most {r['oracle_max_stderr']:.1e}")
            out.append(f"* {r['case']}: {_fmt(r['oracle_cert_digits'])} / {se}. "
                       f"Source: {r['source']}.")
        out.append("")
    check = report.get("compiled")
    if check:
        out.append(f"Compiled float32 exact (compile=True) on `{check['case']}` tiled to "
                   f"{check['series']:,} series x {check['points']} points "
                   f"({check['kernels_compiled']} kernel(s) compiled, {check['seconds']:.1f} s "
                   f"incl. compilation): {_fmt(check['digits_vs_eager'])} digits of agreement "
                   f"with eager, statuses {'identical' if check['same_status'] else 'DIFFER'}; "
                   f"coef digits {_fmt(check['coef_digits'])}, curve digits "
                   f"{_fmt(check['curve_digits'])}, float32 verdict "
                   f"{'OK' if check['f32_ok'] else 'FAIL'}.")
        out.append("")
    failed = [f"{r['case']}: {aim}" for r in report["cases"]
              for aim, ok in r["aims"].items() if not ok]
    out.append("Aims missed: " + ("; ".join(failed) if failed else "none") + ".")
    return "\n".join(out) + "\n"


def _environment(device: str) -> dict:
    import torch

    import batchfit

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"batchfit": batchfit.__version__, "commit": commit, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "device": device,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _plain(value):
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--device", default="cpu", help="batchfit's device [cpu]")
    parser.add_argument("--series", type=int, default=8, help="series per synthetic case [8]")
    parser.add_argument("--skip-compile", action="store_true",
                        help="skip the compiled float32 run")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    chosen = methods(args.device)
    report = {"environment": _environment(args.device), "cases": [],
              "criteria": {"cap_digits": CAP, "f32_stderr_ratio": F32_STDERR_RATIO,
                           "exact_data_digits": EXACT_DATA_DIGITS, "noise": NOISE}}
    cases = build_cases(series=args.series)
    compile_case = next(c for c in cases if c.name == "timestamps x = 1e+06 + [0, 100]")
    for case in cases:
        t0 = time.perf_counter()
        refs = oracles(case)
        result = run_case(case, chosen, refs)
        report["cases"].append(result)
        print(f"{case.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if case is compile_case and not args.skip_compile:
            eager = chosen["exact32"][2](case)
            report["compiled"] = compiled_check(case, refs, eager, args.device)
    report["seconds"] = time.perf_counter() - start
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(_plain(report), indent=1, allow_nan=False)
                                   + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
