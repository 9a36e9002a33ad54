"""Hard nonlinear least squares: batchfit's Levenberg-Marquardt next to MINPACK's (scipy).

    python benchmarks/hard_problems.py [--markdown docs/hard-problems.md] [--copies 1000]

The problems are NIST's StRD nonlinear regression set: certified least-squares solutions with
standard starting points. The data files in ``benchmarks/data/nist`` are NIST's (public domain, Statistical Reference
Datasets, https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml). Each gives data, two
starting points (start 2 is nearer the answer) and certified parameters to 11 digits. The
models below are written from the formula in each file's header. Nelson (two predictors)
is left out: a batchfit series has one x.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "nist")
SOLVED_DIGITS = 4  # NIST's usual bar: 4 correct digits is a solution
MAX_DIGITS = 10  # the certified values have 11 digits, so their rounding alone is up to 5e-11
TWO_PI = 2 * math.pi


def _exp_decays(x, b):  # Lanczos: three exponentials
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(x, b):  # exponential baseline plus two Gaussian peaks
    return (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-(x - b[3]) ** 2 / b[4] ** 2)
            + b[5] * torch.exp(-(x - b[6]) ** 2 / b[7] ** 2))


def _chwirut(x, b):
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _rational33(x, b):  # Hahn1, Thurber: cubic over cubic
    return ((b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3)
            / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3))


def _misra1a(x, b):  # also BoxBOD
    return b[0] * (1 - torch.exp(-b[1] * x))


MODELS = {
    "Misra1a": _misra1a,
    "Chwirut2": _chwirut,
    "Chwirut1": _chwirut,
    "Lanczos3": _exp_decays,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "DanWood": lambda x, b: b[0] * x ** b[1],
    "Misra1b": lambda x, b: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Kirby2": lambda x, b: (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2),
    "Hahn1": _rational33,
    "MGH17": lambda x, b: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Lanczos1": _exp_decays,
    "Lanczos2": _exp_decays,
    "Gauss3": _gauss,
    "Misra1c": lambda x, b: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda x, b: b[0] * b[1] * x / (1 + b[1] * x),
    "Roszman1": lambda x, b: b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / math.pi,
    "ENSO": lambda x, b: (b[0] + b[1] * torch.cos(TWO_PI * x / 12)
                          + b[2] * torch.sin(TWO_PI * x / 12)
                          + b[4] * torch.cos(TWO_PI * x / b[3])
                          + b[5] * torch.sin(TWO_PI * x / b[3])
                          + b[7] * torch.cos(TWO_PI * x / b[6])
                          + b[8] * torch.sin(TWO_PI * x / b[6])),
    "MGH09": lambda x, b: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
    "Thurber": _rational33,
    "BoxBOD": _misra1a,
    "Rat42": lambda x, b: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda x, b: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda x, b: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda x, b: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
    "Bennett5": lambda x, b: b[0] * (b[1] + x) ** (-1 / b[2]),
}


@dataclass(frozen=True)
class Problem:
    name: str
    x: np.ndarray
    y: np.ndarray
    starts: tuple[np.ndarray, np.ndarray]
    certified: np.ndarray
    certified_sse: float

    def f(self, x, b):
        return MODELS[self.name](x, b)


def load(name: str) -> Problem:
    with open(os.path.join(DATA, f"{name}.dat")) as f:
        lines = f.read().splitlines()
    starts, certified, data, sse = [], [], [], None
    in_data = False
    for line in lines:
        words = line.split()
        if in_data and len(words) >= 2:
            data.append([float(v) for v in words[:2]])
        elif words[:1] and words[0].startswith("b") and len(words) >= 5 and words[1] == "=":
            starts.append([float(words[2]), float(words[3])])
            certified.append(float(words[4]))
        elif line.startswith("Residual Sum of Squares:"):
            sse = float(words[-1])
        elif line.startswith("Data:") and words[1:3] == ["y", "x"]:
            in_data = True
    table, begin = np.array(data), np.array(starts)
    return Problem(name, table[:, 1], table[:, 0], (begin[:, 0], begin[:, 1]),
                   np.array(certified), sse)


def digits(found, certified) -> float:
    """NIST's log relative error: the fewest correct digits over the parameters, at most
    ``MAX_DIGITS`` (agreement beyond the certified values' own rounding is not resolved)."""
    found = np.asarray(found, dtype=np.float64)
    if not np.isfinite(found).all():
        return 0.0
    error = np.abs(found - certified) / np.abs(certified)
    return float(np.clip(-np.log10(np.maximum(error, 1e-300)), 0, MAX_DIGITS).min())


PROBLEMS = tuple(MODELS)


@dataclass(frozen=True)
class Outcome:
    status: str  # batchfit's status; for scipy "ok" when it reports success
    digits: float
    evaluations: int  # batchfit: iterations; scipy: function evaluations
    params: np.ndarray

    @property
    def solved(self) -> bool:
        return self.status == "ok" and self.digits >= SOLVED_DIGITS


def batchfit_fits(problem: Problem, **options) -> list[Outcome]:
    """batchfit from both standard starts, in one call (two series), float64."""
    import batchfit

    x = np.broadcast_to(problem.x, (2, len(problem.x)))
    y = np.broadcast_to(problem.y, (2, len(problem.y)))
    fit = batchfit.fit(x, y, model=problem.f, p0=np.stack(problem.starts), solver="newton",
                       dtype="float64", **{"compile": False, **options})
    labels = fit.status_labels()
    return [Outcome(str(labels[i]), digits(fit.params[i].numpy(), problem.certified),
                    int(fit.iterations[i]), fit.params[i].numpy()) for i in range(2)]


def scipy_fit(problem: Problem, start) -> Outcome:
    """``scipy.optimize.least_squares(method="lm")`` (MINPACK's lmder) with its defaults."""
    import warnings

    from scipy.optimize import least_squares

    x, y = torch.from_numpy(problem.x), problem.y

    def residuals(b):
        return problem.f(x, torch.from_numpy(b)).numpy() - y

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = least_squares(residuals, start, method="lm")
        except (ValueError, np.linalg.LinAlgError):
            return Outcome("failed", 0.0, 0, np.full(len(start), np.nan))
    return Outcome("ok" if found.success else "failed", digits(found.x, problem.certified),
                   int(found.nfev), found.x)


def compare(names=PROBLEMS) -> list[dict]:
    """One row per problem and start: batchfit's and scipy's outcome."""
    rows = []
    for name in names:
        problem = load(name)
        ours = batchfit_fits(problem)
        for start in (1, 2):
            rows.append({"problem": name, "start": start, "batchfit": ours[start - 1],
                         "scipy": scipy_fit(problem, problem.starts[start - 1])})
    return rows


BATCHED = ("Misra1a", "Chwirut2", "BoxBOD", "Eckerle4", "Rat43")


def noisy_copies(problem: Problem, copies: int, seed: int = 0):
    """``copies`` series of the certified curve plus normal noise of the certified residual
    standard deviation, on the problem's x."""
    rng = np.random.default_rng(seed)
    truth = problem.f(torch.from_numpy(problem.x), torch.from_numpy(problem.certified)).numpy()
    sigma = np.sqrt(problem.certified_sse / (len(problem.x) - len(problem.certified)))
    y = truth + rng.normal(0, sigma, (copies, len(problem.x)))
    return np.broadcast_to(problem.x, y.shape), y


def batched(name: str, copies: int = 1000, start: int = 1, restarts: int = 0) -> dict:
    """``copies`` noisy copies of one problem in one call, from a standard start: how many
    are ``ok``, and how many of those are at the least-squares optimum near the truth (scipy
    started at the certified values): a sum of squares within 1e-6 of its, or lower; and of
    the others, how many are in fact at that optimum (a status that undersells)."""
    import batchfit

    problem = load(name)
    x, y = noisy_copies(problem, copies)
    fit = batchfit.fit(x, y, model=problem.f, p0=problem.starts[start - 1], solver="newton",
                       dtype="float64", restarts=restarts, compile=False)
    labels = fit.status_labels()
    near = np.zeros(copies, bool)
    x_t = torch.from_numpy(problem.x)
    for i in range(copies):
        optimum = scipy_fit(Problem(name, problem.x, y[i], problem.starts, problem.certified,
                                    problem.certified_sse), problem.certified)
        best = ((problem.f(x_t, torch.from_numpy(optimum.params)).numpy() - y[i]) ** 2).sum()
        found = ((problem.f(x_t, fit.params[i]).numpy() - y[i]) ** 2).sum()
        near[i] = found <= best * (1 + 1e-6)
    ok = labels == "ok"
    return {"problem": name, "start": start, "copies": copies, "restarts": restarts,
            "ok": int(ok.sum()), "ok_near": int((ok & near).sum()),
            "ok_far": int((ok & ~near).sum()), "other_near": int((~ok & near).sum()),
            "statuses": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}}


