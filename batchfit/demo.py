"""The seed's story at batch scale: 10,000 noisy copies of 20x^2 + 5x - 3, fitted two ways.

``run_demo`` returns numbers; the CLI prints them. Generation is deterministic (seeded).
"""

from __future__ import annotations

import time

import numpy as np

from .engine import fit

TRUTH = {"a": 20.0, "b": 5.0, "c": -3.0}  # the seed's y = 20x^2 + 5x - 3


def seed_dataset(n_series: int = 10_000, points: int = 100, noise: float = 1.0, seed: int = 0):
    """x uniform in [0, 1] (as in the seed), y = 20x^2 + 5x - 3 + N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n_series, points)).astype(np.float32)
    y = TRUTH["a"] * x**2 + TRUTH["b"] * x + TRUTH["c"] + rng.normal(0, noise, x.shape)
    return x, y.astype(np.float32)


def run_demo(n_series: int = 10_000, points: int = 100, seed: int = 0) -> dict:
    """Fit the seed dataset with the exact solver and with the seed's GD protocol."""
    x, y = seed_dataset(n_series, points, seed=seed)
    truth = np.array([TRUTH["c"], TRUTH["b"], TRUTH["a"]])
    report = {"n_series": n_series, "points": points, "solvers": {}}
    for label, kwargs in [("exact", {"solver": "exact"}),
                          ("gd (seed: lr 1e-3, 15000 epochs)", {"solver": "gd"})]:
        start = time.perf_counter()
        result = fit(x, y, **kwargs)
        seconds = time.perf_counter() - start
        error = np.abs(result.params.cpu().numpy() - truth)
        report["solvers"][label] = {
            "seconds": seconds,
            "median_abs_error": dict(zip("cba", np.nanmedian(error, axis=0))),
            "median_params": dict(zip("cba", np.nanmedian(result.params.cpu().numpy(), axis=0))),
            "statuses": result.status_counts(),
            "result": result,
        }
    return report
