"""The names every layer shares, defined once: solvers, losses, models and their parameter
and column names, statuses. Importing this (like ``options`` and ``io``) never imports torch,
so the MSE job (``job``'s aggregation path) starts without it."""

from __future__ import annotations

from enum import IntEnum

SOLVERS = ("auto", "exact", "newton", "gd", "adam")
RESIDUAL_LOSSES = ("mse", "huber", "soft_l1", "cauchy", "arctan")  # functions of y - pred
LIKELIHOOD_LOSSES = ("poisson",)  # deviances of (pred, y): counts, nonlinear models only
BUILTIN_LOSSES = RESIDUAL_LOSSES + LIKELIHOOD_LOSSES
LOSS_ALIASES = {"linear": "mse"}  # scipy's name of the plain squared error
MAX_DEGREE = 10
# The built-in nonlinear families and their parameters, in order (models.FAMILIES has their
# functions and starting values).
FAMILY_PARAMS = {
    "exp": ("a", "b", "c"),
    "gauss": ("a", "mu", "sigma", "c"),
    "logistic": ("L", "k", "x0", "c"),
    "power": ("a", "b", "c"),
    "hill4": ("bottom", "top", "log_ec50", "slope"),
    "biexp": ("a1", "tau1", "a2", "tau2", "c"),
    "lorentz": ("a", "x0", "gamma", "c"),
    "pvoigt": ("a", "x0", "w", "eta", "c"),
    "gauss2d": ("amplitude", "x0", "y0", "sigma", "offset"),
}
# The families whose x has several columns (x of shape (..., N, d)); every other family and
# the polynomial take one.
FAMILY_X_COLUMNS = {"gauss2d": 2}
MODELS = ("poly", *FAMILY_PARAMS)
# what a formula model (``--model "a*exp(-x/tau) + c"``) may call
FORMULA_FUNCTIONS = ("exp", "log", "sqrt", "sin", "cos", "tanh", "abs", "erf")
FORMULAS = {"poly": "sum_i p_i x^i", "exp": "a*exp(-b*x) + c",
            "gauss": "a*exp(-(x-mu)^2/(2*sigma^2)) + c",
            "logistic": "L/(1+exp(-k*(x-x0))) + c", "power": "a*x^b + c (x > 0)"}
FORMULAS.update({
    "hill4": "bottom + (top-bottom)/(1+10^((log_ec50-log10(x))*slope)) (x > 0, bottom <= top)",
    "biexp": "a1*exp(-x/tau1) + a2*exp(-x/tau2) + c (tau1 <= tau2)",
    "lorentz": "a*gamma^2/((x-x0)^2+gamma^2) + c (gamma > 0: half width at half maximum)",
    "pvoigt": "a*(eta/(1+4((x-x0)/w)^2) + (1-eta)*exp(-4 ln2 ((x-x0)/w)^2)) + c "
              "(w > 0: full width at half maximum, 0 <= eta <= 1)",
    "gauss2d": "amplitude*exp(-((u-x0)^2+(v-y0)^2)/(2*sigma^2)) + offset at points x = (u, v) "
               "(sigma > 0; Gpufit's GAUSS_2D)",
})
# Columns a family adds after its coefficients' stderr, computed from the fit (hill4: the
# IC50 and its 95 % confidence interval, see models.Model.derived).
DERIVED_COLUMNS = {"hill4": ("ic50", "ic50_low", "ic50_high")}
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")


def poly_names(degree: int) -> tuple[str, ...]:
    """The coefficients of the polynomial of ``degree``, highest power first (the seed's and
    ``numpy.polyfit``'s order): a, b, c for the quadratic, else pD .. p1, p0 (``pK``
    multiplies x^K)."""
    if degree == 2:
        return ("a", "b", "c")
    return tuple(f"p{power}" for power in range(degree, -1, -1))


def poly_columns(degree: int) -> tuple[tuple[str, int], ...]:
    """(output column, parameter index) of the polynomial of ``degree``; the column at index
    i multiplies x^(degree - i)."""
    return tuple((name, i) for i, name in enumerate(poly_names(degree)))


def family_columns(name: str) -> tuple[tuple[str, int], ...]:
    return tuple((param, i) for i, param in enumerate(FAMILY_PARAMS[name]))


class Status(IntEnum):
    """Per-series outcome. A failure is data, not an exception."""

    OK = 0
    TOO_FEW_POINTS = 1  # fewer usable points than coefficients
    SINGULAR = 2  # x does not have enough distinct values for the degree
    NOT_CONVERGED = 3  # an iterative solver stopped before meeting tol
    DIVERGED = 4  # non-finite values, or the loss grew
    # |y| or the weights beyond what an iterative solver's unscaled float64 holds (the exact
    # MSE solver scales each series itself)
    OUT_OF_RANGE = 5

    @property
    def label(self) -> str:
        return self.name.lower()


STATUS_LABELS = tuple(s.label for s in Status)