def markdown(rows: list[dict], batches: list[dict]) -> str:
    solved = {who: sum(row[who].solved for row in rows) for who in ("batchfit", "scipy")}
    lines = [
        "# Hard nonlinear least squares: batchfit next to MINPACK",
        "",
        ("`python benchmarks/hard_problems.py --markdown docs/hard-problems.md` "
        "(`tests/test_hard_problems.py` checks the same aims)."),
        "",
        ("NIST StRD nonlinear regression problems (certified solutions to 11 digits; "
        "Nelson left out: two predictors), each from both of NIST's starting points "
        "(start 1 far, start 2 near), float64. batchfit: `fit(..., model=f, p0=start, "
        "solver=\"newton\")` with its defaults (both starts in one call); scipy: "
        "`least_squares(method=\"lm\")` (MINPACK's lmder) with its defaults. digits: "
        "the fewest correct digits over the parameters against the certified values "
        f"(NIST's LRE, capped at {MAX_DIGITS}); solved: reported success with at least "
        f"{SOLVED_DIGITS} digits. evals: batchfit's iterations until its convergence test "
        "passed (one Jacobian and two model evaluations each; a few undamped polishing steps "
        "follow), scipy's function evaluations."),
        "",
        (f"Solved: batchfit {solved['batchfit']} of {len(rows)}, scipy {solved['scipy']} "
        f"of {len(rows)}."),
        "",
        ("| problem | start | batchfit status | batchfit digits | evals | scipy | scipy digits "
        "| evals |"),
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        ours, theirs = row["batchfit"], row["scipy"]
        lines.append(f"| {row['problem']} | {row['start']} | {ours.status} | {ours.digits:.1f} "
                     f"| {ours.evaluations} | {'success' if theirs.status == 'ok' else 'failed'}"
                     f" | {theirs.digits:.1f} | {theirs.evaluations} |")
    if batches:
        lines += ["", "## 1,000 noisy copies in one call", "",
                  ("Each problem's certified curve plus normal noise of its certified residual "
                  "standard deviation, 1,000 series in one `fit` call from NIST's far start "
                  "(start 1). near: at that series' least-squares optimum (a sum of "
                  "squares within 1e-6 of, or below, scipy's started at the certified "
                  "values)."), "",
                  ("| problem | restarts | ok | ok and near | ok but far | not ok but near "
                  "| statuses |"), "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for b in batches:
            statuses = ", ".join(f"{k} {v}" for k, v in b["statuses"].items())
            lines.append(f"| {b['problem']} | {b['restarts']} | {b['ok']} | {b['ok_near']} "
                         f"| {b['ok_far']} | {b['other_near']} | {statuses} |")
    lines += ["", "## Reading it", "",
              ("* scipy's `success` is MINPACK's tolerance tests passing, not a minimum found: "
              "on BoxBOD from start 1 it stops after 3 evaluations with 0 correct digits and "
              "says success; on Hahn1 it stops with 2 digits (xtol met while still far). "
              "batchfit's `ok` is the Newton-decrement test at the point it returns."),
              ("* batchfit's one miss, MGH10 from start 1 (Meyer's function, parameters "
              "spanning 6 decades), crawls along the valley floor and stops `not_converged` "
              "at its iteration cap; MINPACK's trust region gets through in 280 evaluations."),
              ("* In the noisy copies, Eckerle4's far start (the peak's centre 10 % off, its "
              "width 2.4x) leaves some fits `ok` on a plateau where the peak has moved out "
              "of the data (sums of squares 275-1,230 times the optimum's): the decrement "
              "test cannot tell a plateau from a minimum. Restarts recover most of them. "
              "Rat43's `not_converged` fits sit at the optimum of a very flat valley "
              "(statuses that undersell, never the reverse).")]
    return "\n".join(lines) + "\n"


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown")
    parser.add_argument("--copies", type=int, default=1000)
    args = parser.parse_args()
    rows = compare()
    batches = [batched(name, args.copies, restarts=restarts) for name in BATCHED
               for restarts in (0, 4)] if args.copies else []
    text = markdown(rows, batches)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
