"""Solvers for any model ``f(x, params)``: Levenberg-Marquardt (``newton``) and GD/Adam.

Like the polynomial solvers these are pure ``(problem, config, vectorize)`` functions on
per-series kernels that the engine vmaps (and compiles when it pays). A model's parameters
are fitted in the user's own parametrisation and x units (no frame: a nonlinear model is
not invariant under shifting x).

Levenberg-Marquardt: with ``J`` the Jacobian of the predictions (``torch.func.jacrev``,
which compiles on torch 2.13; ``jacfwd`` does not), ``v = dL/dpred`` and ``h = d2L/dpred2``
(per point, clipped at 0: for MSE ``2 w / sum w``; for robust losses the IRLS-like curvature
of scipy's rho), the step solves ``(A + mu diag(A)) delta = -J^T v`` with
``A = J^T diag(h) J``. A step is kept only if it lowers the loss (then mu shrinks), else mu
grows; a series whose mu explodes stops ``not_converged``. Converged: half the squared
Newton decrement ``g^T A^-1 g`` below ``tol * (|loss| + floor)``, the test the polynomial
solvers use. Box bounds are kept by projecting every step onto the box; a parameter held at
a bound (its gradient pushing outward) is left out of the step and of the convergence test. Standard errors come
from the Jacobian at the solution, as for polynomials: ``s^2 (J^T W J)^-1`` (MSE) or
Huber's M-estimator form (robust losses); NaN for user losses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import grad, jacrev

from . import linalg
from .diagnostics import finalize
from .kernel import factory
from .linalg import Mat, Vec
from .losses import Loss
from .models import Model
from .problem import FitResult, Problem, Series, used_points
from .solvers import (
    EAGER_S_PER_POINT,
    OPTIMIZERS,
    LoopState,
    SolverConfig,
    _columns,
    _consts,
    _fit_result,
    _Recorder,
    _stack,
    _tracked,
    _train,
    _zeros,
    descent_chunk,
    eager_seconds,
)


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


def _free(model: Model, p: Vec, gradient: Vec, matrix: Mat) -> tuple[Vec, Mat]:
    """Gradient and curvature of the parameters not held at a bound: a parameter at its
    bound whose gradient pushes outward is held (its row and column become the identity's,
    its gradient 0), so steps and the convergence test see the free parameters only."""
    if not model.bounded:
        return gradient, matrix
    lower = model.lower or (-torch.inf,) * model.k
    upper = model.upper or (torch.inf,) * model.k
    held = [((pj <= lo) & (gj > 0)) | ((pj >= hi) & (gj < 0))
            for pj, gj, lo, hi in zip(p, gradient, lower, upper)]
    gradient = tuple(torch.where(h, 0, gj) for h, gj in zip(held, gradient))
    matrix = tuple(tuple(torch.where(held[i] | held[j], float(i == j), a)
                         for j, a in enumerate(row)) for i, row in enumerate(matrix))
    return gradient, matrix


@factory
def setup_kernel(model: Model):
    """Per series: its points for the model, count, weighted total squares, mean y."""
    def kernel(series: Series, consts):
        w, x, y = used_points(series)
        if model.domain is not None:
            w = torch.where(model.domain(x), w, 0)
        wsum = w.sum()
        xbar = torch.where(wsum > 0, (w * x).sum() / wsum.clamp(min=1e-30), 1)
        ybar = torch.where(wsum > 0, (w * y).sum() / wsum.clamp(min=1e-30), 0)
        data = ModelData(torch.where(w > 0, x, xbar), torch.where(w > 0, y, 0), w)
        return data, (w > 0).sum(), (w * (y - ybar) ** 2).sum(), ybar, wsum
    return kernel


@factory
def model_objective(model: Model, loss: Loss):
    def objective(p: Vec, data: ModelData, consts):
        pred = model.f(data.x, torch.stack(p))
        return loss.series_loss(pred, data.y, data.w, consts.f_scale)
    return objective


@factory
def gauss_newton(model: Model, loss: Loss):
    """Per series at ``p``: loss, gradient, Gauss-Newton curvature and Jacobian columns."""
    k = model.k

    def evaluate(p: Vec, data: ModelData, consts):
        def predictions(*q):
            return model.f(data.x, torch.stack(q))

        pred = predictions(*p)
        columns = jacrev(predictions, argnums=tuple(range(k)))(*p)

        def series_loss(values):
            return loss.series_loss(values, data.y, data.w, consts.f_scale)

        slope = grad(series_loss)(pred)
        curvature = grad(lambda values: grad(series_loss)(values).sum())(pred).clamp(min=0)
        gradient = tuple((c * slope).sum() for c in columns)
        matrix = tuple(tuple((curvature * ci * cj).sum() for cj in columns) for ci in columns)
        return series_loss(pred), gradient, matrix, pred, columns
    return evaluate


def _decrement_ok(matrix: Mat, gradient: Vec, value, floor, consts):
    decrement2, ok = linalg.inverse_quadratic(matrix, gradient, consts.pivot_tol)
    return ok & (decrement2 / 2 <= consts.tol * (value.abs() + floor))


@factory
def lm_step(model: Model, loss: Loss):
    """Per series: one Levenberg-Marquardt iteration (see the module docstring)."""
    evaluate = gauss_newton(model, loss)
    objective = model_objective(model, loss)

    def step(p: Vec, mu, iterations, frozen, data: ModelData, floor, consts):
        value, gradient, matrix, _, _ = evaluate(p, data, consts)
        gradient, matrix = _free(model, p, gradient, matrix)
        converged = _decrement_ok(matrix, gradient, value, floor, consts)
        active = ~frozen  # a series that just converged still takes this step
        k = len(p)  # (one more, nearly Gauss-Newton, step squares its error for free)
        scale = sum(matrix[j][j] for j in range(k)) / k + torch.finfo(value.dtype).tiny
        damped = tuple(tuple(a + mu * (a + 1e-9 * scale) if i == j else a
                             for j, a in enumerate(row)) for i, row in enumerate(matrix))
        delta, ok = linalg.solve(damped, tuple(-g for g in gradient), consts.pivot_tol)
        candidate = _project(model, tuple(pj + dj for pj, dj in zip(p, delta)))
        new_value = objective(candidate, data, consts)
        accept = active & ok & torch.isfinite(new_value) & (new_value <= value)
        p = tuple(torch.where(accept, c, pj) for c, pj in zip(candidate, p))
        mu = torch.where(accept, mu / 3, torch.where(active, (4 * mu).clamp(min=1e-4), mu))
        iterations = iterations + (active & ~converged)
        stop = converged | ~torch.isfinite(value) | (mu > 1e10)
        return p, mu, iterations, frozen | stop, torch.where(accept, new_value, value)
    return step


@factory
def final_kernel(model: Model, loss: Loss, newton: bool):
    """Per series: last convergence check, diagnostics, standard errors, status."""
    evaluate = gauss_newton(model, loss)

    def kernel(p: Vec, data: ModelData, n, sst, ybar, wsum, floor, loss0, consts):
        if model.canonical is not None:
            p = model.canonical(p)
        value, gradient, matrix, pred, columns = evaluate(p, data, consts)
        converged = _decrement_ok(*reversed(_free(model, p, gradient, matrix)), value, floor,
                                  consts)
        r = data.y - pred
        used = data.w > 0
        sse = (data.w * r * r).sum()
        k = len(p)
        if loss.user is not None:
            spread, weights = torch.full_like(value, torch.nan), data.w
        elif loss.is_mse:
            spread, weights = sse, data.w
        else:
            psi, dpsi = loss.psi(r, consts.f_scale)
            weights = data.w * dpsi
            spread = (data.w * psi**2).sum() / (weights.sum() / wsum) ** 2
        information = tuple(tuple((weights * ci * cj).sum() for cj in columns)
                            for ci in columns)
        cov, identified = linalg.inverse(information, consts.pivot_tol)
        sigma2 = spread / (n - k).clamp(min=1)
        stderr = tuple(torch.where((n > k) & identified,
                                   torch.sqrt((cov[i][i] * sigma2).clamp(min=0)), torch.nan)
                       .to(torch.float64) for i in range(k))
        summary = {"loss": value,
                   "rmse": torch.sqrt(torch.where(used, r * r, 0).sum() / n.clamp(min=1)),
                   "r2": torch.where(sst > 0, 1 - sse / sst, torch.nan),
                   "level": torch.sqrt(ybar**2 + sst / wsum.clamp(min=1e-30)),
                   "params": tuple(pj.to(torch.float64) for pj in p), "stderr": stderr}
        _, solvable = linalg.cholesky(matrix, consts.pivot_tol)
        diverged = ~torch.isfinite(value) | (value > 10 * loss0)
        return finalize(summary, n, solvable | ~torch.isfinite(value), converged, diverged,
                        check_precision=newton)
    return kernel


def initial_params(model: Model, problem: Problem, data: ModelData, p0) -> torch.Tensor:
    """(B, k) starting values: ``p0`` as given ((k,) or (B, k)), a callable ``p0(x, y)`` on
    one series (vmapped; unused points arrive as NaN), or the family's own start."""
    shape = (problem.batch_size, model.k)
    if p0 is None:
        start = model.start(data.x, data.y, data.w)
    elif callable(p0):
        x = torch.where(data.w > 0, data.x, torch.nan)
        y = torch.where(data.w > 0, data.y, torch.nan)
        start = torch.func.vmap(lambda xi, yi: torch.as_tensor(p0(xi, yi)))(x, y)
    else:
        start = torch.as_tensor(p0, dtype=problem.dtype, device=problem.device)
    if tuple(start.shape) not in ((model.k,), shape):
        raise ValueError(f"p0 must have shape ({model.k},) or {shape}, got "
                         f"{tuple(start.shape)}")
    return torch.nan_to_num(start.to(problem.dtype).expand(shape))


