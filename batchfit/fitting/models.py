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

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from math import comb
from typing import NamedTuple

import numpy as np
import torch

from batchfit.core.formula import Formula, ModuleSpec
from batchfit.core.keys import fingerprint
from batchfit.core.names import (  # noqa: F401
    DERIVED_COLUMNS,
    FAMILY_PARAMS,
    FAMILY_X_COLUMNS,
    FORMULAS,
    MAX_DEGREE,
    poly_columns,
    poly_names,
)
from batchfit.fitting.linalg import Mat, Vec, mat_mat, mat_vec
from batchfit.fitting.quantiles import t_quantile
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

    ``f`` works on ONE series, exactly like the seed's ``f(x, params)``: ``x`` is 1-D (N,)
    (or (N, d) for x with d columns, ``x[..., j]`` the j-th coordinate), ``params`` 1-D of
    length k, and it returns the N predictions for ``x``; batchfit vmaps it
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
    # Extra output columns computed from a fit (hill4's IC50 and its interval):
    # ``derived(params, stderr, n)`` on (B, k), (B, k) float64 and (B,) int64 numpy arrays
    # gives one (B,) float64 array per name of ``derived_names`` (NaN: null).
    derived: Callable | None = None
    derived_names: tuple[str, ...] = ()
    formula: str | None = None  # a formula model's text (what defines it)
    x_count: int | None = None  # x's columns, where the model says (a formula's)

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
        if self.formula is not None:
            return ("formula", self.formula, self.param_names, self.lower, self.upper)
        code = fingerprint(self.f)
        if code is None or self.start is not None or self.domain is not None \
                or self.canonical is not None:
            return None
        return ("user model", code, self.param_names, self.lower, self.upper,
                self.tuple_params, self.pointwise)

    @property
    def x_columns(self) -> int | None:
        """How many columns the model's x has (its last axis, ``x`` of shape (..., N, d)):
        1 for the polynomial and the 1-D families, ``FAMILY_X_COLUMNS``' for the others,
        None (any) for a user's model."""
        if self.is_poly:
            return 1
        if self.x_count is not None:
            return self.x_count
        return FAMILY_X_COLUMNS.get(self.name, 1) if self.builtin else None

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


# ---- the fields' families: dose-response, bi-exponential decay, spectral peaks
# (Literal constants inside the functions: dynamo would trace a float global as a symbol
# that vmap rejects.)

def _hill4(x, p):
    """The 4-parameter logistic on log10 dose (GraphPad's "variable slope" form):
    ``bottom`` and ``top`` the plateaus (canonically bottom <= top), ``log_ec50`` the
    log10 dose half way between them, ``slope`` the Hill slope (negative: the response
    falls with dose, an inhibition curve). Written with a sigmoid, which neither overflows
    nor loses its derivative far from the midpoint."""
    return p[0] + (p[1] - p[0]) * torch.sigmoid(2.302585092994046 * p[3] * (torch.log10(x) - p[2]))


def _biexp(x, p):
    """Two exponential decays and an offset: amplitudes ``a1``, ``a2``, lifetimes
    ``tau1 <= tau2`` (in x's units), offset ``c``."""
    return p[0] * torch.exp(-x / p[1]) + p[2] * torch.exp(-x / p[3]) + p[4]


def _lorentz(x, p):
    """A Lorentzian peak: height ``a`` above offset ``c`` at ``x0``, half width at half
    maximum ``gamma`` (> 0)."""
    return p[0] * p[2] ** 2 / ((x - p[1]) ** 2 + p[2] ** 2) + p[3]


def _pvoigt(x, p):
    """A pseudo-Voigt peak: ``eta`` (in [0, 1]) of a Lorentzian plus ``1 - eta`` of a
    Gaussian, both of height 1 and full width at half maximum ``w`` (> 0), so ``a`` is the
    peak's height above the offset ``c`` at ``x0`` and ``w`` its FWHM."""
    u = 4 * ((x - p[1]) / p[2]) ** 2
    return p[0] * (p[3] / (1 + u) + (1 - p[3]) * torch.exp(-0.6931471805599453 * u)) + p[4]


