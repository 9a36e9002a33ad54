"""The solvers: exact, newton, gd, adam.

Each is a pure function ``(problem, config, vectorize) -> FitResult``. The maths is written
for ONE series and handed to ``vectorize(fn, *args, eager_s=...)``, the engine's hook that
vmaps it over the batch and compiles it when the estimated eager run time ``eager_s`` makes
that pay (``eager_seconds`` is the cost model); nothing here picks devices or compiles. Per-series vectors are tuples of scalars
(see linalg.py), so batched they are tuples of contiguous (B,) tensors.

Every fit happens in the series' own frame (t in [-1, 1], Chebyshev basis; see models.py).
MSE never revisits the points: its loss, gradient and Hessian come from the per-series sums.
GD and Adam move the raw coefficients p (the seed's parameters, so ``lr`` means what it meant
there) through the fixed linear map ``q = A p`` into the frame; Newton moves q directly.
Convergence everywhere means: the loss is within ``tol`` (relative) of the minimum of the
local quadratic model, i.e. half the squared Newton decrement ``g^T H^-1 g / 2``, which is
invariant to the parametrisation and exact for MSE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.func import grad

from . import linalg, stats
from .diagnostics import finalize, summarise
from .kernel import factory
from .linalg import Mat, Vec, mat_vec
from .losses import Loss
from .models import (
    Model,
    Sums,
    chebyshev_eval,
    chebyshev_terms,
    from_raw_map,
    prepare,
    to_raw_map,
    total_squares,
)
from .problem import FitResult, History, Problem, Series, Status, used_points

# Eager cost model (seconds), measured on a 2-core Xeon with torch 2.13: what a kernel would
# take uncompiled. The engine compiles when this exceeds the cost of a compile.
EAGER_S_PER_POINT = {"exact": 2e-8, "careful": 4e-8, "newton": 4e-7, "descent": 6e-8}
EAGER_S_PER_MOMENT_EPOCH = 2e-7  # one GD/Adam epoch of one MSE series (sums, not points)
EAGER_S_PER_STEP = 1e-3  # fixed cost of one eager epoch or Newton step, however small the batch


def eager_seconds(solver: str, mse: bool, n_series: int, n_points: int, epochs: int) -> float:
    """Estimated uncompiled run time of a fit (n_points: all series together)."""
    if solver == "exact":
        return EAGER_S_PER_POINT["exact"] * n_points
    if solver == "newton":
        steps = 2 if mse else min(epochs, 10)
        return (EAGER_S_PER_POINT["newton"] * n_points + 5 * EAGER_S_PER_STEP) * steps
    per_epoch = (EAGER_S_PER_MOMENT_EPOCH * n_series if mse
                 else EAGER_S_PER_POINT["descent"] * n_points)
    return (per_epoch + EAGER_S_PER_STEP) * epochs


@dataclass(frozen=True)
class SolverConfig:
    degree: int = 2
    loss: Loss | None = None
    f_scale: float = 1.0
    lr: float = 1e-3
    epochs: int = 15000
    tol: float = 1e-6
    init: object = "random"  # "random" (seeded normal, like the seed), "zeros", or (k,)/(B, k)
    seed: int = 0
    history_every: int = 0  # 0 picks about 300 records
    history_sample: int = 1 << 14  # series whose loss the history keeps (for its quantiles)
    track: tuple[int, ...] | None = None  # None: 5 spread over the batch
    unroll: int = 10  # GD/Adam epochs per compiled call
    model: Model | None = None  # None: the polynomial of ``degree``

    @property
    def k(self) -> int:
        return self.degree + 1 if self.model is None or self.model.is_poly else self.model.k


class Consts(NamedTuple):
    """Scalars shared by the whole batch, as 0-d tensors so changing them never recompiles."""

    pivot_tol: torch.Tensor
    f_scale: torch.Tensor
    tol: torch.Tensor
    lr: torch.Tensor
    epochs: torch.Tensor


class MomentData(NamedTuple):
    """MSE in the frame: ``L(q) = (qc^T G qc - 2 qc^T rhs_c + sst) / wsum``, qc = q - ybar e_0."""

    gram: Mat
    rhs_c: Vec
    sst: torch.Tensor
    wsum: torch.Tensor
    ybar: torch.Tensor


class PointData(NamedTuple):
    """Any loss on the raw points, in the frame."""

    t: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor


class LoopState(NamedTuple):
    """What an iterative solver carries from one compiled call to the next, per series."""

    params: Vec  # raw p (GD, Adam) or frame q (Newton)
    aux: object  # optimiser state, or Newton's damping
    iterations: torch.Tensor
    frozen: torch.Tensor  # no further updates: structural failure, converged or diverged


def _consts(cfg: SolverConfig, problem: Problem) -> Consts:
    def scalar(value, dtype=problem.dtype):
        return torch.tensor(value, dtype=dtype, device=problem.device)

    eps = torch.finfo(problem.dtype).eps
    return Consts(pivot_tol=scalar(100 * cfg.k * eps), f_scale=scalar(cfg.f_scale),
                  tol=scalar(cfg.tol), lr=scalar(cfg.lr), epochs=scalar(cfg.epochs, torch.int64))


def _scatter(full, rows: torch.Tensor, part):
    """``full`` with ``part`` written into ``rows``, over any nesting of tuples and dicts."""
    if isinstance(full, dict):
        return {key: _scatter(full[key], rows, part[key]) for key in full}
    if isinstance(full, tuple):
        return tuple(_scatter(f, rows, p) for f, p in zip(full, part))
    return full.index_put((rows,), part.to(full.dtype))


def _columns(matrix: torch.Tensor) -> Vec:
    """(B, k) -> k contiguous (B,) tensors."""
    return tuple(matrix.T.contiguous().unbind(0))


def _stack(vec: Vec) -> torch.Tensor:
    return torch.stack(vec, dim=-1)


def _cast(vec: Vec, dtype) -> Vec:
    return tuple(v.to(dtype) for v in vec)


# ---------------------------------------------------------------- per-series objectives

def moment_objective(q: Vec, data: MomentData, consts: Consts):
    qc = (q[0] - data.ybar,) + tuple(q[1:])
    quad = linalg.dot(qc, mat_vec(data.gram, qc))
    return (quad - 2 * linalg.dot(qc, data.rhs_c) + data.sst) / data.wsum


def moment_hessian(q: Vec, data: MomentData, consts: Consts) -> Mat:
    """The MSE Hessian, 2 G / wsum: constant, so no autograd is spent on it."""
    return tuple(tuple(2 * g / data.wsum for g in row) for row in data.gram)


@factory
def point_objective(loss: Loss) -> Callable:
    def objective(q: Vec, data: PointData, consts: Consts):
        return loss.series_loss(chebyshev_eval(data.t, q), data.y, data.w, consts.f_scale)
    return objective


def _objective(loss: Loss) -> Callable:
    return moment_objective if loss.is_mse else point_objective(loss)


def hessian(objective: Callable, q: Vec, *args) -> Mat:
    """Hessian of a per-series objective, one reverse-over-reverse row at a time.

    ``torch.func.hessian`` (jacfwd) fails under torch.compile in torch 2.13, and ``jacrev``
    stacks its rows into a (k, k) tensor, the layout that splits the compiled loop; k rows of
    ``grad(grad(...)[i])`` stay a tuple of scalars. MSE's Hessian is known in closed form.
    """
    if objective is moment_objective:
        return moment_hessian(q, *args)

    def gradient_entry(i):
        return lambda q, *args: grad(objective)(q, *args)[i]
    return tuple(grad(gradient_entry(i))(q, *args) for i in range(len(q)))


@factory
def convergence_check(objective: Callable) -> Callable:
    """Per series: ``(loss, converged)`` at q, by the Newton decrement test."""
    def check(q: Vec, data, floor, consts: Consts):
        value = objective(q, data, consts)
        gradient = grad(objective)(q, data, consts)
        curvature = hessian(objective, q, data, consts)
        decrement2, ok = linalg.inverse_quadratic(curvature, gradient, consts.pivot_tol)
        return value, ok & (decrement2 / 2 <= consts.tol * (value.abs() + floor))
    return check


# ---------------------------------------------------------------- per-series kernels

@factory
def prepare_kernel(degree: int) -> Callable:
    """Per series: frame, sums, spread of y, the exact MSE solution and whether it exists."""
    def kernel(series: Series, consts: Consts):
        w, x, y = used_points(series)
        sums, _ = prepare(x, y, w, series.x_offset, degree)
        q, solvable = linalg.solve(sums.gram, sums.rhs, consts.pivot_tol)
        return sums, total_squares(y, w, sums.ybar), q, solvable
    return kernel


@factory
def points_kernel(degree: int) -> Callable:
    def kernel(series: Series, consts: Consts):
        w, x, y = used_points(series)
        _, t = prepare(x, y, w, series.x_offset, degree)
        return PointData(t, y, w)
    return kernel


@factory
def final_kernel(loss: Loss, degree: int, newton: bool) -> Callable:
    """Per series, after an iterative solver: last convergence check, diagnostics, status.
    Newton's MSE steps use the sums only, so its answer gets the exact solver's refinement
    step on the points (a Newton step on the point residuals)."""
    check = convergence_check(_objective(loss))

    def kernel(series: Series, sums: Sums, solvable, q: Vec, params, data, floor, loss0,
               consts: Consts):
        value, converged = check(q, data, floor, consts)
        w, x, y = used_points(series)
        _, t = prepare(x, y, w, series.x_offset, degree)
        if newton and loss.is_mse:
            q = refine(t, y, w, sums.gram, q, consts.pivot_tol)
        summary = summarise(t, y, w, sums, q, loss, consts.f_scale, consts.pivot_tol)
        diverged = ~torch.isfinite(value) | (value > 10 * loss0)
        return finalize(summary, sums.n, solvable, converged, diverged, params,
                        check_precision=newton)
    return kernel


def refine(t, y, w, gram: Mat, q: Vec, pivot_tol) -> Vec:
    """One step of iterative refinement of a normal-equations solution (semi-normal
    equations, Bjorck): solve again for the part of the residual the basis still explains.
    Clustered x make the Gram matrix's condition the square of the design's; this step brings
    the error back to about the design's condition times eps, as a QR solve would."""
    r = y - chebyshev_eval(t, q)
    correction = tuple((w * r * tm).sum() for tm in chebyshev_terms(t, len(q) - 1))
    delta, _ = linalg.solve(gram, correction, pivot_tol)
    return tuple(qj + dj for qj, dj in zip(q, delta))


