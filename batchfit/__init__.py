"""batchfit: fit very many independent curves at once, on the GPU when there is one."""

__version__ = "0.1.0"

from .engine import fit, fit_ragged
from .job import JobSummary, fit_table, run_job
from .losses import BUILTIN_LOSSES
from .problem import FitResult, History, Status
from .solvers import SOLVERS

__all__ = ["BUILTIN_LOSSES", "SOLVERS", "FitResult", "History", "JobSummary", "Status",
           "__version__", "fit", "fit_ragged", "fit_table", "run_job"]