def _hill4_start(x, y, w):
    """Plateaus from the lowest and highest doses (so the start's slope is positive), the
    midpoint at the dose whose response is nearest half way, the slope from the doses
    nearest a quarter and three quarters of the way (log10(9) / their distance)."""
    lx = torch.log10(torch.where(w > 0, x, 1))
    y_lo, y_hi, lo, hi = _ends(lx, y, w)
    step = y_hi - y_lo
    mid = _nearest_x(lx, w, y, y_lo + step / 2)
    quarter = _nearest_x(lx, w, y, y_lo + step / 4)
    three = _nearest_x(lx, w, y, y_lo + 3 * step / 4)
    slope = 0.9542425094393249 / (three - quarter).abs().clamp(min=(hi - lo).clamp(
        min=1e-30) / 20)
    return torch.stack([y_lo, y_hi, mid, slope], 1)


BIEXP_GRID = 10  # lifetimes tried per series by the start, log-spaced over the x span


def _biexp_start(x, y, w):
    """Variable projection on a grid: for every pair of lifetimes tau1 < tau2 from
    ``BIEXP_GRID`` log-spaced between 1 % and twice the series' x span, the amplitudes and
    offset are linear least squares (a 3x3 solve per series and pair, from weighted sums);
    the pair of least squared error is the start. In float64: nearby lifetimes make those
    solves ill-conditioned."""
    dtype = x.dtype
    x, y, w = x.double(), y.double(), w.double()
    lo = torch.where(w > 0, x, torch.inf).amin(1)
    hi = torch.where(w > 0, x, -torch.inf).amax(1)
    span = torch.where(hi > lo, hi - lo, 1)
    lo = torch.where(torch.isfinite(lo), lo, 0)
    ratios = torch.logspace(-2, math.log10(2), BIEXP_GRID, dtype=torch.float64, device=x.device)
    taus = span[:, None] * ratios  # (B, G)
    t = torch.where(w > 0, x - lo[:, None], 0)  # (exponents from the first x: no overflow)
    basis = torch.exp(-t[:, :, None] / taus[:, None, :])  # (B, N, G)
    weighted = basis * w[:, :, None]
    gram = weighted.transpose(1, 2) @ basis  # sum w E_i E_j
    ones, rhs = weighted.sum(1), (weighted * y[:, :, None]).sum(1)  # sum w E_i, sum w E_i y
    wsum, ysum, yy = w.sum(1), (w * y).sum(1), (w * y * y).sum(1)
    i, j = torch.triu_indices(BIEXP_GRID, BIEXP_GRID, 1, device=x.device)
    a11, a12, a22 = gram[:, i, i], gram[:, i, j], gram[:, j, j]
    a13, a23, a33 = ones[:, i], ones[:, j], wsum[:, None].expand_as(a11)
    b1, b2, b3 = rhs[:, i], rhs[:, j], ysum[:, None].expand_as(a11)
    # (Cramer's rule on the symmetric 3x3 system, elementwise over series and pairs)
    c11, c12, c13 = a22 * a33 - a23 * a23, a13 * a23 - a12 * a33, a12 * a23 - a13 * a22
    c22, c23, c33 = a11 * a33 - a13 * a13, a12 * a13 - a11 * a23, a11 * a22 - a12 * a12
    det = a11 * c11 + a12 * c12 + a13 * c13
    beta1 = (c11 * b1 + c12 * b2 + c13 * b3) / det
    beta2 = (c12 * b1 + c22 * b2 + c23 * b3) / det
    beta3 = (c13 * b1 + c23 * b2 + c33 * b3) / det
    sse = yy[:, None] - beta1 * b1 - beta2 * b2 - beta3 * b3
    best = torch.where(torch.isfinite(sse) & (det > 0), sse, torch.inf).argmin(1, keepdim=True)

    def pick(values):
        return values.gather(1, best)[:, 0]

    tau1, tau2 = pick(taus[:, i]), pick(taus[:, j])
    start = torch.stack([pick(beta1) * torch.exp(lo / tau1), tau1,
                         pick(beta2) * torch.exp(lo / tau2), tau2, pick(beta3)], 1)
    return torch.nan_to_num(start).to(dtype)


