"""batchfit: fit very many independent curves at once, on the GPU when there is one."""

__version__ = "0.1.0"

from .engine import fit, fit_ragged  # noqa: E402
from .job import JobSummary, fit_table, run_job  # noqa: E402
from .losses import BUILTIN_LOSSES  # noqa: E402
from .problem import FitResult, History, Status  # noqa: E402
from .solvers import SOLVERS  # noqa: E402

__all__ = ["BUILTIN_LOSSES", "SOLVERS", "FitResult", "History", "JobSummary", "Status",
           "__version__", "fit", "fit_ragged", "fit_table", "run_job"]
