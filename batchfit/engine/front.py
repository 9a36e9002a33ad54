"""The front door ``fit``: arguments checked and resolved, then the solve (exact, iterative,
or a model's Levenberg-Marquardt), with float32 series that float32 cannot hold solved again
in float64."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from batchfit.core.names import Status
from batchfit.core.options import Options, parse_models, resolve
from batchfit.engine.choice import fit_choice
from batchfit.engine.devices import configure_threads, resolve_device
from batchfit.engine.exact import exact_fit
from batchfit.engine.policy import vectorizer
from batchfit.fitting.data import (
    FitResult,
    History,
    Series,
    checked_inputs,
    float32_overflows,
    float32_unsafe_rows,
    make_problem,
    out_of_range_rows,
    used_points,
    x_columns_of,
)
from batchfit.fitting.diagnostics import PRECISION_LIMITED
from batchfit.fitting.loop import SolverConfig
from batchfit.fitting.losses import resolve_loss
from batchfit.fitting.models import (
    Model,
    resolve_model,
    with_param_count,
)
from batchfit.fitting.nonlinear import solve_model
from batchfit.fitting.solvers import (
    random_init,
    solve_descent,
    solve_newton,
    solve_without_points,
)


def fit(x, y, weights=None, lengths=None, *, mask=None, degree: int = 2, model=None, p0=None,
        param_names=None, bounds=None, loss="mse",
        f_scale: float = 1.0, solver: str = "auto", lr: float | None = None,
        epochs: int | None = None, tol: float | None = None, init="random", seed: int = 0,
        device="auto", dtype=None, compile="auto", history_every: int = 0,
        history_sample: int = 1 << 14, track=None, restarts: int = 0,
        axis: int = -1, covariance: bool = False) -> FitResult:
    """Fit ``y = sum_i p_i x**i`` (degree 2: ``a x^2 + b x + c``) to every series at once.

    Parameters
    ----------
    x, y : (B, N) arrays or tensors (padded), or (N,) for one series; x may be (N,) shared.
        Any batch shape works: ``y`` (..., N), e.g. an (H, W, T) image stack, with ``x``
        (N,) or broadcastable to ``y`` (and weights, mask likewise, lengths (...)); ``axis``
        picks the points' axis (default the last). The result then has params (..., k)
        and diagnostics (...). For a nonlinear model x may have d columns: (..., N, d),
        or (N, d) shared (``gauss2d`` takes d = 2; the polynomial one column).
    weights : (B, N), >= 0; a weight multiplies the point's squared residual (as in WLS).
    lengths : (B,) ints, points beyond them are padding. ``mask`` (B, N) bool does the same.
        Points with a non-finite x, y or weight, or weight 0, are skipped.
    degree : polynomial degree, 0 to 10; or ``"auto"`` / ``"auto:D"``: each series' degree in
        0..D (default 3) chosen by BIC (``FitResult.degrees``; higher coefficients 0).
    model : ``None``/``"poly"`` (the polynomial of ``degree``), a built-in family (``"exp"``,
        ``"gauss"``, ``"logistic"``, ``"power"``, see batchfit.fitting.models.FAMILIES), or a callable
        ``f(x, params)`` on ONE series (``x`` (N,), or (N, d) for x with d columns; 1-D
        ``params``), like the seed's ``f``.
    p0 : starting parameters of a nonlinear model: (k,) or (B, k), or a callable
        ``p0(x, y) -> params`` on one series (unused points are NaN); families have their
        own data-driven start. For polynomials it is the ``init`` of gd/adam/newton.
    param_names, bounds : names of a custom model's parameters (default p0, p1, ...);
        ``(lower, upper)`` box constraints (sequences of k, +-inf where free), kept by
        projecting every step onto the box.
    loss : ``mse`` or scipy's robust ``huber``, ``soft_l1``, ``cauchy``, ``arctan`` (with
        ``f_scale``), ``poisson`` (the Poisson deviance of counts y >= 0, for nonlinear
        models: maximum likelihood, stderr from the inverse Fisher information), or a
        callable ``loss(pred, y)`` (see batchfit.fitting.losses).
    solver : ``auto`` (exact for MSE, newton otherwise), ``exact``, ``newton``, ``gd``, ``adam``.
    lr, epochs, tol, init, seed : iterative solvers. GD/Adam: learning rate (default 1e-3) and
        epochs (default 15000), initial raw coefficients (``random`` seeded normal, ``zeros``
        or an array, highest power first as ``params``); Newton: epochs is the iteration cap
        (default 50; for a model 100 (k + 1), MINPACK's budget). ``tol``: converged when half
        the squared Newton decrement is below tol * |loss| (default 1e-6; 1e-10 for nonlinear
        models in float64, whose last steps converge linearly); Newton then keeps stepping
        while the loss does not rise and a parameter still moves by more than sqrt(eps) of
        itself.
    device, dtype : ``auto|cpu|cuda``; the working precision of the iterative solvers and
        of GPU kernels, float32 (default) or float64. The exact solver accumulates its
        statistics in float64 whatever the dtype (float64-grade coefficients).
    compile : ``auto`` (batchfit's kernels compiled ahead of time, once per machine, used
        when kept and built when the eager call would take over a second; user callables
        compiled in-process when their eager run time exceeds a compile's, about 5 s),
        True (compile every kernel that is not trivial), or False (never).
    history_every, history_sample, track : iterative solvers record the training loss every
        so many epochs (0: about 300 records) for an even sample of ``history_sample`` series
        (the batch's quantiles) and for the ``track`` series (indices; default: 5 spread
        over the batch), see ``FitResult.history``.
    restarts : nonlinear models: fit every series from this many more starting points, each
        parameter of the first start (``p0``, or a family's data-driven guess) scaled by a
        seeded random factor between 1/10 and 10 (a zero one drawn from [-1, 1]); keep the
        converged fit of lowest loss (``FitResult.converged_starts`` counts them).
    covariance : also return each series' full parameter covariance,
        ``FitResult.covariance`` (..., k, k) float64 in the order of ``params`` (its
        diagonal is ``stderr**2``; NaN where undefined), the input of
        ``batchfit.predict(..., interval=0.95)``'s confidence bands.

    Returns
    -------
    FitResult
        ``params`` (B, k) float64 in the column order of ``param_names`` (polynomials highest
        power first, the quadratic's ``a, b, c``: ``params[:, i]`` multiplies
        ``x**(degree - i)``), ``stderr``, ``loss``, ``rmse``,
        ``r2``, ``n_points``, ``iterations``, ``status`` (``status_labels()``), for
        polynomials the frame they were fitted in (``x_centre``, ``x_scale``,
        ``frame_params``: evaluate with ``batchfit.predict``), and for iterative solvers
        ``history``.

        With ``model`` a list of candidates (``["exp", "gauss", "poly1"]``, or
        ``"auto:exp,gauss,poly1"``; ``polyD`` is the polynomial of degree D): a
        ``ChoiceResult``, each series' model chosen by AICc (batchfit.fitting.choice).
    """
    if parse_models(model) is not None:
        options = dict(locals())
        points = {name: options.pop(name) for name in ("x", "y", "weights", "lengths", "mask",
                                                     "axis")}
        return fit_choice(lambda **one: fit(**points, **one), options)
    opts = resolve(degree=degree, model=model, p0=p0, param_names=param_names, bounds=bounds,
                   loss=loss, f_scale=f_scale, solver=solver, lr=lr, epochs=epochs, tol=tol,
                   init=init, seed=seed, device=device, dtype=dtype, compile=compile,
                   history_every=history_every, history_sample=history_sample, track=track,
                   restarts=restarts, y=y, covariance=covariance)
    try:
        ndim = np.ndim(y)
    except ValueError:  # ragged nesting: the input checks say so in their words
        ndim = 2
    if ndim <= 2 and axis in (-1, ndim - 1):
        return solve(x, y, weights, lengths, mask, opts)
    batch_shape, flat = _as_batch(x, y, weights, lengths, mask, axis)
    return solve(*flat, opts).reshaped(batch_shape)


def _as_batch(x, y, weights, lengths, mask, axis: int):
    """(batch shape, (x, y, weights, lengths, mask) as (B, N) with the points last), for y of
    any shape with its points on ``axis``."""
    ndim = np.ndim(y)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for y of {ndim} dimensions")
    columns = x_columns_of(np.shape(x), np.shape(y))
    last = axis in (-1, ndim - 1)

    def moved(value, to=-1):
        """``value``'s points axis moved to ``to`` (counted from the end: -2 for x with
        columns, whose negative axes are one further out than y's)."""
        source = axis + to + 1 if axis < 0 else axis
        return torch.movedim(value, source, to) if isinstance(value, torch.Tensor) \
            else np.moveaxis(np.asarray(value), source, to)

    y = moved(y)
    shape, n = tuple(y.shape[:-1]), y.shape[-1]

    def flat(value, name, trailing=()):
        """(B, N, *trailing); an (N, *trailing) value shared by every series as it is."""
        if value is None:
            return None
        if np.ndim(value) == 1 + len(trailing) and last:
            return value
        value = moved(value, -1 - len(trailing))
        target = (*y.shape, *trailing)
        try:
            value = value.expand(*target) if isinstance(value, torch.Tensor) else \
                np.broadcast_to(value, target)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to y's "
                             f"{tuple(y.shape)}" + (f" (with {trailing[0]} columns)"
                                                    if trailing else "")) from None
        return value.reshape(-1, n, *trailing)

    if lengths is not None:
        lengths = np.asarray(lengths).reshape(-1) if not isinstance(lengths, torch.Tensor) \
            else lengths.reshape(-1)
    return shape, (flat(x, "x", () if columns is None else (columns,)), y.reshape(-1, n),
                   flat(weights, "weights"), lengths, flat(mask, "mask"))


def _epochs(opts: Options, model: Model) -> int:
    """The iteration cap: as given, or MINPACK's budget for a model's Levenberg-Marquardt
    (100 (k + 1) evaluations; hard problems from far starts need hundreds)."""
    return 100 * (model.k + 1) if opts.epochs is None else opts.epochs


def config(opts: Options) -> SolverConfig:
    """The solvers' configuration of resolved options: losses and models as torch objects
    (user callables checked here: they need torch)."""
    model = _resolved_model(opts.model, opts.degree, opts.p0, opts.param_names, opts.bounds)
    return SolverConfig(degree=opts.degree, model=model, loss=resolve_loss(opts.loss),
                        f_scale=opts.f_scale, lr=opts.lr, epochs=_epochs(opts, model), tol=opts.tol,
                        init=opts.init, seed=opts.seed, history_every=opts.history_every,
                        history_sample=opts.history_sample, track=opts.track,
                        restarts=opts.restarts, covariance=opts.covariance)


def solve(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    """``fit`` on resolved options: one precision pass, then the solve (a float32 fit's
    series that float32 cannot hold, or whose fit it limits, solved again in float64)."""
    configure_threads()
    opts = opts.with_(device=resolve_device(opts.device, x, y))
    inputs = checked_inputs(x, y, weights, lengths, mask, device=opts.device)
    _check_x_columns(config(opts).model, inputs)
    if opts.solver == "exact":  # float64 statistics whatever the dtype: one pass, then a solve
        if inputs.y.numel() == 0:
            return solve_without_points(inputs.y.shape[0], opts.device, config(opts),
                                        opts.solver)
        return exact_fit(inputs, config(opts), vectorizer(opts), opts)
    result = _solve_iterative(x, y, weights, lengths, mask, opts)
    far = out_of_range_rows(inputs)
    return result.marked(far, Status.OUT_OF_RANGE) if bool(far.any()) else result


def _check_x_columns(model: Model, inputs) -> None:
    """A one-line error where x's column count is not the model's (``Model.x_columns``)."""
    columns = inputs.x.shape[-1] if inputs.x.ndim == 3 else 1
    wanted = model.x_columns
    if wanted is None or wanted == columns:
        return
    if model.is_poly:
        raise ValueError(f"x has {columns} columns but the polynomial takes one; fit x with "
                         "several columns with a model (model=...)")
    shape = "(..., N)" if wanted == 1 else f"(..., N, {wanted})"
    raise ValueError(f"model {model.name} needs x with {wanted} column"
                     f"{'s' if wanted > 1 else ''} (shape {shape}), got {columns}")


def _solve_iterative(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    if opts.dtype == "float32" and float32_overflows(y):  # huge |y| would cast to inf
        wide = float32_unsafe_rows(y)
        if wide.any():
            return _fit_wide_apart(x, y, weights, lengths, mask, wide, opts)
    result = _solve_points(x, y, weights, lengths, mask, opts)
    wide = _needs_float64(result, y) if opts.dtype == "float32" else None
    if wide is None:
        return result
    if result.history is None and np.ndim(y) == 2:
        # Rows are independent: redo only the flagged ones (a history would need them
        # merged back in, which the group path does).
        return _with_float64_rows(result, x, y, weights, lengths, mask, wide, opts)
    return _fit_wide_apart(x, y, weights, lengths, mask, wide, opts)


def _solve_points(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    """The iterative solvers' fit in ``opts.dtype``, on the points."""
    cfg, vectorize = config(opts), vectorizer(opts)
    problem = make_problem(x, y, weights, lengths, mask, dtype=getattr(torch, opts.dtype),
                           device=opts.device, centre_x=cfg.model.is_poly)
    if cfg.loss.likelihood:
        w, _, y_used = vectorize(used_points, Series.of(problem))
        if bool(((w > 0) & (y_used < 0)).any()):
            raise ValueError(f"loss {cfg.loss.name} needs counts y >= 0")
    if cfg.loss.reduces and bool((vectorize(used_points, Series.of(problem))[0] != 1).any()):
        raise ValueError("a loss callable that returns a scalar cannot skip padded, masked, "
                         "weighted or non-finite points; return per-point losses instead")
    if problem.y.numel() == 0:
        return solve_without_points(problem.batch_size, problem.device, cfg, opts.solver)
    if not cfg.model.is_poly:
        return solve_model(problem, cfg, vectorize, opts.solver, opts.p0)
    if opts.solver == "newton":
        return solve_newton(problem, cfg, vectorize)
    return solve_descent(problem, cfg, vectorize, opts.solver)


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


def _with_float64_rows(result: FitResult, x, y, weights, lengths, mask, wide: np.ndarray,
                       opts: Options) -> FitResult:
    """``result`` with its ``wide`` rows fitted again in float64."""
    rows = np.flatnonzero(wide)
    part = _solve_points(_x_rows(x, y, rows), take_rows(y, rows, 2),
                         take_rows(weights, rows, 2), take_rows(lengths, rows, 1),
                         take_rows(mask, rows, 2),
                         opts.with_(dtype="float64", init=take_rows(opts.init, rows, 2),
                                    p0=take_rows(opts.p0, rows, 2), track=()))
    return result.with_rows(torch.from_numpy(rows), part)


def _fit_wide_apart(x, y, weights, lengths, mask, wide: np.ndarray, opts: Options):
    """Fit the ``wide`` series (beyond float32's range, or limited by its rounding) in
    float64, the others in float32."""
    def fit_group(rows, group: Options):
        return _solve_points(_x_rows(x, y, rows), take_rows(y, rows, 2),
                             take_rows(weights, rows, 2), take_rows(lengths, rows, 1),
                             take_rows(mask, rows, 2),
                             group.with_(dtype="float64" if wide[rows[0]] else "float32"))

    if np.ndim(y) == 1:  # one series
        return _solve_points(x, y, weights, lengths, mask, opts.with_(dtype="float64"))
    groups = [rows for rows in (np.flatnonzero(~wide), np.flatnonzero(wide)) if len(rows)]
    return fit_in_groups(groups, len(wide), fit_group, opts)


def fit_in_groups(groups: list[np.ndarray], batch: int, fit_group: Callable,
                   opts: Options) -> FitResult:
    """Fit a batch as disjoint groups of rows, ``fit_group(rows, group_options)`` each;
    results and training histories come back in row order. ``track``, ``history_sample``
    and a random ``init`` refer to the whole batch, so no number depends on the grouping."""
    track = opts.track
    if track is None:  # the default spread, over the whole batch
        track = sorted({round(i * (batch - 1) / 4) for i in range(5)}) if batch else []
    track = np.asarray(track, dtype=np.int64)
    init = opts.init
    if isinstance(init, str) and init == "random" and opts.solver in ("gd", "adam"):
        # (by position in the whole batch; Newton starts from the exact fit instead)
        init = random_init(opts.seed, 0, batch, opts.degree + 1)

    parts = [fit_group(rows, opts.with_(
        track=tuple(np.flatnonzero(np.isin(rows, track)).tolist()),
        history_sample=-(-opts.history_sample * len(rows) // batch),
        init=take_rows(init, rows, 2), p0=take_rows(opts.p0, rows, 2))) for rows in groups]
    positions = [torch.from_numpy(rows) for rows in groups]
    histories = [part.history for part in parts]
    history = None if histories[0] is None else History.merge(histories, positions)
    order = torch.from_numpy(np.argsort(np.concatenate(groups), kind="stable"))
    fields = {}
    for field in parts[0].fields:
        joined = torch.cat([getattr(part, field) for part in parts])
        fields[field] = joined[order.to(joined.device)]
    return dataclasses.replace(parts[0], history=history, **fields)


def _x_rows(x, y, rows: np.ndarray):
    """Rows of x, (B, N) or (B, N, d); a shared (N,) or (N, d) x as is."""
    per_series = np.ndim(y) + 1 if x_columns_of(np.shape(x), np.shape(y)) is not None \
        else np.ndim(y)
    return take_rows(x, rows, per_series)


def take_rows(value, rows: np.ndarray, per_series_ndim: int):
    """Rows of a per-series argument (one with ``per_series_ndim`` dims); shared ones as is."""
    if value is None or np.ndim(value) != per_series_ndim:
        return value
    return value[torch.from_numpy(rows)] if isinstance(value, torch.Tensor) else \
        np.asarray(value)[rows]