def _peak(x, y, w):
    """Offset (mean of the two ends), signed height, position, and half width at half
    maximum (half the x range of the points beyond half the height; at least half the
    mean spacing) of each series' largest peak or dip."""
    y_lo, y_hi, lo, hi = _ends(x, y, w)
    c = (y_lo + y_hi) / 2
    top = torch.where(w > 0, y - c[:, None], -torch.inf).amax(1)
    bottom = torch.where(w > 0, y - c[:, None], torch.inf).amin(1)
    a = torch.where(top >= -bottom, top, bottom)
    x0 = _nearest_x(x, w, y, c + a)
    above = (w > 0) & ((y - c[:, None]) / a[:, None] > 0.5)
    width = torch.where(above, x, -torch.inf).amax(1) - torch.where(above, x, torch.inf).amin(1)
    spacing = (hi - lo) / (w > 0).sum(1).clamp(min=1)
    half = torch.maximum(torch.nan_to_num(width / 2, nan=0.0, posinf=0.0, neginf=0.0),
                         spacing / 2).clamp(min=1e-30)
    return a, x0, half, c


def _lorentz_start(x, y, w):
    a, x0, half, c = _peak(x, y, w)
    return torch.stack([a, x0, half, c], 1)


def _pvoigt_start(x, y, w):
    a, x0, half, c = _peak(x, y, w)
    return torch.stack([a, x0, 2 * half, torch.full_like(a, 0.5), c], 1)


def _plateaus_ordered(p):
    """bottom <= top: (bottom, top, slope) and (top, bottom, -slope) are the same curve."""
    swap = p[0] > p[1]
    return (torch.where(swap, p[1], p[0]), torch.where(swap, p[0], p[1]), p[2],
            torch.where(swap, -p[3], p[3]))


def _lifetimes_ordered(p):
    """tau1 <= tau2 in every series, so the labels mean the same across series."""
    swap = p[1] > p[3]
    return (torch.where(swap, p[2], p[0]), torch.where(swap, p[3], p[1]),
            torch.where(swap, p[0], p[2]), torch.where(swap, p[1], p[3]), p[4])


def _gamma_positive(p):
    return (p[0], p[1], p[2].abs(), p[3])


def _width_positive(p):
    return (p[0], p[1], p[2].abs(), p[3], p[4])


def _gauss2d(x, p):
    """Gpufit's GAUSS_2D: a round Gaussian spot of height ``amplitude`` above ``offset``,
    centred at (``x0``, ``y0``), standard deviation ``sigma`` (> 0), at points ``x`` whose
    last axis holds their two coordinates (one point (2,), or a series (N, 2))."""
    u, v = x[..., 0] - p[1], x[..., 1] - p[2]
    return p[0] * torch.exp(-(u * u + v * v) / (2 * p[3] * p[3])) + p[4]


