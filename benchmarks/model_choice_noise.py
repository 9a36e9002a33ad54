"""Model choice by AICc on pure noise: how often each candidate wins when the truth is a
constant, ``y = c + noise``.

    python benchmarks/model_choice_noise.py [--series 1000] [--points 20,50] [--seed 0]
                                            [--json benchmarks/results-model-choice-noise.json]

Two candidate sets: nested polynomials ``poly0,poly1,poly2`` (the exact solver), and
``poly0,exp,logistic`` (Levenberg-Marquardt for the curves, from their data-driven starts).
x is evenly spaced on [0, 5]; noise N(0, 1) around c = 3, float64. A table of the share of
series per chosen candidate, and of the series whose every candidate failed.
"""

import argparse
import json
import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np

import batchfit

SETS = (("poly0", "poly1", "poly2"), ("poly0", "exp", "logistic"))


def shares(series: int, points: int, candidates, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 5, points)
    y = 3 + rng.normal(size=(series, points))
    result = batchfit.fit(x, y, model=list(candidates), dtype="float64")
    counts = {name: float((result.model == name).mean()) for name in candidates}
    return {"points": points, "series": series, "candidates": ",".join(candidates),
            **counts, "not_ok": float((result.status_labels() != "ok").mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--points", default="20,50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [shares(args.series, int(points), candidates, args.seed)
            for candidates in SETS for points in args.points.split(",")]
    for row in rows:
        names = row["candidates"].split(",")
        wins = "  ".join(f"{name} {100 * row[name]:5.1f} %" for name in names)
        print(f"n={row['points']:3d}  {row['series']} series  {wins}  "
              f"(not ok {100 * row['not_ok']:.1f} %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