@factory
def exact_kernel(loss: Loss, degree: int) -> Callable:
    """The careful exact fit of one series: prepare, solve, refine, summarise."""
    def kernel(series: Series, consts: Consts):
        w, x, y = used_points(series)
        sums, t = prepare(x, y, w, series.x_offset, degree)
        q, solvable = linalg.solve(sums.gram, sums.rhs, consts.pivot_tol)
        q = refine(t, y, w, sums.gram, q, consts.pivot_tol)
        summary = summarise(t, y, w, sums, q, loss, consts.f_scale, consts.pivot_tol)
        return finalize(summary, sums.n, solvable, torch.ones_like(solvable),
                        torch.zeros_like(solvable), check_precision=True)
    return kernel


def _raw_to_frame(sums: Sums, k: int, dtype) -> Mat:
    return tuple(_cast(row, dtype) for row in from_raw_map(sums.centre_raw, sums.half, k))


def _frame_to_raw(sums: Sums, q: Vec) -> Vec:
    return mat_vec(to_raw_map(sums.centre_raw, sums.half, len(q)), _cast(q, torch.float64))


# ---------------------------------------------------------------- optimisers (optax style)

class Optimizer(NamedTuple):
    """A pair of pure functions: ``init(p) -> state``; ``update(g, state, step, lr)``."""

    init: Callable
    update: Callable