def _gauss2d_start(x, y, w):
    """The offset from the border points (the outer 15 % of each coordinate's range: a
    spot's window is mostly background there), the amplitude the highest y above it, the
    centre the centroid of y above the offset, sigma from that mass's second moment
    (``E[r^2] = 2 sigma^2`` for a round Gaussian)."""
    used = w > 0
    lo = torch.where(used[..., None], x, torch.inf).amin(1, keepdim=True)
    hi = torch.where(used[..., None], x, -torch.inf).amax(1, keepdim=True)
    span = (hi - lo).clamp(min=1e-30)
    border = ((x <= lo + 0.15 * span) | (x >= hi - 0.15 * span)).any(-1)
    offset = _masked_mean(y, w * border)
    top = torch.where(used, y, -torch.inf).amax(1)
    amplitude = top - offset
    mass = w * (y - offset[:, None]).clamp(min=0)
    centre = (mass[..., None] * x).sum(1) / mass.sum(1).clamp(min=1e-30)[:, None]
    r2 = ((x - centre[:, None, :]) ** 2).sum(-1)
    sigma = torch.sqrt(_masked_mean(r2, mass) / 2)
    sigma = torch.where(sigma > 0, sigma, span.amin((1, 2)) / 4).clamp(min=1e-30)
    return torch.stack([amplitude, centre[:, 0], centre[:, 1], sigma, offset], 1)


def _spot_width_positive(p):
    return (p[0], p[1], p[2], p[3].abs(), p[4])


IC50_LEVEL = 0.95  # hill4's confidence interval of the IC50


def _ic50(params, stderr, n):
    """IC50 = 10**log_ec50 and its ``IC50_LEVEL`` interval, ``10**(log_ec50 -+ q se)`` with
    q Student's t quantile on n - 4 degrees of freedom (the interval of log_ec50 mapped to
    doses; null where the stderr is)."""
    log_ec50 = params[:, 2]
    half = t_quantile((1 + IC50_LEVEL) / 2, n - params.shape[1]) * stderr[:, 2]
    with np.errstate(over="ignore", invalid="ignore"):
        return 10.0**log_ec50, 10.0**(log_ec50 - half), 10.0**(log_ec50 + half)


_FAST = dict(tuple_params=True, pointwise=True)  # (each family's p[i] are scalars; per point)
FAMILIES = {
    "exp": Model("exp", FAMILY_PARAMS["exp"], _exp, _exp_start, **_FAST),
    "gauss": Model("gauss", FAMILY_PARAMS["gauss"], _gauss, _gauss_start,
                   canonical=_sigma_positive, **_FAST),
    "logistic": Model("logistic", FAMILY_PARAMS["logistic"], _logistic, _logistic_start,
                      **_FAST),
    "power": Model("power", FAMILY_PARAMS["power"], _power, _power_start, domain=_positive,
                   **_FAST),
    "hill4": Model("hill4", FAMILY_PARAMS["hill4"], _hill4, _hill4_start, domain=_positive,
                   canonical=_plateaus_ordered, derived=_ic50,
                   derived_names=DERIVED_COLUMNS["hill4"], **_FAST),
    "biexp": Model("biexp", FAMILY_PARAMS["biexp"], _biexp, _biexp_start,
                   canonical=_lifetimes_ordered, **_FAST),
    "lorentz": Model("lorentz", FAMILY_PARAMS["lorentz"], _lorentz, _lorentz_start,
                     canonical=_gamma_positive, **_FAST),
    "pvoigt": Model("pvoigt", FAMILY_PARAMS["pvoigt"], _pvoigt, _pvoigt_start,
                    lower=(-math.inf, -math.inf, -math.inf, 0.0, -math.inf),
                    upper=(math.inf, math.inf, math.inf, 1.0, math.inf),
                    canonical=_width_positive, **_FAST),
    "gauss2d": Model("gauss2d", FAMILY_PARAMS["gauss2d"], _gauss2d, _gauss2d_start,
                     canonical=_spot_width_positive, **_FAST),
}


def resolve_model(model, degree: int, param_names=None, bounds=None) -> Model:
    """``model``: None or 'poly' (degree ``degree``), a family name, a ``Model``, a parsed
    formula or module reference (``core.formula``), or a
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
    elif isinstance(model, Formula | ModuleSpec):
        from batchfit.fitting.user_models import model_of  # (it builds on this module)

        resolved = model_of(model)
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
