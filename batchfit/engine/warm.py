"""``batchfit warmup``: build ahead what batchfit compiles for this machine."""

from __future__ import annotations

import time

import numpy as np
import torch

from batchfit.core.options import resolve
from batchfit.engine.ahead import building_all
from batchfit.engine.front import config, fit
from batchfit.engine.policy import Vectorizer
from batchfit.fitting.data import (
    make_problem,
)
from batchfit.fitting.solvers import (
    refit_exact,
)
from batchfit.moments import native


def warmup(losses=("huber",), dtypes=("float32",), degree: int = 2) -> list[str]:
    """Build, once for this machine, what batchfit compiles (and check the native kernel
    that the install built): the ahead-of-time kernels of robust polynomial fits for ``losses`` in ``dtypes`` (shaped as
    ``batchfit run`` and ``fit`` call them) and of the exact solver's refinement step. What
    is built already is only loaded. Returns what was done, a line each."""
    done = []
    start = time.perf_counter()
    if native.library() is None:
        done.append("native kernel: unusable (see the warning above); the torch twin does the sums")
    else:
        done.append(f"native kernel: ready ({time.perf_counter() - start:.1f} s)")
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 1.0, 64)
    y = 20 * x**2 + 5 * x - 3 + rng.normal(0, 1, (256, 64))
    with building_all():
        for loss in losses:
            for dtype in dtypes:
                begun = time.perf_counter()
                for xs in (np.tile(x, (256, 1)).astype(dtype), x):  # a job's, numpy's
                    fit(xs, y.astype(dtype), loss=loss, degree=degree, dtype=dtype)
                done.append(f"{loss} ({dtype}): ready ({time.perf_counter() - begun:.0f} s)")
        begun = time.perf_counter()
        cfg = config(resolve(degree=degree))
        problem = make_problem(x, y, dtype=torch.float64, device=torch.device("cpu"))
        refit_exact(problem, cfg, Vectorizer("auto", fullgraph=True))
        done.append(f"exact refinement: ready ({time.perf_counter() - begun:.0f} s)")
    return done
