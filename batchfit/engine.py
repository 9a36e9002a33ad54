"""The front door ``fit``: the one place that picks devices, vmaps and compiles.

Solvers hand per-series functions to ``_Vectorizer``, which vmaps them over the batch (inputs
with a leading batch axis are mapped, scalars are shared) and, for the hot kernels and when it
pays, compiles them with ``torch.compile(dynamic=True)``: one compiled kernel then serves every
batch size and series length, and is reused across calls.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from .diagnostics import PRECISION_LIMITED
from .losses import resolve_loss
from .models import Model, resolve_model, with_param_count
from .nonlinear import solve_model
from .problem import (
    FitResult,
    History,
    Series,
    float32_overflows,
    float32_unsafe_rows,
    make_problem,
    used_points,
)
from .solvers import (
    DEFAULT_EPOCHS,
    SOLVERS,
    SolverConfig,
    random_init,
    solve_descent,
    solve_exact,
    solve_newton,
    solve_without_points,
)

MAX_DEGREE = 10
# A compile costs about this much (warm inductor cache, 2 cores; a cold one 10-30 s): compile
# a kernel when its estimated eager time (solvers.eager_seconds) is larger. With
# compile=True, every kernel above TRIVIAL_S is compiled (a handful of rows never is).
COMPILE_COST_S = 5.0
TRIVIAL_S = 0.05
_VMAPPED: dict = {}
# Inductor's own lowering code calls a deprecated torch helper; that is torch's business, not
# the user's, so keep it off their terminal.
warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated",
                        category=FutureWarning)
_COMPILED: dict = {}


def resolve_device(device, *arrays) -> torch.device:
    """``auto``: the device of the tensor inputs (results stay where the caller's tensors
    are); for numpy inputs, CUDA when available, else the CPU."""
    if device is None or device == "auto":
        for array in arrays:
            if isinstance(array, torch.Tensor):
                return array.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def resolve_dtype(dtype, y) -> torch.dtype:
    """Default float32 (the contract's), or float64 when y is already a float64 tensor."""
    if dtype is None:
        return torch.float64 if isinstance(y, torch.Tensor) and y.dtype == torch.float64 \
            else torch.float32
    names = {"float32": torch.float32, "float64": torch.float64}
    resolved = names.get(dtype, dtype)
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _own_entry(batched: Callable) -> Callable:
    """A wrapper with a code object of its own.

    Dynamo keeps compiled graphs per code object, at most 8 of them; every vmapped kernel
    would otherwise share the code of vmap's wrapper and they would evict each other.
    """
    def entry(*args):
        return batched(*args)
    entry.__code__ = entry.__code__.replace()  # a copy: same bytecode, separate cache
    return entry


def _in_dims(args):
    """Map every tensor with a leading axis over the batch; share scalars and everything else."""
    return pytree.tree_map(
        lambda a: 0 if isinstance(a, torch.Tensor) and a.ndim > 0 else None, args)


class _Vectorizer:
    """``vectorize(fn, *args, eager_s=0)``: run per-series ``fn`` over the batch.

    ``eager_s`` estimates the kernel's uncompiled run time; see COMPILE_COST_S.
    """

    def __init__(self, compile, fullgraph: bool):
        self.compile = compile
        self.fullgraph = fullgraph

    def __call__(self, fn: Callable, *args, eager_s: float = 0):
        key = (fn, _in_dims(args))
        hot = eager_s >= TRIVIAL_S if self.compile is True else (
            self.compile == "auto" and eager_s >= COMPILE_COST_S)
        if hot:
            batched = _COMPILED.get(key)
            if batched is None:
                batched = torch.compile(_own_entry(vmap(fn, in_dims=key[1])), dynamic=True,
                                        fullgraph=self.fullgraph)
                _COMPILED[key] = batched
        else:
            batched = _VMAPPED.setdefault(key, vmap(fn, in_dims=key[1]))
        return batched(*args)


def _check_number(name, value, *, low=None, integer=False, strictly=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if strictly else value < low):
        raise ValueError(f"{name} must be {'>' if strictly else '>='} {low}, got {value!r}")
    return value


def fit(x, y, weights=None, lengths=None, *, mask=None, degree: int = 2, model=None, p0=None,
        param_names=None, bounds=None, loss="mse",
        f_scale: float = 1.0, solver: str = "auto", lr: float | None = None,
        epochs: int | None = None, tol: float | None = None, init="random", seed: int = 0,
        device="auto", dtype=None, compile="auto", history_every: int = 0,
        history_sample: int = 1 << 14, track=None) -> FitResult:
    """Fit ``y = sum_i p_i x**i`` (degree 2: ``a x^2 + b x + c``) to every series at once.

    Parameters
    ----------
    x, y : (B, N) arrays or tensors (padded), or (N,) for one series; x may be (N,) shared.
    weights : (B, N), >= 0; a weight multiplies the point's squared residual (as in WLS).
    lengths : (B,) ints, points beyond them are padding. ``mask`` (B, N) bool does the same.
        Points with a non-finite x, y or weight, or weight 0, are skipped.
    degree : polynomial degree, 0 to 10.
    model : ``None``/``"poly"`` (the polynomial of ``degree``), a built-in family (``"exp"``,
        ``"gauss"``, ``"logistic"``, ``"power"``, see batchfit.models.FAMILIES), or a callable
        ``f(x, params)`` on ONE series (1-D ``x``, 1-D ``params``), like the seed's ``f``.
    p0 : starting parameters of a nonlinear model: (k,) or (B, k), or a callable
        ``p0(x, y) -> params`` on one series (unused points are NaN); families have their
        own data-driven start. For polynomials it is the ``init`` of gd/adam/newton.
    param_names, bounds : names of a custom model's parameters (default p0, p1, ...);
        ``(lower, upper)`` box constraints (sequences of k, +-inf where free), kept by
        projecting every step onto the box.
    loss : ``mse`` or scipy's robust ``huber``, ``soft_l1``, ``cauchy``, ``arctan`` (with
        ``f_scale``), or a callable ``loss(pred, y)`` (see batchfit.losses).
    solver : ``auto`` (exact for MSE, newton otherwise), ``exact``, ``newton``, ``gd``, ``adam``.
    lr, epochs, tol, init, seed : iterative solvers. GD/Adam: learning rate (default 1e-3) and
        epochs (default 15000), initial raw coefficients (``random`` seeded normal, ``zeros``
        or an array); Newton: epochs is the iteration cap (default 50). ``tol``: converged
        when half the squared Newton decrement is below tol * |loss| (default 1e-6; 1e-10
        for nonlinear models in float64, whose last steps converge linearly).
    device, dtype : ``auto|cpu|cuda``; float32 (default) or float64.
    compile : ``auto`` (compile a kernel when its estimated eager run time exceeds a compile's,
        about 5 s), True (compile every kernel that is not trivial), or False.
    history_every, history_sample, track : iterative solvers record the training loss every
        so many epochs (0: about 300 records) for an even sample of ``history_sample`` series
        (the batch's quantiles) and for the ``track`` series (indices; default: 5 spread
        over the batch), see ``FitResult.history``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    _check_number("degree", degree, low=0, integer=True)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be at most {MAX_DEGREE}, got {degree}")
    model_spec = _resolved_model(model, degree, p0, param_names, bounds)
    if model_spec.is_poly and p0 is not None:
        init = p0
    _check_number("f_scale", f_scale, low=0, strictly=True)
    dtype = resolve_dtype(dtype, y)
    if tol is None:  # nonlinear models converge linearly at the end: ask for more
        tol = 1e-10 if not model_spec.is_poly and dtype == torch.float64 else 1e-6
    _check_number("tol", tol, low=0)
    _check_number("seed", seed, integer=True)
    _check_number("history_every", history_every, low=0, integer=True)
    _check_number("history_sample", history_sample, low=0, integer=True)
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    loss_spec = resolve_loss(loss)
    if solver == "auto":
        solver = "exact" if loss_spec.is_mse and model_spec.is_poly else "newton"
    if solver == "exact" and not model_spec.is_poly:
        raise ValueError(f"the exact solver fits polynomials; use newton (Levenberg-Marquardt)"
                         f" for the {model_spec.name} model")
    if lr is None:
        lr = 1e-3
    _check_number("lr", lr, low=0, strictly=True)
    epochs = DEFAULT_EPOCHS.get(solver, 1) if epochs is None else epochs
    _check_number("epochs", epochs, low=0, integer=True)

    device = resolve_device(device, x, y)
    options = dict(degree=degree, model=model, p0=p0, param_names=param_names, bounds=bounds,
                   loss=loss, f_scale=f_scale, solver=solver, lr=lr,
                   epochs=epochs, tol=tol, init=init, seed=seed, device=device,
                   compile=compile, history_every=history_every,
                   history_sample=history_sample, track=track)
    wide = None
    if dtype == torch.float32 and float32_overflows(y):  # huge |y| would cast to inf
        wide = float32_unsafe_rows(y)
        if wide.any():
            return _fit_wide_apart(x, y, weights, lengths, mask, wide, options)
    problem = make_problem(x, y, weights, lengths, mask, dtype=dtype, device=device,
                           centre_x=model_spec.is_poly)
    vectorize = _Vectorizer(compile, fullgraph=loss_spec.user is None)
    if loss_spec.reduces and bool((vectorize(used_points, Series.of(problem))[0] != 1).any()):
        raise ValueError("a loss callable that returns a scalar cannot skip padded, masked, "
                         "weighted or non-finite points; return per-point losses instead")
    cfg = SolverConfig(degree=degree, model=model_spec, loss=loss_spec, f_scale=float(f_scale),
                       lr=float(lr), epochs=int(epochs), tol=float(tol), init=init, seed=seed,
                       history_every=history_every, history_sample=history_sample,
                       track=None if track is None else tuple(int(i) for i in track))

    if problem.y.numel() == 0:
        return solve_without_points(problem, cfg, solver)
    if not model_spec.is_poly:
        result = solve_model(problem, cfg, vectorize, solver, p0)
    elif solver == "exact":
        result = solve_exact(problem, cfg, vectorize)
    elif solver == "newton":
        result = solve_newton(problem, cfg, vectorize)
    else:
        result = solve_descent(problem, cfg, vectorize, solver)
    if wide is None and dtype == torch.float32:
        wide = _needs_float64(result, y)
        if wide is not None and result.history is None and np.ndim(y) == 2:
            # Rows are independent: redo only the flagged ones (a history would need them
            # merged back in, which the group path below does).
            return _with_float64_rows(result, x, y, weights, lengths, mask, wide, options)
        if wide is not None:
            return _fit_wide_apart(x, y, weights, lengths, mask, wide, options)
    return result


def _resolved_model(model, degree, p0, param_names, bounds) -> Model:
    """The model, with a custom model's parameter count taken from ``p0`` if need be."""
    spec = resolve_model(model, degree, param_names, bounds)
    if spec.is_poly:
        return spec
    if p0 is not None and not callable(p0) and np.ndim(p0) in (1, 2):
        spec = with_param_count(spec, int(np.shape(p0)[-1]))
    elif not spec.param_names:
        raise ValueError("a custom model needs p0 as an array (its starting parameters), "
                         "or param_names to say how many parameters it has")
    if spec.start is None and p0 is None:
        raise ValueError(f"the {spec.name} model needs p0 (starting parameters)")
    for side in (spec.lower, spec.upper):
        if side is not None and len(side) != spec.k:
            raise ValueError(f"bounds need {spec.k} values on each side")
    return spec


def _needs_float64(result: FitResult, y) -> np.ndarray | None:
    """The series of a float32 fit to redo in float64, or None: those limited by float32
    rounding (diagnostics.PRECISION_LIMITED), and those whose |y| over- or underflowed
    float32 squares (looked for only where a loss is non-finite or below 2**-100: only exact
    data have a float32 loss that small, otherwise its squares underflowed)."""
    limited = result.status == PRECISION_LIMITED
    loss = result.loss
    suspect = bool(((~torch.isfinite(loss)) | (loss < 2.0**-100)).any())
    if not suspect and not bool(limited.any()):
        return None
    wide = limited.cpu().numpy()
    if suspect:
        wide = wide | float32_unsafe_rows(y)
    return wide if wide.any() else None


RESULT_FIELDS = ("params", "stderr", "loss", "rmse", "r2", "n_points", "iterations", "status")


def _with_float64_rows(result: FitResult, x, y, weights, lengths, mask, wide: np.ndarray,
                       options: dict) -> FitResult:
    """``result`` with its ``wide`` rows fitted again in float64."""
    rows = np.flatnonzero(wide)
    per_series = {name: _take_rows(options[name], rows, 2) for name in ("init", "p0")}
    part = fit(_take_rows(x, rows, 2), _take_rows(y, rows, 2), _take_rows(weights, rows, 2),
               _take_rows(lengths, rows, 1), mask=_take_rows(mask, rows, 2),
               dtype=torch.float64, **{**options, **per_series, "track": []})
    index = torch.from_numpy(rows).to(result.params.device)
    return dataclasses.replace(result, **{
        name: getattr(result, name).index_put((index,), getattr(part, name))
        for name in RESULT_FIELDS})


def _fit_wide_apart(x, y, weights, lengths, mask, wide: np.ndarray, options: dict):
    """Fit the ``wide`` series (beyond float32's range, or limited by its rounding) in
    float64, the others in float32."""
    def fit_group(rows, **group_options):
        return fit(_take_rows(x, rows, 2), _take_rows(y, rows, 2),
                   _take_rows(weights, rows, 2), _take_rows(lengths, rows, 1),
                   mask=_take_rows(mask, rows, 2),
                   dtype=torch.float64 if wide[rows[0]] else torch.float32, **group_options)

    if np.ndim(y) == 1:  # one series
        return fit(x, y, weights, lengths, mask=mask, dtype=torch.float64, **options)
    groups = [rows for rows in (np.flatnonzero(~wide), np.flatnonzero(wide)) if len(rows)]
    return _fit_in_groups(groups, len(wide), fit_group, options)


def _gather(values: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Equal-length series stored at ``starts`` -> a (len(starts), length) array; adjacent
    series are a reshape (no copy)."""
    count = len(starts)
    if count and (np.diff(starts) == length).all():
        return values[starts[0]:starts[0] + count * length].reshape(count, length)
    return values[starts[:, None] + np.arange(length)]


def fit_ragged(x: np.ndarray, y: np.ndarray, offsets: np.ndarray, weights=None,
               **options) -> FitResult:
    """``fit`` for series stored back to back: series i is ``x[offsets[i]:offsets[i + 1]]``.

    Series are fitted in groups of equal length, so nothing is padded (equal-length data
    takes the fast path) and a series' numbers depend only on its own points, never on
    which other series share its batch. Results come back in series order, with the groups'
    training histories merged (``track`` and ``history_sample`` refer to the whole batch).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths, starts = np.diff(offsets), offsets[:-1]
    groups = [np.flatnonzero(lengths == length) for length in np.unique(lengths)]
    if not groups:
        return fit(np.zeros((0, 1)), np.zeros((0, 1)), **options)

    def fit_group(rows, **group_options):
        at, length = starts[rows], lengths[rows[0]]
        return fit(_gather(x, at, length), _gather(y, at, length),
                   None if weights is None else _gather(weights, at, length), **group_options)

    return _fit_in_groups(groups, len(lengths), fit_group, options)


def _fit_in_groups(groups: list[np.ndarray], batch: int, fit_group: Callable,
                   options: dict) -> FitResult:
    """Fit a batch as disjoint groups of rows, ``fit_group(rows, **options)`` each; results
    and training histories come back in row order. ``track``, ``history_sample`` and a
    random ``init`` refer to the whole batch, so no number depends on the grouping."""
    options = dict(options)
    track = options.pop("track", None)
    if track is None:  # the default spread, over the whole batch
        track = sorted({round(i * (batch - 1) / 4) for i in range(5)}) if batch else []
    track = np.asarray(track, dtype=np.int64)
    sample = options.pop("history_sample", 1 << 14)
    init = options.pop("init", "random")
    if isinstance(init, str) and init == "random":  # by position in the whole batch
        init = random_init(options.get("seed", 0), 0, batch, options.get("degree", 2) + 1)
    per_series = not isinstance(init, str) and np.ndim(init) == 2
    if per_series:
        init = torch.as_tensor(init)
    p0 = options.pop("p0", None)
    p0_rows = p0 is not None and not callable(p0) and np.ndim(p0) == 2
    if p0_rows:
        p0 = torch.as_tensor(p0)
    parts = [fit_group(rows, track=np.flatnonzero(np.isin(rows, track)).tolist(),
                       history_sample=-(-sample * len(rows) // batch),
                       init=init[torch.from_numpy(rows)] if per_series else init,
                       p0=p0[torch.from_numpy(rows)] if p0_rows else p0, **options)
             for rows in groups]
    positions = [torch.from_numpy(rows) for rows in groups]
    histories = [part.history for part in parts]
    history = None if histories[0] is None else History.merge(histories, positions)
    order = torch.from_numpy(np.argsort(np.concatenate(groups), kind="stable"))
    fields = {}
    for field in RESULT_FIELDS:
        joined = torch.cat([getattr(part, field) for part in parts])
        fields[field] = joined[order.to(joined.device)]
    return dataclasses.replace(parts[0], history=history, **fields)


def _take_rows(value, rows: np.ndarray, per_series_ndim: int):
    """Rows of a per-series argument (one with ``per_series_ndim`` dims); shared ones as is."""
    if value is None or np.ndim(value) != per_series_ndim:
        return value
    return value[torch.from_numpy(rows)] if isinstance(value, torch.Tensor) else \
        np.asarray(value)[rows]
