"""The solvers: exact, newton, gd, adam.

Each is a pure function ``(problem, config, vectorize) -> FitResult``. The maths is written
for ONE series and handed to ``vectorize(fn, *args, eager_s=...)``, the engine's hook that
vmaps it over the batch and runs it compiled when its policy says so (``eager_s``: the fit's
estimated uncompiled time, ``eager_seconds`` the cost model); nothing here picks devices or
compiles. Per-series vectors are tuples of scalars (see linalg.py), so batched they are
tuples of contiguous (B,) tensors. Built-in losses come with closed-form derivatives, so
the uncompiled kernels are a few passes over the points with no autograd, and GD/Adam on
MSE run on the sums as batched ops, with no kernel at all.

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
from typing import NamedTuple

import torch

from batchfit.core.keys import factory
from batchfit.fitting import linalg, loop
from batchfit.fitting import moment_twin as stats
from batchfit.fitting.data import FitResult, Problem, Series, Status, used_points
from batchfit.fitting.diagnostics import finalize, summarise
from batchfit.fitting.linalg import Mat, Vec, mat_vec
from batchfit.fitting.loop import (
    OPTIMIZERS,
    Consts,
    LoopState,
    Recorder,
    SolverConfig,
    columns,
    consts_of,
    convergence_check,
    descent_chunk,
    fit_result,
    keep_frozen,
    stack,
    tracked_series,
    train,
    zeros,
)
from batchfit.fitting.losses import Loss
from batchfit.fitting.models import (
    Sums,
    chebyshev_eval,
    chebyshev_terms,
    from_raw_map,
    gram_from_sums,
    in_user_order,
    prepare,
    to_raw_map,
    total_squares,
)

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


def _cast(vec: Vec, dtype) -> Vec:
    return tuple(v.to(dtype) for v in vec)


# ---------------------------------------------------------------- per-series objectives

def moment_objective(q: Vec, data: MomentData, consts: Consts):
    qc = (q[0] - data.ybar,) + tuple(q[1:])
    quad = linalg.dot(qc, mat_vec(data.gram, qc))
    return (quad - 2 * linalg.dot(qc, data.rhs_c) + data.sst) / data.wsum


def moment_hessian(data: MomentData) -> Mat:
    """The MSE Hessian, 2 G / wsum: constant."""
    return tuple(tuple(2 * g / data.wsum for g in row) for row in data.gram)


def moment_derivatives(q: Vec, data: MomentData, consts: Consts):
    """MSE's loss, gradient ``2 (G qc - rhs_c) / wsum`` and Hessian from the sums alone."""
    qc = (q[0] - data.ybar,) + tuple(q[1:])
    gram_q = mat_vec(data.gram, qc)
    value = (linalg.dot(qc, gram_q) - 2 * linalg.dot(qc, data.rhs_c) + data.sst) / data.wsum
    gradient = tuple(2 * (g - r) / data.wsum for g, r in zip(gram_q, data.rhs_c))
    return value, gradient, moment_hessian(data)


moment_objective.derivatives = moment_derivatives  # (loop.derivatives: no autograd)


@factory
def point_objective(loss: Loss) -> Callable:
    """A loss on the raw points in the frame. For built-in losses its gradient and Hessian
    are written out (``Loss.derivatives``): ``-sum w l'(r) T_j / wsum`` and
    ``sum w l''(r) T_i T_j / wsum``, the latter from the 2k - 1 sums ``sum w l'' T_m``."""
    def objective(q: Vec, data: PointData, consts: Consts):
        return loss.series_loss(chebyshev_eval(data.t, q), data.y, data.w, consts.f_scale)

    def closed_form(q: Vec, data: PointData, consts: Consts):
        k = len(q)
        terms = chebyshev_terms(data.t, 2 * k - 2)[1:]  # (T_0 = 1 is left out of products)
        pred = sum((qj * tj for qj, tj in zip(q[1:], terms)), q[0])  # (chebyshev_eval's order)
        value, slope, bend = loss.derivatives(data.y - pred, consts.f_scale)
        wsum = data.w.sum()
        share = data.w / wsum
        slope, bend = slope * share, bend * share
        gradient = (-slope.sum(),) + tuple(-(slope * tj).sum() for tj in terms[:k - 1])
        bend_sums = [bend.sum()] + [(bend * tm).sum() for tm in terms]
        # (the loss exactly as ``objective`` computes it: both see the same values)
        return (data.w * value).sum() / wsum, gradient, gram_from_sums(bend_sums, k)

    if loss.user is None:
        objective.derivatives = closed_form
    return objective


