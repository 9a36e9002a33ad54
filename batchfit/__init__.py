"""batchfit: fit very many independent curves at once, on the GPU when there is one."""

from .engine import fit
from .losses import BUILTIN_LOSSES
from .problem import FitResult, History, Status
from .solvers import SOLVERS

__version__ = "0.1.0"
__all__ = ["BUILTIN_LOSSES", "SOLVERS", "FitResult", "History", "Status", "__version__", "fit"]