def solve_model(problem: Problem, cfg: SolverConfig, vectorize, solver: str, p0) -> FitResult:
    """Fit ``cfg.model`` to every series: ``newton`` (Levenberg-Marquardt), ``gd``, ``adam``."""
    model, loss = cfg.model, cfg.loss
    consts = _consts(cfg, problem)
    one_pass = EAGER_S_PER_POINT["careful"] * problem.y.numel()
    data, n, sst, ybar, wsum = vectorize(setup_kernel(model), Series.of(problem), consts,
                                         eager_s=one_pass)
    eps = torch.finfo(problem.dtype).eps
    floor = eps * sst / wsum.clamp(min=eps) + torch.finfo(problem.dtype).tiny
    start = initial_params(model, problem, data, p0)
    p = _project(model, _columns(start))
    structural = n < model.k
    objective = model_objective(model, loss)
    loss0 = vectorize(objective, p, data, consts, eager_s=one_pass)
    tracked = _tracked(cfg, problem.batch_size, problem.device)
    recorder = _Recorder(cfg, problem.batch_size, tracked, _stack(p)[tracked].to(torch.float64),
                         structural)
    # A model's step costs some tens of passes over the points (Jacobian, curvature).
    cost = eager_seconds("newton" if solver == "newton" else "gd", False, problem.batch_size,
                         problem.y.numel(), cfg.epochs) * 10
    if solver == "newton":
        step = lm_step(model, loss)

        def call(state: LoopState, inputs, _):
            *new, value = vectorize(step, *state, *inputs, consts, eager_s=cost)
            return LoopState(*new), value

        state = LoopState(p, _zeros(problem), _zeros(problem, torch.int64), structural)
        state = _train(call, state, (data, floor), cfg, recorder, loss0, per_call=1,
                       sync_every=1)
    else:
        chunk = descent_chunk(objective, solver, cfg.unroll, model.lower, model.upper)
        identity = tuple(tuple(torch.ones_like(n, dtype=problem.dtype) if i == j else
                               torch.zeros_like(n, dtype=problem.dtype)
                               for j in range(model.k)) for i in range(model.k))
        def call(state: LoopState, inputs, epoch0: int):
            epoch = torch.tensor(epoch0, device=problem.device)
            *new, value = vectorize(chunk, *state, *inputs, epoch, consts, eager_s=cost)
            return LoopState(*new), value

        state = LoopState(p, OPTIMIZERS[solver]().init(p), _zeros(problem, torch.int64),
                          structural)
        state = _train(call, state, (identity, data, floor), cfg, recorder, loss0,
                       per_call=cfg.unroll, sync_every=max(1, 1000 // cfg.unroll))
    out = vectorize(final_kernel(model, loss, solver == "newton"), state.params, data, n, sst,
                    ybar, wsum, floor, loss0, consts, eager_s=cost / max(cfg.epochs, 1))
    return _fit_result(out, state.iterations, cfg, solver, recorder.history())
