"""The loop every iterative solver shares: state, the damped Newton step, GD/Adam, the host.

Solvers (``solvers`` for polynomials, ``nonlinear`` for models) supply per-series objectives
and curvature; this module owns what they have in common:

* ``LoopState``, ``Consts`` and ``SolverConfig``: what a solver carries and is told;
* ``iterate``: one damped Newton / Levenberg-Marquardt step with its acceptance, damping
  update and convergence test, for polynomial Newton (robust losses) and for LM alike;
* ``descent_chunk``: unrolled GD/Adam epochs with the same convergence test;
* ``train``: the host loop (sync rarely, compact the active rows), and ``Recorder``, the
  loss history.

Everything per series is branch-free (``torch.where``), so it vmaps and compiles, and the
host never waits on a step.

**The damped step.** At ``p`` a solver supplies the loss, its gradient ``g`` and a curvature
matrix ``A`` (the exact Hessian in a polynomial's frame, or Gauss-Newton's ``J^T H J`` for a
model); ``iterate`` takes the step ``(A + mu D) delta = -g``, keeps it if it lowers the loss,
adapts the damping and says when a series has converged or stalled. The strategy is
Levenberg-Marquardt with

* Marquardt's scaling as in MINPACK's ``lmder`` (mode 1): the damping adds ``mu * D`` with
  ``D`` the largest diagonal of ``A`` seen so far (never shrinking), so badly scaled
  parameters are damped in their own units and the step is invariant to rescaling them;
* Nielsen's damping update (Nielsen 1999; Madsen, Nielsen & Tingleff 2004, as in levmar):
  with the gain ratio ``rho`` of actual to predicted reduction, an accepted step multiplies
  ``mu`` by ``max(1/3, 1 - (2 rho - 1)^3)``; a rejected one by ``nu``, which doubles with
  every rejection in a row (so a far start recovers in a few evaluations, not dozens).

Converged means half the squared Newton decrement ``g^T A^-1 g / 2`` is at most
``tol * (|loss| + floor)`` (the loss is within ``tol`` of the minimum of the local
quadratic model; invariant to the parametrisation). A converged series keeps stepping
while the loss does not rise and some parameter moves by more than sqrt(eps) of itself
(MINPACK's xtol, per parameter; near the minimum a Gauss-Newton step squares the error),
then freezes. Levenberg-Marquardt on models adds Transtrum's geodesic
acceleration (a second-order correction along the step, from one more model evaluation),
which follows curved valleys that plain LM crawls along. A series whose
damping passes 1e12 (no step lowers the loss: rounding, or a point that no step
improves) stops ``not_converged``; a non-finite loss stops it as diverged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.func import grad

from batchfit.core.keys import factory
from batchfit.fitting import linalg
from batchfit.fitting.data import FitResult, History, Problem
from batchfit.fitting.linalg import Mat, Vec, mat_vec
from batchfit.fitting.losses import Loss
from batchfit.fitting.models import Model, in_user_order


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
    restarts: int = 0  # extra starting points per series (models; see nonlinear.multi_start)
    covariance: bool = False  # also each series' full parameter covariance

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


class LoopState(NamedTuple):
    """What an iterative solver carries from one compiled call to the next, per series."""

    params: Vec  # raw p (GD, Adam) or frame q (Newton)
    aux: object  # optimiser state, or Newton's damping
    iterations: torch.Tensor
    frozen: torch.Tensor  # no further updates: structural failure, converged or diverged


def consts_of(cfg: SolverConfig, problem: Problem) -> Consts:
    def scalar(value, dtype=problem.dtype):
        return torch.tensor(value, dtype=dtype, device=problem.device)

    eps = torch.finfo(problem.dtype).eps
    return Consts(pivot_tol=scalar(100 * cfg.k * eps), f_scale=scalar(cfg.f_scale),
                  tol=scalar(cfg.tol), lr=scalar(cfg.lr), epochs=scalar(cfg.epochs, torch.int64))


def columns(matrix: torch.Tensor) -> Vec:
    """(B, k) -> k contiguous (B,) tensors."""
    return tuple(matrix.T.contiguous().unbind(0))


def stack(vec: Vec) -> torch.Tensor:
    return torch.stack(vec, dim=-1)


def keep_frozen(active, new, old):
    """``new`` where the series is active, ``old`` where it is frozen, over any tuple nesting."""
    if isinstance(new, tuple):
        return tuple(keep_frozen(active, n, o) for n, o in zip(new, old))
    return torch.where(active, new, old)


class Optimizer(NamedTuple):
    """A pair of pure functions: ``init(p) -> state``; ``update(g, state, step, lr)``.

    Parameters, gradients and states are tuples of per-parameter tensors (the kernels'
    layout) or one stacked (k, B) tensor (the moment loop's): the same arithmetic either way.
    """

    init: Callable
    update: Callable


def _each(fn: Callable, *values):
    """``fn`` applied per parameter (tuples) or to the stacked tensors at once."""
    if isinstance(values[0], tuple):
        return tuple(fn(*parts) for parts in zip(*values))
    return fn(*values)


def sgd() -> Optimizer:
    def update(g, state, step, lr):
        return _each(lambda gj: -lr * gj, g), state
    return Optimizer(init=lambda p: (), update=update)


def adam() -> Optimizer:
    """Adam with torch.optim.Adam's defaults (betas 0.9, 0.999; eps 1e-8).

    The constants are literals on purpose: dynamo traces float variables as symbols, which
    vmap's batching rules reject (torch 2.13).
    """
    def update(g, state, step, lr):
        m, v = state
        m = _each(lambda mj, gj: 0.9 * mj + 0.1 * gj, m, g)
        v = _each(lambda vj, gj: 0.999 * vj + 0.001 * gj * gj, v, g)
        m_scale = -1 / torch.expm1(step * -0.10536051565782628)  # 1 / (1 - 0.9**step)
        v_scale = -1 / torch.expm1(step * -0.0010005003335835344)  # 1 / (1 - 0.999**step)
        delta = _each(lambda mj, vj: -lr * mj * m_scale / (torch.sqrt(vj * v_scale) + 1e-8),
                      m, v)
        return delta, (m, v)

    def init(p):
        return (_each(torch.zeros_like, p),) * 2
    return Optimizer(init=init, update=update)


OPTIMIZERS = {"gd": sgd, "adam": adam}


def hessian(objective: Callable, q: Vec, *args) -> Mat:
    """Hessian of a per-series objective, one reverse-over-reverse row at a time.

    ``torch.func.hessian`` (jacfwd) fails under torch.compile in torch 2.13, and ``jacrev``
    stacks its rows into a (k, k) tensor, the layout that splits the compiled loop; k rows of
    ``grad(grad(...)[i])`` stay a tuple of scalars.
    """
    def gradient_entry(i):
        return lambda q, *args: grad(objective)(q, *args)[i]
    return tuple(grad(gradient_entry(i))(q, *args) for i in range(len(q)))


def derivatives(objective: Callable, q: Vec, *args):
    """``(loss, gradient, Hessian)`` of a per-series objective at ``q``: in closed form when
    the objective has a ``derivatives`` attribute (MSE's, and the built-in robust losses':
    no autograd, so eager it is a few passes over the points), else by torch.func."""
    closed_form = getattr(objective, "derivatives", None)
    if closed_form is not None:
        return closed_form(q, *args)
    return objective(q, *args), grad(objective)(q, *args), hessian(objective, q, *args)


def diverged(value, loss0, floor):
    """Per series: the final loss is not finite, or far above the start's. (Above the
    rounding floor: a start that interpolates has loss0 = 0, and its rounding noise is not
    divergence.)"""
    return ~torch.isfinite(value) | (value > 10 * loss0 + floor)


@factory
def convergence_check(objective: Callable) -> Callable:
    """Per series: ``(loss, converged)`` at q, by the Newton decrement test."""
    def check(q: Vec, data, floor, consts: Consts):
        value, gradient, curvature = derivatives(objective, q, data, consts)
        return value, decrement_ok(curvature, gradient, value, floor, consts)
    return check


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
            p = keep_frozen(active, moved, p)
            state = keep_frozen(active, new_state, state)
            iterations = iterations + active
        value, converged = check(mat_vec(to_frame, p), data, floor, consts)
        finite = torch.isfinite(value)
        for pj in p:
            finite = finite & torch.isfinite(pj)
        return p, state, iterations, frozen | converged | ~finite, value
    return chunk


class Recorder:
    """Keeps the losses of a sample of series and of the tracked series on the device, on a
    fixed grid of epochs, until the end (no host sync while training)."""

    def __init__(self, cfg: SolverConfig, batch: int, tracked: torch.Tensor,
                 initial_params: torch.Tensor, structural: torch.Tensor):
        device = tracked.device
        self.sample = torch.arange(0, batch, max(1, -(-batch // max(cfg.history_sample, 1))),
                                   device=device)[: cfg.history_sample]
        self.tracked = tracked
        self.initial_params = initial_params  # (T, k) raw, float64, as computed
        self.model = cfg.model
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
                       tracked_initial_params=in_user_order(self.model,
                                                            self.initial_params.cpu()))


def history_epochs(cfg: SolverConfig) -> list[int]:
    """The epochs a history records: 0, every ``history_every`` (default: about 300
    records), and the last."""
    every = cfg.history_every or max(1, cfg.epochs // 300)
    return sorted(set(range(0, cfg.epochs + 1, every)) | {cfg.epochs})


def tracked_series(cfg: SolverConfig, batch: int, device) -> torch.Tensor:
    if cfg.track is not None:
        ids = [i for i in cfg.track if 0 <= i < batch]
    else:  # a reproducible spread over the batch
        ids = sorted({round(i * (batch - 1) / 4) for i in range(5)}) if batch else []
    return torch.tensor(ids, dtype=torch.int64, device=device)


# Active fraction under which the loop continues on the active rows: the copy costs a few
# passes over the points, and every later step saves the share of the frozen rows (huber on
# 1e5 x 100, eager: 1.84-1.89 s at 0.5, 1.77 s at 0.75, 1.71 s at 0.9).
COMPACT_BELOW = 0.75


def take_rows(tree, rows: torch.Tensor, batch: int):
    """The ``rows`` of every per-series tensor in ``tree`` (leading axis ``batch``)."""
    if isinstance(tree, tuple):
        return type(tree)(*(take_rows(t, rows, batch) for t in tree)) if hasattr(tree, "_fields") \
            else tuple(take_rows(t, rows, batch) for t in tree)
    if isinstance(tree, torch.Tensor) and tree.ndim and tree.shape[0] == batch:
        return tree[rows]
    return tree


def put_rows(full, rows: torch.Tensor, part):
    """``full`` with ``part`` written back at ``rows`` (the inverse of ``take_rows``)."""
    if isinstance(full, tuple):
        values = [put_rows(f, rows, p) for f, p in zip(full, part)]
        return type(full)(*values) if hasattr(full, "_fields") else tuple(values)
    return full.index_put((rows,), part)


# Work per step (rows x points per series) under which the CPU runs a step on one thread:
# waking OpenMP's sleeping threads (OMP_WAIT_POLICY=PASSIVE, batchfit's default) costs more
# than the step saves (hill4 LM, 10 points, per step on 2 cores: one thread 0.33 ms against
# two 1.1 ms at 32 rows, 1.2 against 1.6 ms at 2,048, 3.8 against 2.8 ms at 8,192).
ONE_THREAD_BELOW = 1 << 16


@contextmanager
def threads_for_steps(device):
    """``use(work)``, called before each step, runs the step on one CPU thread when its work
    is below ``ONE_THREAD_BELOW`` and on all of them otherwise (on a GPU it does nothing);
    the count is restored at the end."""
    threads = torch.get_num_threads()
    current = [threads]

    def use(work: int):
        wanted = 1 if work < ONE_THREAD_BELOW else threads
        if device.type == "cpu" and wanted != current[0]:
            torch.set_num_threads(wanted)
            current[0] = wanted
    try:
        yield use
    finally:
        if current[0] != threads:
            torch.set_num_threads(threads)


def train(call, state: LoopState, inputs, cfg: SolverConfig, recorder: Recorder, loss0, *,
           per_call: int, sync_every: int, work_per_series: int) -> LoopState:
    """Run ``call(state, inputs, epoch0) -> (state, loss)`` (one compiled chunk) until the
    epochs are spent or every series is frozen.

    The host looks at the device only every ``sync_every`` calls, to stop early; and when
    fewer than a quarter of the series are still moving it continues on those alone (the
    frozen rest would cost a full pass per step for nothing), writing them back at the end.
    On the CPU, a step whose rows times ``work_per_series`` (a series' points) are few runs
    on one thread (``threads_for_steps``).
    """
    recorder.record(0, loss0, finished=cfg.epochs == 0)
    full, loss_full, rows = state, loss0, None  # rows: the active subset, None = everyone
    done, calls = 0, 0
    with threads_for_steps(state.frozen.device) as use_threads:
        while done < cfg.epochs:
            use_threads(state.frozen.shape[0] * work_per_series)
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
                    full = state if rows is None else put_rows(full, rows, state)
                    rows = active if rows is None else rows[active]
                    state = take_rows(state, active, current)
                    inputs = take_rows(inputs, active, current)
            recorder.record(done, loss_full, finished)
            if finished:
                break
    return state if rows is None else put_rows(full, rows, state)


def fit_result(out: dict, iterations, cfg: SolverConfig, solver: str,
                history: History | None = None) -> FitResult:
    wide = {name: out[name].to(torch.float64) for name in ("loss", "rmse", "r2")}
    if "frame_params" in out:
        wide.update(x_centre=out["x_centre"], x_scale=out["x_scale"],
                    frame_params=stack(in_user_order(cfg.model, out["frame_params"])))
    if "covariance" in out:  # (k x k per series, in the user's order on both axes)
        cov = torch.stack([stack(row) for row in out["covariance"]], dim=-2)
        wide["covariance"] = cov.flip(-1, -2) if cfg.model is None or cfg.model.is_poly \
            else cov
    return FitResult(params=stack(in_user_order(cfg.model, out["params"])),
                     stderr=stack(in_user_order(cfg.model, out["stderr"])), **wide,
                     model=cfg.model,
                     n_points=out["n_points"].to(torch.int64),
                     iterations=iterations.to(torch.int64), status=out["status"],
                     solver=solver, loss_name=cfg.loss.name, history=history)


def zeros(problem: Problem, dtype=None) -> torch.Tensor:
    return torch.zeros(problem.batch_size, dtype=dtype or problem.dtype, device=problem.device)


# ---------------------------------------------------------------- the damped step

# (the step's constants are literals inside ``iterate``: dynamo traces a float global as a
# symbol, which vmap's batching rules reject)
MU_START = 1e-3  # first damping, relative to D: nearly Gauss-Newton (levmar's tau)


class Damping(NamedTuple):
    """Per series: the damping, Nielsen's growth factor and MINPACK's scaling diagonal."""

    mu: torch.Tensor
    nu: torch.Tensor
    scale: Vec


def start(like: torch.Tensor, k: int, mu: float = MU_START) -> Damping:
    """The damping every series starts with (``like``: any (B,) tensor of the working dtype;
    ``mu`` 0 starts with full Newton steps)."""
    zero = torch.zeros_like(like)
    return Damping(zero + mu, zero + 2, (zero,) * k)


def decrement_ok(matrix: Mat, gradient: Vec, value, floor, consts, unrolled=None):
    """The convergence test: half the squared Newton decrement within ``tol`` of the loss."""
    decrement2, ok = linalg.inverse_quadratic(matrix, gradient, consts.pivot_tol, unrolled)
    return ok & (decrement2 / 2 <= consts.tol * (value.abs() + floor))


def iterate(p: Vec, value, gradient: Vec, matrix: Mat, damping: Damping, frozen,
            objective: Callable, project: Callable, floor, consts, accelerate=None,
            run: Callable | None = None):
    """One damped step from ``p`` for every series that is not ``frozen``.

    ``objective(p)`` is the loss at a candidate, ``project(p)`` maps it into the feasible
    box. ``accelerate(velocity)``, if given, returns the right-hand side of the geodesic
    acceleration of the step (Transtrum & Sethna 2012; solved here with the damped matrix):
    the step becomes ``v + a / 2``, and a step whose acceleration is large against its
    velocity is rejected (the model bends too much there). Returns ``(p, loss at p,
    damping, converged, stop)``: ``converged`` is the test at the incoming ``p``; a
    converged series keeps stepping while the loss does not rise and a parameter moves by
    more than sqrt(eps) of itself (each such step gains digits), then ``stop`` freezes it.

    The arithmetic is three per-series functions (``velocity_of``, ``moved_by``,
    ``settle``) around the calls of ``accelerate`` and ``objective``, which pass over the
    points. ``run(fn, *args)`` runs each over the batch (the engine's vectorizer: vmapped,
    compiled once per machine for each parameter count); without it they run on the
    batch's tuples directly, which their elementwise code allows.
    """
    run = run or (lambda fn, *args: fn(*args))
    converged, scale, damped, velocity, ok = run(velocity_of, value, gradient, matrix,
                                                 damping, floor, consts)
    force = None if accelerate is None else accelerate(velocity)
    moved, ok = run(moved_by, p, velocity, force, damped, scale, ok, converged, consts)
    candidate = project(moved)
    new_value = objective(candidate)
    return run(settle, p, candidate, value, new_value, gradient, matrix, damping, frozen, ok,
               converged, scale, floor, consts)


def algebra(vectorize, fit_s: float) -> Callable:
    """``iterate``'s ``run`` for a fit whose eager run is estimated at ``fit_s``: the step's
    arithmetic through the engine's vectorizer, as batch-wide code when uncompiled, and
    compiled with the fit's point kernels (one kernel per parameter count and dtype serves
    every model)."""
    def run(fn: Callable, *args):
        return vectorize(fn, *args, eager_s=fit_s, batched=True)
    return run


def velocity_of(value, gradient: Vec, matrix: Mat, damping: Damping, floor, consts):
    """The convergence test at p, the updated scaling, the damped matrix and the damped
    Newton step (``velocity``) with whether it could be solved."""
    k = len(gradient)
    tiny, eps = torch.finfo(value.dtype).tiny, torch.finfo(value.dtype).eps
    # (unrolled: these are compiled once per machine for every model with k parameters)
    converged = decrement_ok(matrix, gradient, value, floor, consts, unrolled=True)
    # (|diagonal|: an exact Hessian of a non-convex loss may have negative entries there)
    scale = tuple(torch.maximum(s, matrix[j][j].abs()) for j, s in enumerate(damping.scale))
    # (a parameter the loss does not see yet has a zero diagonal: damp it on the mean's
    # scale; where every curvature vanishes, as for a robust loss with all points beyond
    # f_scale, on the loss's own, so that growing damping turns the step into descent)
    typical = sum(scale) / k * 1e-9 + eps * (value.abs() + floor) + tiny
    # (a converged series polishes with undamped steps: damping would only slow the poorly
    # determined directions, and their loss differences are below rounding)
    step_mu = torch.where(converged, 0, damping.mu)
    damped = tuple(tuple(a + step_mu * (scale[i] + typical) if i == j else a
                         for j, a in enumerate(row)) for i, row in enumerate(matrix))
    velocity, ok = linalg.solve(damped, tuple(-g for g in gradient), consts.pivot_tol,
                                unrolled=True)
    return converged, scale, damped, velocity, ok


def moved_by(p: Vec, velocity: Vec, force, damped: Mat, scale: Vec, ok, converged, consts):
    """The unprojected candidate ``p + delta`` and whether its step is acceptable: the
    velocity, with ``force`` (or None) its geodesic acceleration's right-hand side."""
    delta = velocity
    if force is not None:
        acceleration, _ = linalg.solve(damped, force, consts.pivot_tol, unrolled=True)
        finite = torch.ones_like(ok)
        for a in acceleration:
            finite = finite & torch.isfinite(a)
        acceleration = tuple(torch.where(finite, a, 0) for a in acceleration)
        size_v = sum(d * v * v for d, v in zip(scale, velocity))
        size_a = sum(d * a * a for d, a in zip(scale, acceleration))
        # (Transtrum's alpha 0.75: the largest 2 |a| / |v| a step may have)
        ok = ok & (converged | (4 * size_a <= 0.5625 * size_v))
        delta = tuple(v + a / 2 for v, a in zip(velocity, acceleration))
    return tuple(pj + dj for pj, dj in zip(p, delta)), ok


