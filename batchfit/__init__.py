"""batchfit: fit very many independent curves at once, on the GPU when there is one.

Importing batchfit imports nothing heavy: each name below is loaded on first use, torch
(``fit``, ``fit_ragged``, ``FitResult``, ``History``) only where it is needed, so that the
MSE job, which needs only the native kernel and pyarrow, starts in a fraction of a second,
and the command handles signals before numpy and pyarrow load (``batchfit.core.interrupts``).
"""

import os

# OpenMP threads that finish their work sleep instead of spinning (libgomp reads this when
# torch loads it): spinning threads steal the CPUs of other processes on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from batchfit._version import __version__


def __getattr__(name):
    """The public names, imported on first use."""
    if name in ("JobSummary", "fit_table", "run_job"):
        from batchfit.pipeline import job as module
    elif name in ("BUILTIN_LOSSES", "SOLVERS", "Status"):
        from batchfit.core import names as module
    elif name in ("fit", "fit_ragged"):
        from batchfit import engine as module
    elif name in ("FitResult", "History"):
        from batchfit.fitting import data as module
    elif name == "predict":
        from batchfit.fitting import prediction as module
    else:
        raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value


__all__ = ["BUILTIN_LOSSES", "SOLVERS", "FitResult", "History", "JobSummary", "Status",
           "__version__", "fit", "fit_ragged", "fit_table", "predict", "run_job"]