def sgd() -> Optimizer:
    def update(g, state, step, lr):
        return tuple(-lr * gj for gj in g), state
    return Optimizer(init=lambda p: (), update=update)


def adam() -> Optimizer:
    """Adam with torch.optim.Adam's defaults (betas 0.9, 0.999; eps 1e-8).

    The constants are literals on purpose: dynamo traces float variables as symbols, which
    vmap's batching rules reject (torch 2.13).
    """
    def update(g, state, step, lr):
        m, v = state
        m = tuple(0.9 * mj + 0.1 * gj for mj, gj in zip(m, g))
        v = tuple(0.999 * vj + 0.001 * gj * gj for vj, gj in zip(v, g))
        m_scale = -1 / torch.expm1(step * -0.10536051565782628)  # 1 / (1 - 0.9**step)
        v_scale = -1 / torch.expm1(step * -0.0010005003335835344)  # 1 / (1 - 0.999**step)
        delta = tuple(-lr * mj * m_scale / (torch.sqrt(vj * v_scale) + 1e-8)
                      for mj, vj in zip(m, v))
        return delta, (m, v)

    def init(p):
        return (tuple(torch.zeros_like(pj) for pj in p),) * 2
    return Optimizer(init=init, update=update)


OPTIMIZERS = {"gd": sgd, "adam": adam}


