"""batchfit: fit very many independent curves at once, on the GPU when there is one.

Importing batchfit does not import torch: the torch-based API (``fit``, ``fit_ragged``,
``FitResult``, ``History``) loads it on first use, so that the MSE job, which needs only
the native kernel and pyarrow, starts in a fraction of a second.
"""

import os

# OpenMP threads that finish their work sleep instead of spinning (libgomp reads this when
# torch loads it): spinning threads steal the CPUs of other processes on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

from .job import JobSummary, fit_table, run_job
from .names import BUILTIN_LOSSES, SOLVERS, Status


def __getattr__(name):
    """The torch-based names, imported on first use."""
    if name in ("fit", "fit_ragged"):
        from . import engine as module
    elif name in ("FitResult", "History"):
        from . import problem as module
    elif name == "predict":
        from . import prediction as module
    else:
        raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value


__all__ = ["BUILTIN_LOSSES", "SOLVERS", "FitResult", "History", "JobSummary", "Status",
           "__version__", "fit", "fit_ragged", "fit_table", "predict", "run_job"]