def _objective(loss: Loss) -> Callable:
    return moment_objective if loss.is_mse else point_objective(loss)


# ---------------------------------------------------------------- per-series kernels

@factory
def prepare_kernel(degree: int, points: bool) -> Callable:
    """Per series: frame, sums, spread of y, the exact MSE solution and whether it exists;
    with ``points``, also the points in the frame (``PointData``, for losses other than MSE)."""
    def kernel(series: Series, consts: Consts):
        w, x, y = used_points(series)
        sums, t = prepare(x, y, w, series.x_offset, degree)
        q, solvable = linalg.solve(sums.gram, sums.rhs, consts.pivot_tol)
        out = sums, total_squares(y, w, sums.ybar), q, solvable
        return out + (PointData(t, y, w),) if points else out
    return kernel


@factory
def final_kernel(loss: Loss, degree: int, newton: bool, covariance: bool = False) -> Callable:
    """Per series, after an iterative solver: last convergence check, diagnostics, status.
    Newton's MSE steps use the sums only, so its answer gets the exact solver's refinement
    step on the points (a Newton step on the point residuals)."""
    check = convergence_check(_objective(loss))

    def kernel(series: Series, sums: Sums, solvable, q: Vec, params, data, floor, loss0,
               consts: Consts):
        if isinstance(data, PointData):
            t, y, w = data
        else:  # (MSE kept the sums only)
            w, x, y = used_points(series)
            _, t = prepare(x, y, w, series.x_offset, degree)
        closed_form = loss.user is None and not loss.is_mse
        if not closed_form:  # (a robust loss's check comes with its summary)
            value, converged = check(q, data, floor, consts)
        if newton and loss.is_mse:
            q = refine(t, y, w, sums.gram, q, consts.pivot_tol)
        summary = summarise(t, y, w, sums, q, loss, consts.f_scale, consts.pivot_tol,
                            covariance)
        if closed_form:
            value = summary["loss"]
            converged = loop.decrement_ok(summary["curvature"], summary["gradient"], value,
                                          floor, consts)
        return finalize(summary, sums.n, solvable, converged,
                        loop.diverged(value, loss0, floor), params,
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
def exact_kernel(loss: Loss, degree: int, covariance: bool = False) -> Callable:
    """The careful exact fit of one series: prepare, solve, refine, summarise."""
    def kernel(series: Series, consts: Consts):
        w, x, y = used_points(series)
        sums, t = prepare(x, y, w, series.x_offset, degree)
        q, solvable = linalg.solve(sums.gram, sums.rhs, consts.pivot_tol)
        q = refine(t, y, w, sums.gram, q, consts.pivot_tol)
        summary = summarise(t, y, w, sums, q, loss, consts.f_scale, consts.pivot_tol,
                            covariance)
        return finalize(summary, sums.n, solvable, torch.ones_like(solvable),
                        torch.zeros_like(solvable), check_precision=True)
    return kernel


def _raw_to_frame(sums: Sums, k: int, dtype) -> Mat:
    return tuple(_cast(row, dtype) for row in from_raw_map(sums.centre_raw, sums.half, k))


def _frame_to_raw(sums: Sums, q: Vec) -> Vec:
    return mat_vec(to_raw_map(sums.centre_raw, sums.half, len(q)), _cast(q, torch.float64))


@factory
def derivatives_kernel(objective: Callable) -> Callable:
    """Per series: ``(loss, gradient, Hessian)`` of ``objective`` at ``q``."""
    def kernel(q: Vec, data, consts: Consts):
        return loop.derivatives(objective, q, data, consts)
    return kernel


# ---------------------------------------------------------------- front doors


def solve_without_points(batch: int, device, cfg: SolverConfig, solver: str) -> FitResult:
    """An empty batch, or series of length 0 (vmap needs at least one of each)."""
    nan = torch.full((batch, cfg.k), torch.nan, dtype=torch.float64, device=device)
    zeros = torch.zeros(batch, dtype=torch.int64, device=device)
    status = torch.full((batch,), int(Status.TOO_FEW_POINTS), dtype=torch.int8, device=device)
    # (a polynomial's frame too, blank: its results merge with other groups' and write alike)
    frame = dict(x_centre=nan[:, 0].clone(), x_scale=nan[:, 0].clone(),
                 frame_params=nan.clone()) if cfg.model.is_poly else {}
    if cfg.covariance:
        frame["covariance"] = nan[:, :, None].expand(-1, -1, cfg.k).clone()
    return FitResult(params=nan, stderr=nan.clone(), model=cfg.model, loss=nan[:, 0].clone(),
                     rmse=nan[:, 0].clone(), r2=nan[:, 0].clone(),
                     n_points=zeros, iterations=zeros.clone(), status=status, solver=solver,
                     loss_name=cfg.loss.name, **frame)


class StatsFit(NamedTuple):
    """The fits of a statistics table, per series: the output record (``exact_result``
    makes a FitResult of it), which rows' sums lost digits (to be refined on their points),
    and each row's Chebyshev coefficients of y - yref in its frame."""

    out: dict
    trusted: torch.Tensor
    q: tuple


def fit_from_stats(table: torch.Tensor, weighted: bool, cfg: SolverConfig, vectorize,
                   step=None) -> StatsFit:
    """Weighted least squares per series from its statistics (``batchfit.fitting.moment_twin``), in its
    frame, in float64. ``step``: the residual moments of one refinement step on the points
    (see ``stats.solve_kernel``)."""
    out = stats.solve(table, cfg.degree, weighted, vectorize, step)
    q, trusted = out.pop("q"), out.pop("trusted")
    return StatsFit(out, trusted, q)


def exact_result(out: dict, cfg: SolverConfig) -> FitResult:
    solved = (out["status"] == int(Status.OK)) | (out["status"] == int(Status.DIVERGED))
    return fit_result(out, solved.to(torch.int64), cfg, "exact")


def refit_exact(problem: Problem, cfg: SolverConfig, vectorize) -> FitResult:
    """The careful exact fit on the points (a float64 problem of a few series whose sums lost
    digits): a solve, then one step of iterative refinement with the residuals."""
    out = vectorize(exact_kernel(cfg.loss, cfg.degree, cfg.covariance), Series.of(problem),
                    consts_of(cfg, problem),
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


def _setup(problem: Problem, cfg: SolverConfig, vectorize, fit_s: float) -> _Setup:
    """``fit_s``: the whole fit's estimated uncompiled time (the compile policy weighs every
    kernel of a fit by it: they are kept, or not, together)."""
    consts = consts_of(cfg, problem)
    series = Series.of(problem)
    sums, sst, q_exact, solvable, *points = vectorize(
        prepare_kernel(cfg.degree, not cfg.loss.is_mse), series, consts, eager_s=fit_s)
    if cfg.loss.is_mse:
        rhs_c = tuple(r - sums.ybar * row[0] for r, row in zip(sums.rhs, sums.gram))
        data = MomentData(sums.gram, rhs_c, sst, sums.wsum, sums.ybar)
    else:
        data, = points
    eps = torch.finfo(problem.dtype).eps
    floor = eps * sst / sums.wsum.clamp(min=eps) + torch.finfo(problem.dtype).tiny
    return _Setup(consts, series, sums, q_exact, solvable, data, floor)


def _finish(cfg, vectorize, setup: _Setup, q: Vec, iterations, loss0, recorder, solver,
            fit_s: float, params: Vec | None = None) -> FitResult:
    """Final convergence check, diagnostics and statuses of an iterative fit."""
    out = vectorize(final_kernel(cfg.loss, cfg.degree, solver == "newton", cfg.covariance),
                    setup.series,
                    setup.sums, setup.solvable, q, params, setup.data, setup.floor, loss0,
                    setup.consts, eager_s=fit_s)
    return fit_result(out, iterations, cfg, solver, recorder.history())


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
    """(B, k) starting raw coefficients, lowest power first (``init`` is given as users
    order them, highest first)."""
    return in_user_order(None, _given_init(cfg, problem))


def _given_init(cfg: SolverConfig, problem: Problem) -> torch.Tensor:
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


class MomentSlope(NamedTuple):
    """MSE's gradient in the raw coefficients p of every series: ``slope p - offset``, with
    ``slope = 2 A^T G A / wsum`` and ``offset = 2 A^T (ybar G e_0 + rhs_c) / wsum`` (``q = A p``
    maps p into the frame), formed once and kept in float64. It is the gradient of
    ``moment_objective(A p)``, the chain rule written out, so GD and Adam on the sums need no
    autograd, only a few batched ops per epoch. (In float64 because the two terms cancel to
    the residual's scale: in float32 the gradient's noise, about eps |y|, kept some Adam
    fits hovering above a tight ``tol``; rounded once, it is exact to float32.)"""

    slope: Mat
    offset: Vec


def moment_slope(sums: Sums, data: MomentData) -> MomentSlope:
    k = len(data.gram)
    to_frame = from_raw_map(sums.centre_raw, sums.half, k)
    gram = tuple(_cast(row, torch.float64) for row in data.gram)
    scale = 2 / data.wsum.to(torch.float64)
    across = linalg.transpose(to_frame)
    slope = linalg.mat_mat(across, linalg.mat_mat(gram, to_frame))
    shift = tuple(row[0] * data.ybar.to(torch.float64) + r.to(torch.float64)
                  for row, r in zip(gram, data.rhs_c))
    return MomentSlope(tuple(tuple(s * scale for s in row) for row in slope),
                       tuple(o * scale for o in mat_vec(across, shift)))


def moment_descent(cfg: SolverConfig, solver: str, consts: Consts) -> Callable:
    """``train``'s call for GD/Adam on MSE sums: ``cfg.unroll`` epochs on the whole batch as
    stacked (k, B) tensors, then the convergence check (closed form, on the batch), with
    the per-series kernels' semantics: frozen series keep their state (``torch.where``),
    active ones count their epochs."""
    optimizer, check = OPTIMIZERS[solver](), convergence_check(moment_objective)

    def call(state: LoopState, inputs, epoch0: int):
        p, aux, iterations, frozen = state
        slope, offset, to_frame, data, floor = inputs
        columns_of_slope = [torch.stack([row[j] for row in slope]) for j in range(len(p))]
        offset, moving = torch.stack(offset), torch.stack(p)
        aux = tuple(torch.stack(part) for part in aux)
        active = ~frozen
        epochs = min(cfg.unroll, cfg.epochs - epoch0)
        for i in range(epochs):
            wide = moving.to(offset.dtype)
            g = columns_of_slope[0] * wide[0]
            for column, pj in zip(columns_of_slope[1:], wide[1:]):
                g = torch.addcmul(g, column, pj)
            step = torch.tensor(epoch0 + i + 1, dtype=moving.dtype, device=moving.device)
            delta, new_aux = optimizer.update((g - offset).to(moving.dtype), aux, step,
                                              consts.lr)
            moving = torch.where(active, moving + delta, moving)
            aux = keep_frozen(active, new_aux, aux)
        p = tuple(moving.unbind(0))
        value, converged = check(mat_vec(to_frame, p), data, floor, consts)
        finite = torch.isfinite(value) & torch.isfinite(moving).all(dim=0)
        aux = tuple(tuple(part.unbind(0)) for part in aux)
        return LoopState(p, aux, iterations + active * epochs,
                         frozen | converged | ~finite), value
    return call


def solve_descent(problem: Problem, cfg: SolverConfig, vectorize, solver: str) -> FitResult:
    """The seed's training loop at batch scale: GD (``solver='gd'``) or Adam on raw coefficients."""
    # (MSE's epochs are batched ops, no kernel: only its two passes over the points count)
    cost = 2 * EAGER_S_PER_POINT["careful"] * problem.y.numel() if cfg.loss.is_mse else \
        eager_seconds(solver, False, problem.batch_size, problem.y.numel(), cfg.epochs)
    setup = _setup(problem, cfg, vectorize, cost)
    structural = setup.structural(cfg.k)
    objective = _objective(cfg.loss)
    to_frame = vectorize(_raw_to_frame, setup.sums, cfg.k, problem.dtype)
    p0 = _initial_params(cfg, problem)
    p = columns(p0)
    state = LoopState(p, OPTIMIZERS[solver]().init(p), zeros(problem, torch.int64), structural)
    loss0 = vectorize(objective, mat_vec(to_frame, p), setup.data, setup.consts)
    tracked = tracked_series(cfg, problem.batch_size, problem.device)
    recorder = Recorder(cfg, problem.batch_size, tracked, p0[tracked].to(torch.float64),
                         structural)
    if cfg.loss.is_mse:  # a few batched ops per epoch, no kernel to vmap or compile
        call = moment_descent(cfg, solver, setup.consts)
        inputs = moment_slope(setup.sums, setup.data) + (to_frame, setup.data,
                                                                        setup.floor)
    else:
        chunk = descent_chunk(objective, solver, cfg.unroll)

        def call(state: LoopState, inputs, epoch0: int):
            epoch = torch.tensor(epoch0, device=problem.device)
            *new, loss = vectorize(chunk, *state, *inputs, epoch, setup.consts, eager_s=cost)
            return LoopState(*new), loss

        inputs = (to_frame, setup.data, setup.floor)
    # (MSE's descent works on the moments, a few k x k products per series and epoch)
    state = train(call, state, inputs, cfg, recorder, loss0, per_call=cfg.unroll,
                  sync_every=max(1, 1000 // cfg.unroll),
                  work_per_series=cfg.k**2 if cfg.loss.is_mse else problem.y.shape[-1])
    q = mat_vec(to_frame, state.params)
    return _finish(cfg, vectorize, setup, q, state.iterations, loss0, recorder, solver, cost,
                   params=state.params)


def solve_newton(problem: Problem, cfg: SolverConfig, vectorize) -> FitResult:
    """Damped Newton in each series' frame; robust losses start from the exact MSE fit."""
    # (per step: one pass for the derivatives, one for the candidate's loss; MSE's are O(k^2))
    cost = eager_seconds("newton", cfg.loss.is_mse, problem.batch_size, problem.y.numel(),
                         cfg.epochs)
    setup = _setup(problem, cfg, vectorize, cost)
    structural = setup.structural(cfg.k)
    objective = _objective(cfg.loss)
    if not isinstance(cfg.init, str):
        to_frame = vectorize(_raw_to_frame, setup.sums, cfg.k, problem.dtype)
        q0 = mat_vec(to_frame, columns(_initial_params(cfg, problem)))
    elif cfg.loss.is_mse:
        q0 = tuple(torch.zeros_like(qj) for qj in setup.q_exact)  # one Newton step is exact
    else:
        q0 = tuple(torch.where(structural, 0, qj) for qj in setup.q_exact)
    state = LoopState(q0, loop.start(zeros(problem), cfg.k, mu=0.0), zeros(problem, torch.int64),
                      structural)
    loss0 = vectorize(objective, q0, setup.data, setup.consts)
    tracked = tracked_series(cfg, problem.batch_size, problem.device)
    raw0 = stack(vectorize(_frame_to_raw, setup.sums, q0))[tracked]
    recorder = Recorder(cfg, problem.batch_size, tracked, raw0, structural)
    evaluate = derivatives_kernel(objective)

    def call(state: LoopState, inputs, _):
        q, damping, iterations, frozen = state
        data, floor = inputs
        value, gradient, curvature = vectorize(evaluate, q, data, setup.consts, eager_s=cost)

        def candidate_loss(candidate):
            return vectorize(objective, candidate, data, setup.consts, eager_s=cost)

        q, value, damping, converged, stopped = loop.iterate(
            q, value, gradient, curvature, damping, frozen, candidate_loss, lambda c: c,
            floor, setup.consts, run=loop.algebra(vectorize, cost))
        return LoopState(q, damping, iterations + (~frozen & ~converged), stopped), value

    state = train(call, state, (setup.data, setup.floor), cfg, recorder, loss0, per_call=1,
                   sync_every=1, work_per_series=problem.y.shape[-1])
    return _finish(cfg, vectorize, setup, state.params, state.iterations, loss0, recorder,
                   "newton", cost)