def _keep_frozen(active, new, old):
    """``new`` where the series is active, ``old`` where it is frozen, over any tuple nesting."""
    if isinstance(new, tuple):
        return tuple(_keep_frozen(active, n, o) for n, o in zip(new, old))
    return torch.where(active, new, old)


@factory
def descent_chunk(objective: Callable, optimizer_name: str, unroll: int, lower=None,
                  upper=None) -> Callable:
    """Per series: ``unroll`` epochs of GD/Adam on the raw coefficients, then a check.

    Frozen series (structural failures, converged, diverged) keep their parameters through
    ``torch.where``: no host sync, no data-dependent branch. ``lower``/``upper`` (tuples, or
    None): every step is projected onto that box.
    """
    optimizer = OPTIMIZERS[optimizer_name]()
    check = convergence_check(objective)

    def raw_objective(p: Vec, to_frame: Mat, data, consts):
        return objective(mat_vec(to_frame, p), data, consts)

    def chunk(p: Vec, state, iterations, frozen, to_frame: Mat, data, floor, epoch0,
              consts: Consts):
        for i in range(unroll):
            active = ~frozen & (epoch0 + i < consts.epochs)
            g = grad(raw_objective)(p, to_frame, data, consts)
            step = epoch0.to(p[0].dtype) + (i + 1)
            delta, new_state = optimizer.update(g, state, step, consts.lr)
            moved = tuple(pj + dj for pj, dj in zip(p, delta))
            if lower is not None or upper is not None:
                moved = tuple(pj.clamp(min=lo, max=hi) for pj, lo, hi in zip(
                    moved, lower or (-torch.inf,) * len(p), upper or (torch.inf,) * len(p)))
            p = _keep_frozen(active, moved, p)
            state = _keep_frozen(active, new_state, state)
            iterations = iterations + active
        value, converged = check(mat_vec(to_frame, p), data, floor, consts)
        finite = torch.isfinite(value)
        for pj in p:
            finite = finite & torch.isfinite(pj)
        return p, state, iterations, frozen | converged | ~finite, value
    return chunk


@factory
def newton_step(objective: Callable) -> Callable:
    """Per series: one damped Newton (Levenberg-Marquardt) iteration in the frame.

    Full Newton steps while they lower the loss (so MSE lands on its minimum in one step);
    a rejected step raises the damping ``mu`` (steps shrink towards gradient descent), an
    accepted one lowers it. A series whose damping explodes stops, not converged.
    """
    check = convergence_check(objective)

    def step(q: Vec, mu, iterations, frozen, data, floor, consts: Consts):
        value, converged = check(q, data, floor, consts)
        gradient = grad(objective)(q, data, consts)
        curvature = hessian(objective, q, data, consts)
        active = ~frozen & ~converged
        k = len(q)
        scale = sum(curvature[j][j].abs() for j in range(k)) / k + torch.finfo(value.dtype).tiny
        damped = tuple(tuple(h + mu * scale if i == j else h for j, h in enumerate(row))
                       for i, row in enumerate(curvature))
        delta, ok = linalg.solve(damped, tuple(-g for g in gradient), consts.pivot_tol)
        candidate = tuple(qj + dj for qj, dj in zip(q, delta))
        new_value = objective(candidate, data, consts)
        accept = active & ok & torch.isfinite(new_value) & (new_value <= value)
        q = _keep_frozen(accept, candidate, q)
        mu = torch.where(accept, mu / 3, torch.where(active, (4 * mu).clamp(min=1e-4), mu))
        iterations = iterations + active
        stop = converged | ~torch.isfinite(value) | (mu > 1e10)
        return q, mu, iterations, frozen | stop, torch.where(accept, new_value, value)
    return step


