"""The seed's story at batch scale, on built-in defaults: generate -> run -> plot.

10,000 noisy series like the seed's 20x^2 + 5x - 3 (each with its own coefficients drawn
around those), fitted with the exact solver and with the seed's gradient-descent protocol
(lr 1e-3, 15,000 epochs, random start), with the history and pictures of the latter.
``run_demo`` returns numbers; the CLI prints them.
"""

from __future__ import annotations

import os

import numpy as np

from batchfit import io
from batchfit.app.generate import generate, truth_path
from batchfit.pipeline.job import run_job

TRACKED = 9  # series drawn before and after training


def _accuracy(coefficients_path: str, truth: str) -> dict:
    fitted, _ = io.read_coefficients(coefficients_path)
    true = io.read_parquet(truth)
    return {name: float(np.nanmedian(np.abs(
        fitted[name].to_numpy(zero_copy_only=False).astype(float) - true[name].to_numpy())))
        for name in ("a", "b", "c")}


def run_demo(out_dir: str = "batchfit-demo", n_series: int = 10_000, points: int = 100,
             seed: int = 0) -> dict:
    """Write data, truth, coefficients of both solvers, GD's history and the plots into
    ``out_dir``; return times, accuracy against the truth and statuses."""
    from batchfit.app.plots import plot_all

    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "data.parquet")
    generate(data, series=n_series, points=points, seed=seed)
    runs = {"exact": dict(solver="exact"),
            "gd (seed: lr 1e-3, 15,000 epochs)": dict(solver="gd")}
    report = {"dir": out_dir, "n_series": n_series, "points": points, "solvers": {}}
    outputs = {}
    for label, options in runs.items():
        name = options["solver"]
        outputs[name] = os.path.join(out_dir, f"{name}.coeffs.parquet")
        history = os.path.join(out_dir, "gd.history.parquet") if name == "gd" else None
        summary = run_job(data, outputs[name], history_path=history, track=TRACKED, **options)
        report["solvers"][label] = {
            "seconds": summary.seconds, "series_per_second": summary.series_per_second,
            "statuses": summary.status_counts,
            "median_abs_error": _accuracy(outputs[name], truth_path(data))}
    pictures = plot_all(data, outputs["gd"], out_dir,
                        history_path=os.path.join(out_dir, "gd.history.parquet"),
                        truth_path=truth_path(data), reference_path=outputs["exact"])
    report["files"] = sorted(os.listdir(out_dir))
    report["pictures"] = pictures
    return report