def settle(p: Vec, candidate: Vec, value, new_value, gradient: Vec, matrix: Mat,
           damping: Damping, frozen, ok, converged, scale: Vec, floor, consts):
    """Accept or reject the candidate, update the damping, and say which series stop."""
    tiny, eps = torch.finfo(value.dtype).tiny, torch.finfo(value.dtype).eps
    active = ~frozen
    step = tuple(c - pj for c, pj in zip(candidate, p))
    predicted = -(linalg.dot(gradient, step) + linalg.dot(step, mat_vec(matrix, step)) / 2)
    actual = value - new_value
    # (a loss equal within rounding is no evidence against a step: in float32 such noise
    # would otherwise pile rejections up and blow the damping before convergence is seen.
    # Rounding y - pred costs about eps |y| per residual, so the loss is noisy by about
    # eps sqrt(loss * spread of y), with floor = eps * spread: far above eps * loss where
    # the residuals are small against y, as at DanWood's optimum, whose last step it hid)
    rounding = 4 * eps * (value.abs() + floor + (value.abs() * floor / eps).sqrt())
    accept = active & ok & torch.isfinite(new_value) & (new_value <= value + rounding)
    gain = torch.where(predicted > 0, actual / predicted.clamp(min=tiny), 0)
    shrink = (1 - (2 * gain - 1) ** 3).clamp(min=1 / 3, max=2)
    grown = (damping.mu * damping.nu).clamp(min=1e-3)  # (MU_START: an undamped start grows)
    mu = torch.where(accept, damping.mu * shrink, torch.where(active, grown, damping.mu))
    nu = torch.where(accept, 2, torch.where(active, 2 * damping.nu, damping.nu))
    p = tuple(torch.where(accept, c, pj) for c, pj in zip(candidate, p))
    # (polished: the loss rose beyond rounding, or every parameter moved by under sqrt(eps)
    # of itself: MINPACK's xtol, per parameter, so poorly determined ones get their digits)
    settled = torch.ones_like(accept)
    for pj, sj in zip(p, step):
        settled = settled & (sj.abs() <= eps**0.5 * pj.abs())
    polished = converged & (~accept | settled)
    # (damping past 1e12 of D: every step is below rounding; the series stops)
    stop = polished | ~torch.isfinite(value) | (mu > 1e12)
    return (p, torch.where(accept, new_value, value), Damping(mu, nu, scale), converged,
            frozen | stop)