# ---------------------------------------------------------------- history

class _Recorder:
    """Keeps the losses of a sample of series and of the tracked series on the device, on a
    fixed grid of epochs, until the end (no host sync while training)."""

    def __init__(self, cfg: SolverConfig, batch: int, tracked: torch.Tensor,
                 initial_params: torch.Tensor, structural: torch.Tensor):
        device = tracked.device
        self.sample = torch.arange(0, batch, max(1, -(-batch // max(cfg.history_sample, 1))),
                                   device=device)[: cfg.history_sample]
        self.tracked = tracked
        self.initial_params = initial_params  # (T, k) raw, float64
        self.structural = structural
        self.grid = history_epochs(cfg)
        self.rows: list[torch.Tensor] = []

    def record(self, epoch: int, loss: torch.Tensor, finished: bool = False):
        """Record at grid epochs; once training stopped early, the frozen losses stand for
        every later grid epoch too (frozen series do not change)."""
        if epoch not in self.grid and not finished:
            return
        loss = torch.where(self.structural, torch.nan, loss)
        row = torch.cat([loss[self.sample], loss[self.tracked]])
        recorded = len(self.rows)
        later = self.grid.index(epoch) + 1 if epoch in self.grid else next(
            (i for i, e in enumerate(self.grid) if e > epoch), len(self.grid))
        self.rows.extend([row] * ((len(self.grid) if finished else later) - recorded))

    def history(self) -> History:
        table = torch.stack(self.rows).cpu()
        n = len(self.sample)
        return History(epochs=torch.tensor(self.grid), sample_loss=table[:, :n],
                       tracked=self.tracked.cpu(), tracked_loss=table[:, n:],
                       tracked_initial_params=self.initial_params.cpu())


def history_epochs(cfg: SolverConfig) -> list[int]:
    """The epochs a history records: 0, every ``history_every`` (default: about 300
    records), and the last."""
    every = cfg.history_every or max(1, cfg.epochs // 300)
    return sorted(set(range(0, cfg.epochs + 1, every)) | {cfg.epochs})


def _tracked(cfg: SolverConfig, batch: int, device) -> torch.Tensor:
    if cfg.track is not None:
        ids = [i for i in cfg.track if 0 <= i < batch]
    else:  # a reproducible spread over the batch
        ids = sorted({round(i * (batch - 1) / 4) for i in range(5)}) if batch else []
    return torch.tensor(ids, dtype=torch.int64, device=device)


COMPACT_BELOW = 0.5  # active fraction under which the loop continues on the active rows


def _take(tree, rows: torch.Tensor, batch: int):
    """The ``rows`` of every per-series tensor in ``tree`` (leading axis ``batch``)."""
    if isinstance(tree, tuple):
        return type(tree)(*(_take(t, rows, batch) for t in tree)) if hasattr(tree, "_fields") \
            else tuple(_take(t, rows, batch) for t in tree)
    if isinstance(tree, torch.Tensor) and tree.ndim and tree.shape[0] == batch:
        return tree[rows]
    return tree


def _put(full, rows: torch.Tensor, part):
    """``full`` with ``part`` written back at ``rows`` (the inverse of ``_take``)."""
    if isinstance(full, tuple):
        values = [_put(f, rows, p) for f, p in zip(full, part)]
        return type(full)(*values) if hasattr(full, "_fields") else tuple(values)
    return full.index_put((rows,), part)


def _train(call, state: LoopState, inputs, cfg: SolverConfig, recorder: _Recorder, loss0, *,
           per_call: int, sync_every: int) -> LoopState:
    """Run ``call(state, inputs, epoch0) -> (state, loss)`` (one compiled chunk) until the
    epochs are spent or every series is frozen.

    The host looks at the device only every ``sync_every`` calls, to stop early; and when
    fewer than a quarter of the series are still moving it continues on those alone (the
    frozen rest would cost a full pass per step for nothing), writing them back at the end.
    """
    recorder.record(0, loss0, finished=cfg.epochs == 0)
    full, loss_full, rows = state, loss0, None  # rows: the active subset, None = everyone
    done, calls = 0, 0
    while done < cfg.epochs:
        state, loss = call(state, inputs, done)
        done, calls = min(done + per_call, cfg.epochs), calls + 1
        if rows is not None:
            loss = loss_full.index_put((rows,), loss)
        loss_full = loss
        finished = done >= cfg.epochs
        if not finished and calls % sync_every == 0:
            active = torch.nonzero(~state.frozen).squeeze(1)
            finished = active.numel() == 0
            current = state.frozen.shape[0]
            # (never down to one row: a batch of one would make torch.compile specialise)
            if not finished and 2 <= active.numel() < COMPACT_BELOW * current:
                full = state if rows is None else _put(full, rows, state)
                rows = active if rows is None else rows[active]
                state = _take(state, active, current)
                inputs = _take(inputs, active, current)
        recorder.record(done, loss_full, finished)
        if finished:
            break
    return state if rows is None else _put(full, rows, state)


# ---------------------------------------------------------------- front doors

def _fit_result(out: dict, iterations, cfg: SolverConfig, solver: str,
                history: History | None = None) -> FitResult:
    wide = {name: out[name].to(torch.float64) for name in ("loss", "rmse", "r2")}
    return FitResult(params=_stack(out["params"]), stderr=_stack(out["stderr"]), **wide,
                     model=cfg.model,
                     n_points=out["n_points"].to(torch.int64),
                     iterations=iterations.to(torch.int64), status=out["status"],
                     solver=solver, loss_name=cfg.loss.name, history=history)


def solve_without_points(batch: int, device, cfg: SolverConfig, solver: str) -> FitResult:
    """An empty batch, or series of length 0 (vmap needs at least one of each)."""
    nan = torch.full((batch, cfg.k), torch.nan, dtype=torch.float64, device=device)
    zeros = torch.zeros(batch, dtype=torch.int64, device=device)
    status = torch.full((batch,), int(Status.TOO_FEW_POINTS), dtype=torch.int8, device=device)
    return FitResult(params=nan, stderr=nan.clone(), model=cfg.model, loss=nan[:, 0].clone(),
                     rmse=nan[:, 0].clone(), r2=nan[:, 0].clone(),
                     n_points=zeros, iterations=zeros.clone(), status=status, solver=solver,
                     loss_name=cfg.loss.name)


class StatsFit(NamedTuple):
    """The fits of a statistics table, per series: the output record (``exact_result``
    makes a FitResult of it), which rows' sums lost digits (to be refined on their points),
    and each row's Chebyshev coefficients of y - yref in its frame."""

    out: dict
    trusted: torch.Tensor
    q: tuple


def fit_from_stats(table: torch.Tensor, weighted: bool, cfg: SolverConfig, vectorize,
                   step=None) -> StatsFit:
    """Weighted least squares per series from its statistics (``batchfit.stats``), in its
    frame, in float64. ``step``: the residual moments of one refinement step on the points
    (see ``stats.solve_kernel``)."""
    out = stats.solve(table, cfg.degree, weighted, vectorize, step)
    q, trusted = out.pop("q"), out.pop("trusted")
    return StatsFit(out, trusted, q)


def exact_result(out: dict, cfg: SolverConfig) -> FitResult:
    solved = (out["status"] == int(Status.OK)) | (out["status"] == int(Status.DIVERGED))
    return _fit_result(out, solved.to(torch.int64), cfg, "exact")


def refit_exact(problem: Problem, cfg: SolverConfig, vectorize) -> FitResult:
    """The careful exact fit on the points (a float64 problem of a few series whose sums lost
    digits): a solve, then one step of iterative refinement with the residuals."""
    out = vectorize(exact_kernel(cfg.loss, cfg.degree), Series.of(problem),
                    _consts(cfg, problem),
                    eager_s=EAGER_S_PER_POINT["careful"] * problem.y.numel())
    return exact_result(out, cfg)


def solve_exact(table: torch.Tensor, weighted: bool, cfg: SolverConfig, vectorize,
                points: Callable[[torch.Tensor], Problem]) -> FitResult:
    """``fit_from_stats``, with the rows whose sums lose digits (uneven x, or a residual lost
    in cancellation) fitted again on their points, ``points(rows)`` (``refit_exact``)."""
    fitted = fit_from_stats(table, weighted, cfg, vectorize)
    result = exact_result(fitted.out, cfg)
    redo = torch.nonzero(~fitted.trusted).squeeze(1)  # one host sync; usually empty
    return result.with_rows(redo, refit_exact(points(redo), cfg, vectorize)) \
        if redo.numel() else result


class _Setup(NamedTuple):
    consts: Consts
    series: Series
    sums: Sums
    q_exact: Vec  # the MSE solution in the frame
    solvable: torch.Tensor
    data: MomentData | PointData
    floor: torch.Tensor  # per series: loss differences below this are rounding noise

    def structural(self, k: int) -> torch.Tensor:
        return (self.sums.n < k) | ~self.solvable


def _setup(problem: Problem, cfg: SolverConfig, vectorize) -> _Setup:
    consts = _consts(cfg, problem)
    series = Series.of(problem)
    one_pass = EAGER_S_PER_POINT["careful"] * problem.y.numel()
    sums, sst, q_exact, solvable = vectorize(prepare_kernel(cfg.degree), series, consts,
                                             eager_s=one_pass)
    if cfg.loss.is_mse:
        rhs_c = tuple(r - sums.ybar * row[0] for r, row in zip(sums.rhs, sums.gram))
        data = MomentData(sums.gram, rhs_c, sst, sums.wsum, sums.ybar)
    else:
        data = vectorize(points_kernel(cfg.degree), series, consts, eager_s=one_pass)
    eps = torch.finfo(problem.dtype).eps
    floor = eps * sst / sums.wsum.clamp(min=eps) + torch.finfo(problem.dtype).tiny
    return _Setup(consts, series, sums, q_exact, solvable, data, floor)


def _finish(cfg, vectorize, setup: _Setup, q: Vec, iterations, loss0, recorder, solver,
            params: Vec | None = None) -> FitResult:
    """Final convergence check, diagnostics and statuses of an iterative fit."""
    # The last check needs the Hessian: over the points (and autograd) unless the loss is MSE.
    cost = EAGER_S_PER_POINT["careful"] * setup.series.y.numel() * (1 if cfg.loss.is_mse else 10)
    out = vectorize(final_kernel(cfg.loss, cfg.degree, solver == "newton"), setup.series, setup.sums,
                    setup.solvable, q, params, setup.data, setup.floor, loss0, setup.consts,
                    eager_s=cost)
    return _fit_result(out, iterations, cfg, solver, recorder.history())


INIT_BLOCK = 1 << 16


def random_init(seed: int, first: int, count: int, k: int, dtype=torch.float64) -> torch.Tensor:
    """Standard normal initial coefficients (the seed's ``torch.randn``) for series
    ``first .. first + count - 1`` of a run: a series' values depend only on the seed and its
    position, never on how the run is cut into batches. Made on the CPU, so every device
    agrees."""
    blocks = []
    for block in range(first // INIT_BLOCK, (first + count - 1) // INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        blocks.append(torch.randn((INIT_BLOCK, k), generator=generator, dtype=torch.float64))
    if not blocks:
        return torch.zeros((0, k), dtype=dtype)
    start = first - (first // INIT_BLOCK) * INIT_BLOCK
    return torch.cat(blocks)[start:start + count].to(dtype)


def _initial_params(cfg: SolverConfig, problem: Problem) -> torch.Tensor:
    shape = (problem.batch_size, cfg.k)
    if isinstance(cfg.init, str):
        if cfg.init == "zeros":
            return torch.zeros(shape, dtype=problem.dtype, device=problem.device)
        if cfg.init == "random":
            return random_init(cfg.seed, 0, problem.batch_size, cfg.k, problem.dtype).to(
                problem.device)
        raise ValueError(f"init must be 'random', 'zeros' or an array, got {cfg.init!r}")
    p0 = torch.as_tensor(cfg.init, dtype=problem.dtype, device=problem.device)
    if p0.shape not in ((cfg.k,), shape):
        raise ValueError(f"init must have shape ({cfg.k},) or {shape}, got {tuple(p0.shape)}")
    return p0.expand(shape)


def _zeros(problem: Problem, dtype=None) -> torch.Tensor:
    return torch.zeros(problem.batch_size, dtype=dtype or problem.dtype, device=problem.device)


def solve_descent(problem: Problem, cfg: SolverConfig, vectorize, solver: str) -> FitResult:
    """The seed's training loop at batch scale: GD (``solver='gd'``) or Adam on raw coefficients."""
    setup = _setup(problem, cfg, vectorize)
    structural = setup.structural(cfg.k)
    objective = _objective(cfg.loss)
    to_frame = vectorize(_raw_to_frame, setup.sums, cfg.k, problem.dtype)
    p0 = _initial_params(cfg, problem)
    p = _columns(p0)
    state = LoopState(p, OPTIMIZERS[solver]().init(p), _zeros(problem, torch.int64), structural)
    loss0 = vectorize(objective, mat_vec(to_frame, p), setup.data, setup.consts)
    tracked = _tracked(cfg, problem.batch_size, problem.device)
    recorder = _Recorder(cfg, problem.batch_size, tracked, p0[tracked].to(torch.float64),
                         structural)
    chunk = descent_chunk(objective, solver, cfg.unroll)
    cost = eager_seconds(solver, cfg.loss.is_mse, problem.batch_size, problem.y.numel(),
                         cfg.epochs)

    def call(state: LoopState, inputs, epoch0: int):
        epoch = torch.tensor(epoch0, device=problem.device)
        *new, loss = vectorize(chunk, *state, *inputs, epoch, setup.consts, eager_s=cost)
        return LoopState(*new), loss

    state = _train(call, state, (to_frame, setup.data, setup.floor), cfg, recorder, loss0,
                   per_call=cfg.unroll, sync_every=max(1, 1000 // cfg.unroll))
    q = mat_vec(to_frame, state.params)
    return _finish(cfg, vectorize, setup, q, state.iterations, loss0, recorder, solver,
                   params=state.params)


def solve_newton(problem: Problem, cfg: SolverConfig, vectorize) -> FitResult:
    """Damped Newton in each series' frame; robust losses start from the exact MSE fit."""
    setup = _setup(problem, cfg, vectorize)
    structural = setup.structural(cfg.k)
    objective = _objective(cfg.loss)
    if not isinstance(cfg.init, str):
        to_frame = vectorize(_raw_to_frame, setup.sums, cfg.k, problem.dtype)
        q0 = mat_vec(to_frame, _columns(_initial_params(cfg, problem)))
    elif cfg.loss.is_mse:
        q0 = tuple(torch.zeros_like(qj) for qj in setup.q_exact)  # one Newton step is exact
    else:
        q0 = tuple(torch.where(structural, 0, qj) for qj in setup.q_exact)
    state = LoopState(q0, _zeros(problem), _zeros(problem, torch.int64), structural)
    loss0 = vectorize(objective, q0, setup.data, setup.consts)
    tracked = _tracked(cfg, problem.batch_size, problem.device)
    raw0 = _stack(vectorize(_frame_to_raw, setup.sums, q0))[tracked]
    recorder = _Recorder(cfg, problem.batch_size, tracked, raw0, structural)
    step = newton_step(objective)
    cost = eager_seconds("newton", cfg.loss.is_mse, problem.batch_size, problem.y.numel(),
                         cfg.epochs)

    def call(state: LoopState, inputs, _):
        *new, loss = vectorize(step, *state, *inputs, setup.consts, eager_s=cost)
        return LoopState(*new), loss

    state = _train(call, state, (setup.data, setup.floor), cfg, recorder, loss0, per_call=1,
                   sync_every=1)
    return _finish(cfg, vectorize, setup, state.params, state.iterations, loss0, recorder,
                   "newton")
