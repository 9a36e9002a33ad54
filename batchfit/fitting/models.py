"""The models: the polynomial family (in a basis that stays well conditioned), the built-in
nonlinear families, and users' ``f(x, params)``.

Inside batchfit every series is fitted in its own frame ``t = (x - centre) / half``, which maps
the series' x range onto [-1, 1], in the Chebyshev basis ``T_j(t)``. Two facts make this pay:

* ``T_i * T_j = (T_{i+j} + T_{|i-j|}) / 2``, so the weighted Gram matrix of the basis comes from
  the 2*degree + 1 sums ``sum w T_m(t)`` with positive coefficients only (no cancellation), just
  as the monomial Gram matrix comes from power sums; the sums add up across chunks;
* on [-1, 1] the Chebyshev Gram matrix is close to diagonal, so the small per-series solve loses
  few digits even at degree 6 (monomials there lose several).

Users see coefficients of ``x**i`` in the units of the input; ``to_raw_map`` and
``from_raw_map`` convert, per series, in float64 because with offset x (timestamps) that map is
ill-conditioned and float32 would ruin it.

All functions here work on ONE series (see linalg.py for the tuple layout) and are vmapped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import comb
from typing import NamedTuple

import numpy as np
import torch

from batchfit.core.keys import fingerprint
from batchfit.core.names import FAMILY_PARAMS, FORMULAS, MAX_DEGREE, poly_columns, poly_names  # noqa: F401
from batchfit.fitting.linalg import Mat, Vec, mat_mat, mat_vec
from batchfit.moments.layout import cheb_to_mono


class Sums(NamedTuple):
    """What one pass over a series leaves behind: its frame and its weighted sums.

    Everything an MSE fit needs (solution, loss at any parameters, gradient, Hessian) follows
    from these O(k^2) numbers, so iterative MSE solvers never touch the points again.
    """

    centre: torch.Tensor  # working dtype; t = (x - centre) / half
    half: torch.Tensor
    centre_raw: torch.Tensor  # float64 centre in the units of the input x (adds x_offset)
    gram: Mat  # sum w T_i(t) T_j(t)
    rhs: Vec  # sum w T_j(t) y
    wsum: torch.Tensor  # sum w
    n: torch.Tensor  # number of points used (int64)
    ybar: torch.Tensor  # weighted mean of y


def chebyshev_terms(t: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """``[T_0(t), ..., T_degree(t)]``, kept as a list so sums over them fuse into one pass."""
    terms = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        terms.append(2 * t * terms[-1] - terms[-2])
    return terms[: degree + 1]


def chebyshev_eval(t: torch.Tensor, q: Vec) -> torch.Tensor:
    """``sum_j q_j T_j(t)`` for one series."""
    return sum(qj * tj for qj, tj in zip(q, chebyshev_terms(t, len(q) - 1)))


def gram_from_sums(cheb_sums, k: int) -> Mat:
    """``sum w T_i T_j`` from the 2k - 1 sums ``sum w T_m``."""
    return tuple(tuple((cheb_sums[i + j] + cheb_sums[abs(i - j)]) / 2 for j in range(k))
                 for i in range(k))


# Plain nested tuples of floats, made once at import, so torch.compile sees constants.
MAX_TERMS = MAX_DEGREE + 1
_CHEB_TO_MONO = {k: tuple(map(tuple, cheb_to_mono(k).tolist()))
                 for k in range(1, MAX_TERMS + 1)}
_MONO_TO_CHEB = {k: tuple(map(tuple, np.linalg.inv(cheb_to_mono(k)).tolist()))
                 for k in range(1, MAX_TERMS + 1)}


def _frame(centre, half):
    return centre.to(torch.float64), half.to(torch.float64)


def to_raw_map(centre_raw: torch.Tensor, half: torch.Tensor, k: int) -> Mat:
    """Float64 matrix M with raw coefficients ``p = M q``.

    ``q`` are Chebyshev coefficients in t = (x - centre) / half; ``p_i`` multiplies ``x**i``.
    """
    centre, half = _frame(centre_raw, half)
    zero = torch.zeros_like(centre)
    # t**j = (x - centre)**j / half**j, expanded in powers of x.
    shift = tuple(tuple(comb(j, i) * (-centre) ** (j - i) / half**j if j >= i else zero
                        for j in range(k)) for i in range(k))
    return mat_mat(shift, _CHEB_TO_MONO[k])


def from_raw_map(centre_raw: torch.Tensor, half: torch.Tensor, k: int) -> Mat:
    """Float64 matrix A with ``q = A p``: the inverse of ``to_raw_map``."""
    centre, half = _frame(centre_raw, half)
    zero = torch.zeros_like(centre)
    # x**i = (centre + half t)**i, expanded in powers of t.
    shift = tuple(tuple(comb(i, j) * centre ** (i - j) * half**j if i >= j else zero
                        for i in range(k)) for j in range(k))
    return mat_mat(_MONO_TO_CHEB[k], shift)


def monomial_coefficients(q: Vec) -> Vec:
    """The monomial coefficients in t (lowest power first, float64) of Chebyshev ``q``: a
    fit in its own frame, which evaluates accurately however far x lies from 0."""
    return mat_vec(_CHEB_TO_MONO[len(q)], tuple(qj.to(torch.float64) for qj in q))


def in_user_order(model, params):
    """Coefficients as users see them. The polynomial is computed lowest power first (index
    = power) and shown highest power first, the seed's and numpy.polyfit's order: reversed
    along the last axis (a tuple, tensor or array; the map is its own inverse). Other models
    keep their order."""
    if model is not None and not model.is_poly:
        return params
    if isinstance(params, tuple):
        return params[::-1]
    return params.flip(-1) if isinstance(params, torch.Tensor) else params[..., ::-1]


def scaled_x(x: torch.Tensor, w: torch.Tensor, centre, half) -> torch.Tensor:
    return torch.where(w > 0, (x - centre) * (1 / half), 0)  # one division per series


def prepare(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, x_offset, degree: int):
    """One series' frame and sums; returns ``(sums, t)``.

    ``x``, ``y``, ``w`` are one series with unused points at weight 0 (and finite values).
    The frame maps the used x range onto [-1, 1]; a series with one distinct x gets half = 1,
    so its Gram matrix is singular and the solve flags it.
    """
    k = degree + 1
    used = w > 0
    lo = torch.where(used, x, torch.inf).amin()
    hi = torch.where(used, x, -torch.inf).amax()
    centre = torch.where(used.any(), (lo + hi) / 2, 0)
    half = torch.where(hi > lo, (hi - lo) / 2, 1)
    t = scaled_x(x, w, centre, half)
    terms = chebyshev_terms(t, 2 * degree)
    cheb_sums = [(w * tm).sum() for tm in terms]
    rhs = tuple((w * y * tm).sum() for tm in terms[:k])
    wsum = cheb_sums[0]
    centre_raw = centre.to(torch.float64)
    if x_offset is not None:
        centre_raw = centre_raw + x_offset
    sums = Sums(centre=centre, half=half, centre_raw=centre_raw,
                gram=gram_from_sums(cheb_sums, k), rhs=rhs, wsum=wsum, n=used.sum(),
                ybar=torch.where(wsum > 0, rhs[0] / wsum, 0))
    return sums, t


def total_squares(y: torch.Tensor, w: torch.Tensor, ybar) -> torch.Tensor:
    """``sum w (y - ybar)^2``: the spread r2 is measured against."""
    return (w * (y - ybar) ** 2).sum()


# ---------------------------------------------------------------- any model f(x, params)

@dataclass(frozen=True)
class Model:
    """What is fitted to every series: the polynomial family, a built-in nonlinear family,
    or a user's ``f(x, params)``.

    ``f`` works on ONE series, exactly like the seed's ``f(x, params)``: ``x`` is 1-D,
    ``params`` 1-D of length k, and it returns the predictions for ``x``; batchfit vmaps it
    over the batch (so it must use torch operations, with no Python branch on values).
    ``start(x, y, w)`` gives data-driven initial parameters for a whole batch ((B, N)
    tensors, ``w`` 0 on unused points; returns (B, k)). ``domain(x)`` marks the x a model is
    defined on (points outside are skipped). ``lower``/``upper``: box constraints, kept by
    projecting every step onto the box. ``columns``: (output column, parameter index).
    """

    name: str
    param_names: tuple[str, ...]
    f: Callable | None = None  # None: the polynomial family, solved in its own frame
    start: Callable | None = None
    domain: Callable | None = None
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None
    columns: tuple[tuple[str, int], ...] = ()
    degree: int | None = None  # the polynomial family only
    canonical: Callable | None = None  # one of several equivalent answers (sigma > 0)
    # How the solvers may call ``f`` (the built-in families; a user's model when a probe on
    # its data shows the same answers, see ``nonlinear.call_form``): with ``params`` as a
    # tuple of scalars instead of a tensor, and point by point (each prediction depends on
    # its own x only), so its Jacobian comes from one backward pass per point.
    tuple_params: bool = False
    pointwise: bool = False

    @property
    def k(self) -> int:
        return len(self.param_names)

    @property
    def builtin(self) -> bool:
        """The polynomial or a built-in family (not a user's function)."""
        family = FAMILIES.get(self.name)
        return self.is_poly or (family is not None and family.f is self.f
                                and family.start is self.start)

    @property
    def stable_key(self):
        """A name that means the same in every process: the polynomial and the built-in
        families (with their bounds), a user's model by its code's fingerprint (None when
        its code has none)."""
        if self.is_poly:
            return ("poly", self.degree)
        if self.builtin:
            return ("model", self.name, self.param_names, self.lower, self.upper)
        code = fingerprint(self.f)
        if code is None or self.start is not None or self.domain is not None \
                or self.canonical is not None:
            return None
        return ("user model", code, self.param_names, self.lower, self.upper,
                self.tuple_params, self.pointwise)

    @property
    def is_poly(self) -> bool:
        return self.f is None

    @property
    def bounded(self) -> bool:
        return self.lower is not None or self.upper is not None


def polynomial(degree: int) -> Model:
    """``y = sum_i p_i x**i``, its coefficients highest power first: a, b, c for the
    quadratic, else pD .. p0."""
    return Model("poly", poly_names(degree), columns=poly_columns(degree), degree=degree)


def _exp(x, p):
    return p[0] * torch.exp(-p[1] * x) + p[2]


def _gauss(x, p):
    return p[0] * torch.exp(-((x - p[1]) ** 2) / (2 * p[2] ** 2)) + p[3]


def _logistic(x, p):
    return p[0] / (1 + torch.exp(-p[1] * (x - p[2]))) + p[3]


def _power(x, p):
    return p[0] * x ** p[1] + p[2]


def _masked_mean(values, w):
    return (w * values).sum(1) / w.sum(1).clamp(min=1e-30)


def _ends(x, y, w, fraction=0.15):
    """Mean y over the lowest and the highest ``fraction`` of each series' x range."""
    lo = torch.where(w > 0, x, torch.inf).amin(1, keepdim=True)
    hi = torch.where(w > 0, x, -torch.inf).amax(1, keepdim=True)
    span = (hi - lo).clamp(min=1e-30)
    low = w * (x <= lo + fraction * span)
    high = w * (x >= hi - fraction * span)
    return _masked_mean(y, low), _masked_mean(y, high), lo[:, 0], hi[:, 0]


def _nearest_x(x, w, y, target):
    """Per series, the x of the used point whose y is closest to ``target``."""
    distance = torch.where(w > 0, (y - target[:, None]).abs(), torch.inf)
    return x.gather(1, distance.argmin(1, keepdim=True))[:, 0]


def _exp_start(x, y, w):
    y_lo, y_hi, lo, hi = _ends(x, y, w)
    c = y_hi
    half = _nearest_x(x, w, y, (y_lo + y_hi) / 2)  # where half the decay is done
    b = torch.log(torch.tensor(2.0, dtype=x.dtype)) / (half - lo).clamp(min=1e-3 * (hi - lo))
    a = (y_lo - c) * torch.exp(b * lo)
    return torch.stack([a, b, c], 1)


def _gauss_start(x, y, w):
    y_lo, y_hi, _, _ = _ends(x, y, w)
    c = (y_lo + y_hi) / 2
    top = torch.where(w > 0, y - c[:, None], -torch.inf).amax(1)
    bottom = torch.where(w > 0, y - c[:, None], torch.inf).amin(1)
    a = torch.where(top >= -bottom, top, bottom)  # a peak or a dip
    mu = _nearest_x(x, w, y, c + a)
    mass = w * ((y - c[:, None]) / a[:, None]).clamp(min=0)
    sigma = torch.sqrt(_masked_mean((x - mu[:, None]) ** 2, mass)).clamp(min=1e-30)
    return torch.stack([a, mu, sigma, c], 1)


def _logistic_start(x, y, w):
    y_lo, y_hi, lo, hi = _ends(x, y, w)
    x0 = _nearest_x(x, w, y, (y_lo + y_hi) / 2)
    k = 8 / (hi - lo).clamp(min=1e-30)  # the step spans about a quarter of the range
    return torch.stack([y_hi - y_lo, k, x0, y_lo], 1)


def _power_start(x, y, w):
    """c from the low end, then a, b by least squares of log|y - c| on log x."""
    y_lo, y_hi, _, _ = _ends(x, y, w)
    c = torch.where(y_hi >= y_lo, torch.minimum(y_lo, torch.zeros_like(y_lo)),
                    torch.maximum(y_lo, torch.zeros_like(y_lo)))
    sign = torch.where(y_hi >= y_lo, 1.0, -1.0).to(x.dtype)
    lx = torch.log(torch.where(w > 0, x, 1))
    ly = torch.log((sign[:, None] * (y - c[:, None])).clamp(min=1e-30))
    keep = w * (sign[:, None] * (y - c[:, None]) > 0)
    mx, my = _masked_mean(lx, keep), _masked_mean(ly, keep)
    b = _masked_mean((lx - mx[:, None]) * (ly - my[:, None]), keep) / _masked_mean(
        (lx - mx[:, None]) ** 2, keep).clamp(min=1e-30)
    a = sign * torch.exp(my - b * mx)
    return torch.stack([a, b, c], 1)


def _positive(x):
    return x > 0


def _sigma_positive(p):
    return (p[0], p[1], p[2].abs(), p[3])


_FAST = dict(tuple_params=True, pointwise=True)  # (each family's p[i] are scalars; per point)
FAMILIES = {
    "exp": Model("exp", FAMILY_PARAMS["exp"], _exp, _exp_start, **_FAST),
    "gauss": Model("gauss", FAMILY_PARAMS["gauss"], _gauss, _gauss_start,
                   canonical=_sigma_positive, **_FAST),
    "logistic": Model("logistic", FAMILY_PARAMS["logistic"], _logistic, _logistic_start,
                      **_FAST),
    "power": Model("power", FAMILY_PARAMS["power"], _power, _power_start, domain=_positive,
                   **_FAST),
}


def resolve_model(model, degree: int, param_names=None, bounds=None) -> Model:
    """``model``: None or 'poly' (degree ``degree``), a family name, a ``Model``, or a
    callable ``f(x, params)`` (its parameter count comes from ``param_names``, or later
    from ``p0``). ``bounds``: ``(lower, upper)`` sequences of length k (None or +-inf: free).
    """
    if model is None or (isinstance(model, str) and model == "poly"):
        resolved = polynomial(degree)
    elif isinstance(model, str):
        if model not in FAMILIES:
            raise ValueError(f"unknown model {model!r}; choose poly, {', '.join(FAMILIES)}, "
                             "or pass a callable f(x, params)")
        resolved = FAMILIES[model]
    elif isinstance(model, Model):
        resolved = model
    elif callable(model):
        names = tuple(param_names) if param_names is not None else ()
        resolved = Model(getattr(model, "__name__", "custom"), names, model)
    else:
        raise ValueError(f"model must be a name or a callable f(x, params), got {model!r}")
    if param_names is not None and not resolved.is_poly:
        names = tuple(str(n) for n in param_names)
        if resolved.param_names and len(names) != resolved.k:
            raise ValueError(f"param_names has {len(names)} names, the model has "
                             f"{resolved.k} parameters")
        resolved = replace(resolved, param_names=names)
    if bounds is not None:
        if resolved.is_poly:
            raise ValueError("bounds apply to nonlinear models (the polynomial is solved "
                             "exactly)")
        lower, upper = bounds
        resolved = replace(resolved, lower=None if lower is None else tuple(map(float, lower)),
                           upper=None if upper is None else tuple(map(float, upper)))
    return resolved


def with_param_count(model: Model, k: int) -> Model:
    """A custom model whose names were not given: ``p0 .. p{k-1}``."""
    if model.param_names:
        if model.k != k:
            raise ValueError(f"p0 has {k} parameters but the model names {model.k}")
        return model
    return replace(model, param_names=tuple(f"p{i}" for i in range(k)))


def output_columns(model: Model) -> tuple[tuple[str, int], ...]:
    return model.columns or tuple((name, i) for i, name in enumerate(model.param_names))
