"""Solvers for any model ``f(x, params)``: Levenberg-Marquardt (``newton``) and GD/Adam.

What is model-specific lives here: a series' points for the model, predictions, the
Jacobian, bounds and the final diagnostics. The iteration itself (damped step, acceptance,
damping update, convergence test; GD/Adam chunks; the host loop) is ``batchfit.fitting.loop``'s,
shared with the polynomial solvers. A model's parameters are fitted in the user's own
parametrisation and x units (no frame: a nonlinear model is not invariant under shifting x).

Levenberg-Marquardt: with ``J`` the Jacobian of the predictions (for a pointwise model one
backward pass per point, ``point_jacobian``; else k passes, ``jacobian``), ``v = dL/dpred``
and ``h = d2L/dpred2`` (per point, clipped at 0: closed forms for built-in losses, the
IRLS-like curvature of scipy's rho), ``loop.iterate`` steps on ``g = J^T v`` and
``A = J^T diag(h) J``; each step is three kernels over the points (``lm_call``). Box bounds are kept
by projecting every step onto the box; a parameter held at a bound (its gradient pushing
outward) is left out of the step and of the convergence test. ``restarts`` fits every series
from more starting points and keeps the best converged fit. Standard errors come from the
Jacobian at the solution, as for polynomials: ``s^2 (J^T W J)^-1`` (MSE) or Huber's
M-estimator form (robust losses); NaN for user losses. ``poisson`` (counts): LM on its
slope ``2 (1 - y / mu)`` and Fisher curvature ``2 / mu`` per prediction, standard errors from
the inverse Fisher information ``(J^T diag(w / mu) J)^-1`` (no residual scale).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import grad, jacfwd, jacrev, vjp, vmap

from batchfit.core.keys import factory
from batchfit.core.names import Status
from batchfit.fitting import linalg, loop
from batchfit.fitting.data import FitResult, Problem, Series, used_points
from batchfit.fitting.diagnostics import finalize
from batchfit.fitting.linalg import Mat, Vec
from batchfit.fitting.loop import (
    OPTIMIZERS,
    LoopState,
    Recorder,
    SolverConfig,
    columns,
    consts_of,
    descent_chunk,
    fit_result,
    stack,
    tracked_series,
    train,
    zeros,
)
from batchfit.fitting.losses import Loss
from batchfit.fitting.models import Model
from batchfit.fitting.solvers import EAGER_S_PER_POINT, eager_seconds


class ModelData(NamedTuple):
    """One series for a model: unused points have weight 0 and sit at the series' mean x
    (inside the model's domain, so their predictions stay finite)."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor


def _project(model: Model, p: Vec) -> Vec:
    if not model.bounded:
        return p
    lower = model.lower or (-torch.inf,) * model.k
    upper = model.upper or (torch.inf,) * model.k
    return tuple(pj.clamp(min=lo, max=hi) for pj, lo, hi in zip(p, lower, upper))


def _free(model: Model, p: Vec, gradient: Vec, matrix: Mat):
    """Gradient and curvature of the parameters not held at a bound, and which are held: a
    parameter at its bound whose gradient pushes outward is held (its row and column become
    the identity's, its gradient 0), so steps and the convergence test see the free
    parameters only. ``held`` is None for an unbounded model."""
    if not model.bounded:
        return gradient, matrix, None
    lower = model.lower or (-torch.inf,) * model.k
    upper = model.upper or (torch.inf,) * model.k
    held = tuple(((pj <= lo) & (gj > 0)) | ((pj >= hi) & (gj < 0))
                 for pj, gj, lo, hi in zip(p, gradient, lower, upper))
    gradient = tuple(torch.where(h, 0, gj) for h, gj in zip(held, gradient))
    matrix = tuple(tuple(torch.where(held[i] | held[j], float(i == j), a)
                         for j, a in enumerate(row)) for i, row in enumerate(matrix))
    return gradient, matrix, held


@factory
def setup_kernel(model: Model):
    """Per series: its points for the model, count, weighted total squares, mean y."""
    def kernel(series: Series, consts):
        w, x, y = used_points(series)
        if model.domain is not None:
            w = torch.where(model.domain(x), w, 0)
        wsum = w.sum()
        wx = w[..., None] if x.ndim > y.ndim else w  # (x with d columns: per coordinate)
        xbar = torch.where(wsum > 0, (wx * x).sum(0) / wsum.clamp(min=1e-30), 1)
        ybar = torch.where(wsum > 0, (w * y).sum() / wsum.clamp(min=1e-30), 0)
        data = ModelData(torch.where(wx > 0, x, xbar), torch.where(w > 0, y, 0), w)
        return data, (w > 0).sum(), (w * (y - ybar) ** 2).sum(), ybar, wsum
    return kernel


def predict(model: Model, x: torch.Tensor, p: Vec) -> torch.Tensor:
    """``model.f`` on one series: parameters as a tuple where the model takes one (its
    ``p[i]`` are then the kernel's own tensors, not selections of a stacked vector, whose
    derivatives compile to masked sums over every parameter), else stacked (the contract)."""
    return model.f(x, tuple(p) if model.tuple_params else torch.stack(p))


def call_form(model: Model, x: torch.Tensor, p: torch.Tensor) -> Model:
    """``model`` with the faster ways of calling a user's ``f`` that give its own answers on
    one series (``x`` (N,), ``p`` (k,)): ``tuple_params``, then ``pointwise``. A way that
    fails, or answers otherwise (a model that reads ``x`` as a whole, or ``params`` as a
    tensor), is not used; built-in models are known already."""
    if model.builtin:
        return model
    tolerance = dict(rtol=1e-5 if x.dtype == torch.float32 else 1e-12, atol=0,
                     equal_nan=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # (a probe's own complaints are not the user's)
        expected = model.f(x, p)

        def agrees(candidate: Model, evaluate: Callable) -> bool:
            try:
                got = evaluate(candidate)
            except Exception:  # noqa: BLE001 (any failure: that way of calling is not used)
                return False
            return isinstance(got, torch.Tensor) and got.shape == expected.shape and \
                bool(torch.allclose(got, expected, **tolerance))

        params = tuple(p.unbind())
        as_tuple = dataclasses.replace(model, tuple_params=True)
        if agrees(as_tuple, lambda m: predict(m, x, params)):
            model = as_tuple
        pointwise = dataclasses.replace(model, pointwise=True)
        if agrees(pointwise, lambda m: vmap(lambda xn: predict(m, xn, params))(x)):
            model = pointwise
    return model


@factory
def model_objective(model: Model, loss: Loss):
    def objective(p: Vec, data: ModelData, consts):
        return loss.series_loss(predict(model, data.x, p), data.y, data.w, consts.f_scale)
    return objective


def _traced() -> bool:
    """Whether this call is being traced for compilation (dynamo, or make_fx for a kernel
    kept ahead of time), where forward-mode AD does not work in torch 2.13."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None


def jacobian(predictions: Callable, p: Vec, n_points: int):
    """Predictions and their Jacobian columns ``d pred / d p_j`` for one series.

    When there are fewer parameters than points (the usual case) the columns are the k
    rows of the linear map ``u -> J^T u`` (the pullback of one ``vjp``), differentiated by
    ``jacrev``: k reverse passes over the points, O(N k) work and memory, the cost of forward
    mode. (torch 2.13's forward mode, ``jvp``/``jacfwd``, does not compile under vmap with
    dynamic shapes; this does. Eager, forward mode itself is faster: one ``jvp`` per
    parameter.) Plain ``jacrev`` of the predictions, one pass per point and O(N^2) under
    vmap, only when N <= k.
    """
    k = len(p)
    if n_points <= k:
        return predictions(*p), jacrev(predictions, argnums=tuple(range(k)))(*p)
    if not _traced():  # eager: forward mode itself, no autograd graph
        def with_value(*q):
            value = predictions(*q)
            return value, value

        columns, pred = jacfwd(with_value, argnums=tuple(range(k)), has_aux=True)(*p)
        return pred, columns
    pred, pullback = vjp(predictions, *p)
    return pred, jacrev(pullback)(torch.zeros_like(pred))


def point_jacobian(model: Model, x: torch.Tensor, p: Vec):
    """Predictions and Jacobian columns of a pointwise model (each prediction depends on its
    own x only): the gradient of every point's prediction, by reverse mode per point
    (vmapped over the points). One backward pass gives all k derivatives of a point, so
    the cost is a few model evaluations whatever k, eager or compiled."""
    def point(xn, *q):
        value = predict(model, xn, q)
        return value, value

    k = len(p)
    columns, pred = vmap(grad(point, argnums=tuple(range(1, k + 1)), has_aux=True),
                         in_dims=(0,) + (None,) * k)(x, *p)
    return pred, columns


def predictions_and_jacobian(model: Model, x: torch.Tensor, p: Vec):
    if model.pointwise:
        return point_jacobian(model, x, p)
    return jacobian(lambda *q: predict(model, x, q), p, x.shape[0])  # (x (N,) or (N, d))


def loss_slopes(loss: Loss, pred, data: ModelData, consts):
    """The series' loss, and per prediction its first derivative and curvature (clipped at
    0): in closed form for built-in losses, by torch.func for a user's."""
    if loss.user is None:
        value, slope, bend = loss.pred_derivatives(pred, data.y, consts.f_scale)
        wsum = data.w.sum()
        return loss.weighted(data.w, value).sum() / wsum, data.w * slope / wsum, \
            (data.w * bend / wsum).clamp(min=0)

    def series_loss(values):
        return loss.series_loss(values, data.y, data.w, consts.f_scale)

    curvature = grad(lambda values: grad(series_loss)(values).sum())(pred).clamp(min=0)
    return series_loss(pred), grad(series_loss)(pred), curvature


def normal_equations(columns, slope, curvature):
    """``J^T slope`` and ``J^T diag(curvature) J`` of the Jacobian columns. Compiled, as k +
    k (k + 1) / 2 sums that fuse into one pass over the points; eager, as two matrix
    products (a BLAS call each instead of that many passes)."""
    k = len(columns)
    if _traced():
        weighted = tuple(c * curvature for c in columns)
        upper = {(i, j): (weighted[i] * columns[j]).sum() for i in range(k) for j in range(i, k)}
        matrix = tuple(tuple(upper[min(i, j), max(i, j)] for j in range(k)) for i in range(k))
        return tuple((c * slope).sum() for c in columns), matrix
    stacked = torch.stack(columns)
    matrix = (stacked * curvature) @ stacked.T
    return tuple((stacked @ slope).unbind(0)), tuple(tuple(row.unbind(0)) for row in matrix.unbind(0))


@factory
def gauss_newton(model: Model, loss: Loss):
    """Per series at ``p``: loss, gradient, Gauss-Newton curvature, predictions, Jacobian
    columns and the loss's curvature per prediction."""

    def evaluate(p: Vec, data: ModelData, consts):
        pred, jac = predictions_and_jacobian(model, data.x, p)
        value, slope, curvature = loss_slopes(loss, pred, data, consts)
        gradient, matrix = normal_equations(jac, slope, curvature)
        return value, gradient, matrix, pred, jac, curvature
    return evaluate


@factory
def normal_kernel(model: Model, loss: Loss):
    """Per series: the loss, its gradient and Gauss-Newton matrix at ``p`` (LM's first pass
    over the points in a step)."""
    evaluate = gauss_newton(model, loss)

    def kernel(p: Vec, data: ModelData, consts):
        return evaluate(p, data, consts)[:3]
    return kernel


@factory
def force_kernel(model: Model, loss: Loss):
    """Per series: the right-hand side of the geodesic acceleration of ``velocity`` at ``p``
    (Transtrum & Sethna 2012): the second derivative of the predictions along the step, by
    finite differences of step 0.1 (Transtrum's), pulled back through J."""
    def kernel(p: Vec, velocity: Vec, data: ModelData, consts):
        pred, jac = predictions_and_jacobian(model, data.x, p)
        _, _, curvature = loss_slopes(loss, pred, data, consts)
        # (literals: dynamo would trace a float global as a symbol that vmap rejects)
        moved = predict(model, data.x, tuple(pj + 0.1 * v for pj, v in zip(p, velocity)))
        along = sum(v * column for v, column in zip(velocity, jac))
        bend = curvature * (20 * ((moved - pred) * 10 - along))
        return tuple(-(column * bend).sum() for column in jac)
    return kernel


# LM's cost model, measured on a 2-core Xeon with torch 2.13 (8 parameters, 250 points):
# eager (chunked, see the engine), about 4e-8 s per point, parameter and step, and a fit
# takes some 15 steps. A model whose code has no fingerprint (so no kept kernels) is
# compiled in-process only for batches whose eager fit would take longer than its LM
# kernels' compile: 113 s cold for the 8-parameter model (inductor's cache cold).
EAGER_S_PER_LM_POINT = 4e-8
LM_TYPICAL_STEPS = 15
LM_COMPILE_S = 120.0


def lm_call(model: Model, loss: Loss, vectorize, consts, cost: float, policy: dict):
    """``train``'s call for Levenberg-Marquardt: one iteration with geodesic acceleration
    for the whole batch, ``loop.iterate`` on the Gauss-Newton curvature of the free
    parameters, every candidate projected onto the box. Its passes over the points are
    per-series kernels (``normal_kernel``, ``force_kernel``, ``model_objective``), each
    vmapped and compiled by the engine's policy; the small k x k algebra between them runs
    on the whole batch at once."""
    normal, force, objective = normal_kernel(model, loss), force_kernel(model, loss), \
        model_objective(model, loss)

    def call(state: LoopState, inputs, _):
        p, damping, iterations, frozen = state
        data, floor = inputs
        value, gradient, matrix = vectorize(normal, p, data, consts, eager_s=cost, **policy)
        gradient, matrix, held = _free(model, p, gradient, matrix)

        def accelerate(velocity: Vec) -> Vec:
            pull = vectorize(force, p, velocity, data, consts, eager_s=cost, **policy)
            if held is None:
                return pull
            return tuple(torch.where(h, 0, f) for h, f in zip(held, pull))

        def candidate_loss(candidate):
            return vectorize(objective, candidate, data, consts, eager_s=cost / 3, **policy)

        p, value, damping, converged, stopped = loop.iterate(
            p, value, gradient, matrix, damping, frozen, candidate_loss,
            lambda candidate: _project(model, candidate), floor, consts, accelerate,
            run=loop.algebra(vectorize, cost))
        return LoopState(p, damping, iterations + (~frozen & ~converged), stopped), value
    return call


@factory
def final_kernel(model: Model, loss: Loss, newton: bool, covariance: bool = False):
    """Per series: last convergence check, diagnostics, standard errors (and with
    ``covariance`` the parameters' covariance), status."""
    evaluate = gauss_newton(model, loss)

    def kernel(p: Vec, data: ModelData, n, sst, ybar, wsum, floor, loss0, consts):
        if model.canonical is not None:
            p = model.canonical(p)
        value, gradient, matrix, pred, jac, _ = evaluate(p, data, consts)
        free_gradient, free_matrix, _ = _free(model, p, gradient, matrix)
        converged = loop.decrement_ok(free_matrix, free_gradient, value, floor, consts)
        r = data.y - pred
        used = data.w > 0
        sse = (data.w * r * r).sum()
        k = len(p)
        dof = (n - k).clamp(min=1)
        if loss.user is not None:
            sigma2, weights = torch.full_like(value, torch.nan), data.w
        elif loss.likelihood:  # the inverse Fisher information (J^T diag(w / mu) J)^-1
            weights = torch.where(used & (pred > 0), data.w / torch.where(pred > 0, pred, 1), 0)
            sigma2 = torch.ones_like(value)  # (the variance is the mean's: no scale to fit)
        elif loss.is_mse:
            sigma2, weights = sse / dof, data.w
        else:
            psi, dpsi = loss.psi(r, consts.f_scale)
            weights = data.w * dpsi
            sigma2 = (data.w * psi**2).sum() / (weights.sum() / wsum) ** 2 / dof
        # (the information matrix of every column pair: the normal equations' layout)
        _, information = normal_equations(jac, torch.zeros_like(weights), weights)
        cov, identified = linalg.inverse(information, consts.pivot_tol)
        defined = ((n >= k) if loss.likelihood else (n > k)) & identified
        stderr = tuple(torch.where(defined, torch.sqrt((cov[i][i] * sigma2).clamp(min=0)),
                                   torch.nan).to(torch.float64) for i in range(k))
        summary = {"loss": value,
                   "rmse": torch.sqrt(torch.where(used, r * r, 0).sum() / n.clamp(min=1)),
                   "r2": torch.where(sst > 0, 1 - sse / sst, torch.nan),
                   "level": torch.sqrt(ybar**2 + sst / wsum.clamp(min=1e-30)),
                   "params": tuple(pj.to(torch.float64) for pj in p), "stderr": stderr}
        if covariance:
            summary["covariance"] = tuple(tuple(
                stderr[i] ** 2 if i == j else torch.where(defined, cov[i][j] * sigma2, torch.nan
                                                          ).to(torch.float64)
                for j in range(k)) for i in range(k))
        _, solvable = linalg.cholesky(matrix, consts.pivot_tol)
        return finalize(summary, n, solvable | ~torch.isfinite(value), converged,
                        loop.diverged(value, loss0, floor),
                        check_precision=newton)
    return kernel


def initial_params(model: Model, problem: Problem, data: ModelData, p0) -> torch.Tensor:
    """(B, k) starting values: ``p0`` as given ((k,) or (B, k)), a callable ``p0(x, y)`` on
    one series (vmapped; unused points arrive as NaN), or the family's own start."""
    shape = (problem.batch_size, model.k)
    if p0 is None:
        start = model.start(data.x, data.y, data.w)
    elif callable(p0):
        x = torch.where((data.w > 0).reshape(*data.w.shape, *[1] * (data.x.ndim - 2)),
                        data.x, torch.nan)
        y = torch.where(data.w > 0, data.y, torch.nan)
        start = torch.func.vmap(lambda xi, yi: torch.as_tensor(p0(xi, yi)))(x, y)
    else:
        start = torch.as_tensor(p0, dtype=problem.dtype, device=problem.device)
    if tuple(start.shape) not in ((model.k,), shape):
        raise ValueError(f"p0 must have shape ({model.k},) or {shape}, got "
                         f"{tuple(start.shape)}")
    return torch.nan_to_num(start.to(problem.dtype).expand(shape))


def spread_starts(first: torch.Tensor, restarts: int, seed: int) -> torch.Tensor:
    """(B, 1 + restarts, k) starting points: ``first``, then ``restarts`` copies with every
    parameter scaled by ``10**u``, ``u`` uniform in [-1, 1] (a decade either way, sign kept:
    standard starts are typically off by orders of magnitude, not by a shift); a parameter
    that starts at 0 is drawn as ``u`` itself. Seeded, made on the CPU."""
    batch, k = first.shape
    generator = torch.Generator().manual_seed(seed)
    u = (2 * torch.rand((batch, restarts, k), generator=generator, dtype=torch.float64) - 1)
    u = u.to(first.device, first.dtype)
    base = first[:, None, :]
    jittered = torch.where(base == 0, u, base * 10**u)
    return torch.cat([base, jittered], dim=1)


def multi_start(problem: Problem, cfg: SolverConfig, vectorize, solver: str,
                p0) -> FitResult:
    """``solve_model`` from ``1 + cfg.restarts`` starts per series (``spread_starts`` around
    the first one), all in one batch; per series the converged fit of lowest loss is kept
    (the first start's fit when none converged) and ``converged_starts`` counts the starts
    that converged. The history covers every start; tracked series are followed from their
    first start."""
    copies, batch, k = 1 + cfg.restarts, problem.batch_size, cfg.model.k
    data = vectorize(setup_kernel(cfg.model), Series.of(problem), consts_of(cfg, problem),
                     eager_s=EAGER_S_PER_POINT["careful"] * problem.y.numel())[0]
    starts = spread_starts(initial_params(cfg.model, problem, data, p0), cfg.restarts, cfg.seed)
    rows = torch.arange(batch, device=problem.device).repeat_interleave(copies)
    tracked = tracked_series(cfg, batch, problem.device)
    every = dataclasses.replace(cfg, restarts=0, track=tuple(int(i) * copies for i in tracked),
                                history_sample=cfg.history_sample * copies)
    result = solve_model(problem.take(rows), every, vectorize, solver, starts.reshape(-1, k))
    ok = (result.status == int(Status.OK)).view(batch, copies)
    score = torch.where(ok, result.loss.view(batch, copies), torch.inf)
    best = torch.where(ok.any(dim=1), score.argmin(dim=1), 0)
    chosen = torch.arange(batch, device=best.device) * copies + best
    history = result.history
    if history is not None:
        history = dataclasses.replace(history, tracked=history.tracked // copies)
    return dataclasses.replace(result.take(chosen), history=history,
                               converged_starts=ok.sum(dim=1).to(torch.int64))


def solve_model(problem: Problem, cfg: SolverConfig, vectorize, solver: str, p0) -> FitResult:
    """Fit ``cfg.model`` to every series: ``newton`` (Levenberg-Marquardt), ``gd``, ``adam``;
    from several starts each with ``cfg.restarts`` (``multi_start``)."""
    if cfg.restarts:
        return multi_start(problem, cfg, vectorize, solver, p0)
    model, loss = cfg.model, cfg.loss
    consts = consts_of(cfg, problem)
    if solver == "newton":  # (the whole fit's uncompiled time: every kernel of it is weighed by it)
        cost = EAGER_S_PER_LM_POINT * model.k * problem.y.numel() * LM_TYPICAL_STEPS
        policy = {"compile_s": LM_COMPILE_S, "fan_out": model.k}
    else:  # (a model's GD/Adam epoch costs some tens of passes over the points)
        cost = eager_seconds(solver, False, problem.batch_size, problem.y.numel(),
                             cfg.epochs) * 10
        policy = {}
    data, n, sst, ybar, wsum = vectorize(setup_kernel(model), Series.of(problem), consts,
                                         eager_s=cost)
    eps = torch.finfo(problem.dtype).eps
    floor = eps * sst / wsum.clamp(min=eps) + torch.finfo(problem.dtype).tiny
    start = initial_params(model, problem, data, p0)
    model = call_form(model, data.x[0], start[0])
    cfg = dataclasses.replace(cfg, model=model)
    p = _project(model, columns(start))
    structural = n < model.k
    objective = model_objective(model, loss)
    loss0 = vectorize(objective, p, data, consts, eager_s=cost)
    tracked = tracked_series(cfg, problem.batch_size, problem.device)
    recorder = Recorder(cfg, problem.batch_size, tracked, stack(p)[tracked].to(torch.float64),
                         structural)
    if solver == "newton":
        call = lm_call(model, loss, vectorize, consts, cost, policy)
        state = LoopState(p, loop.start(zeros(problem), model.k), zeros(problem, torch.int64),
                          structural)
        state = train(call, state, (data, floor), cfg, recorder, loss0, per_call=1,
                       sync_every=1, work_per_series=problem.y.shape[-1])
    else:
        chunk = descent_chunk(objective, solver, cfg.unroll, model.lower, model.upper)
        identity = tuple(tuple(torch.ones_like(n, dtype=problem.dtype) if i == j else
                               torch.zeros_like(n, dtype=problem.dtype)
                               for j in range(model.k)) for i in range(model.k))

        def call(state: LoopState, inputs, epoch0: int):
            epoch = torch.tensor(epoch0, device=problem.device)
            *new, value = vectorize(chunk, *state, *inputs, epoch, consts, eager_s=cost)
            return LoopState(*new), value

        state = LoopState(p, OPTIMIZERS[solver]().init(p), zeros(problem, torch.int64),
                          structural)
        state = train(call, state, (identity, data, floor), cfg, recorder, loss0,
                       per_call=cfg.unroll, sync_every=max(1, 1000 // cfg.unroll),
                       work_per_series=problem.y.shape[-1])
    out = vectorize(final_kernel(model, loss, solver == "newton", cfg.covariance),
                    state.params, data, n, sst,
                    ybar, wsum, floor, loss0, consts, eager_s=cost, **policy)
    return fit_result(out, state.iterations, cfg, solver, recorder.history())
