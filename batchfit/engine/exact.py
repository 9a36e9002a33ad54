"""The exact MSE polynomial fit of dense inputs: the native kernel gathers and solves the
moment tables on the CPU, its torch twin on CUDA (or where no native kernel is usable)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from batchfit.core.options import Options
from batchfit.engine import MomentBackend, usable_cpus
from batchfit.engine.devices import resolve_device, thread_pool
from batchfit.engine.policy import vectorizer
from batchfit.fitting import moment_twin as stats
from batchfit.fitting.data import (
    FitResult,
    Inputs,
    Series,
    problem_of,
)
from batchfit.fitting.loop import SolverConfig
from batchfit.fitting.models import (
    in_user_order,
    polynomial,
)
from batchfit.fitting.solvers import (
    EAGER_S_PER_POINT,
    refit_exact,
    solve_exact,
)
from batchfit.moments import layout as moments
from batchfit.moments import native
from batchfit.moments.covariance import covariance
from batchfit.moments.degrees import padded

NATIVE_MIN_ROWS = 8192  # rows per thread of the native kernel, at least


def exact_fit(inputs: Inputs, cfg: SolverConfig, vectorize, opts: Options) -> FitResult:
    """The exact fit of dense inputs from their moment tables (``batchfit.moments.layout``): on the
    CPU gathered and solved by the native kernel (rows shared out over the threads), else
    (CUDA, or no usable native kernel) by its torch twin on the inputs' device. Series whose sums lost
    digits are fitted again on their points. ``opts.auto_degree``: each series' degree is
    chosen (``batchfit.moments.degrees``) and its refit made at that degree."""
    def points(rows):
        return problem_of(inputs.take(rows), dtype=torch.float64)

    torch_twin = inputs.y.device.type != "cpu" or native.library() is None
    if torch_twin and not opts.auto_degree:
        table, weighted = _aggregate_torch(inputs, cfg.degree, vectorize)
        result = solve_exact(table, weighted, cfg, vectorize, points)
        if not opts.covariance:
            return result
        cov = covariance(table.cpu().numpy(), result.record())
        return dataclasses.replace(result, covariance=torch.from_numpy(cov).to(table.device))
    if torch_twin:
        table, weighted = _aggregate_torch(inputs, cfg.degree, vectorize)
        record = _with_covariance(MomentBackend(opts, uses_torch=True).fits(
            table.cpu().numpy(), weighted), table.cpu().numpy(), opts)
    else:
        record = _solve_native(inputs, opts)
    result = FitResult.from_record(record, solver="exact", loss_name=cfg.loss.name,
                                   model=cfg.model, device=inputs.y.device)
    redo = np.flatnonzero(~record["trusted"])
    degrees = record.get("degrees", np.full(len(record["status"]), cfg.degree))
    for degree in np.unique(degrees[redo]):
        rows = redo[degrees[redo] == degree]
        part = refit_exact(points(torch.from_numpy(rows)),
                           dataclasses.replace(cfg, degree=int(degree),
                                               model=polynomial(int(degree))), vectorize)
        if opts.auto_degree:
            part = FitResult.from_record(padded(part.record(), int(degree), cfg.degree),
                                         solver="exact", loss_name=cfg.loss.name,
                                         model=cfg.model, device=inputs.y.device)
        result = result.with_rows(torch.from_numpy(rows), part)
    return result


def _with_covariance(record: dict, table: np.ndarray, opts: Options) -> dict:
    """A solved table's record, with each row's covariance when the options ask for it."""
    if opts.covariance:
        record["covariance"] = covariance(table, record)
    return record


def _aggregate_torch(inputs: Inputs, degree: int, vectorize) -> tuple[torch.Tensor, bool]:
    problem = problem_of(inputs, dtype=torch.float64, centre_x=False)
    weighted = problem.w is not None
    rows = vectorize(stats.dense_kernel(degree, weighted), Series.of(problem),
                     eager_s=EAGER_S_PER_POINT["careful"] * problem.y.numel())
    return torch.stack(rows, dim=1), weighted


def _solve_native(inputs: Inputs, opts: Options) -> dict:
    """``native.solve``'s record of dense inputs, each thread gathering and solving its own
    share of the rows."""
    x, y, w, lengths, mask = inputs
    batch, n = y.shape
    if lengths is not None or mask is not None:  # unused points become weight 0
        keep = torch.ones((batch, n), dtype=torch.bool) if mask is None else mask
        if lengths is not None:
            keep = keep & (torch.arange(n) < lengths[:, None])
        w = keep.to(torch.float64) if w is None else w * keep
    single = all(v is None or v.dtype == torch.float32 for v in (x, y, w))
    dtype = np.float32 if single else np.float64

    def array(value):
        return None if value is None else np.asarray(value.detach().numpy(), dtype=dtype)

    xs = array(x[0] if inputs.shared_x else x)
    ys, ws = array(y), array(w)
    parts = max(1, min(usable_cpus(), batch // NATIVE_MIN_ROWS))
    bounds = np.linspace(0, batch, parts + 1).astype(int)

    def part(lo: int, hi: int) -> dict:
        agg = native.Aggregator(opts.degree, ws is not None, dtype == np.float64,
                                rows=hi - lo)
        agg.add_dense(0, xs if xs.ndim == 1 else xs[lo:hi], ys[lo:hi],
                      None if ws is None else ws[lo:hi])
        table = agg.finish(hi - lo)
        return _with_covariance(MomentBackend(opts, uses_torch=False).fits(
            table, ws is not None), table, opts)

    records = list(thread_pool().map(part, bounds[:-1], bounds[1:]))
    return records[0] if parts == 1 else {
        name: np.concatenate([record[name] for record in records]) for name in records[0]}


def solve_moments(table, weighted: bool, step, opts: Options) -> dict:
    """``native.solve``'s record, computed by the torch twin (``stats.solve_kernel``) on
    ``opts``' device: for jobs that gather their tables with torch."""
    degree, k = opts.degree, opts.degree + 1
    device = resolve_device(opts.device)
    table = torch.as_tensor(np.asarray(table), device=device)
    if step is not None:
        m = torch.as_tensor(np.asarray(step), device=device).T
        step = (tuple(m[:k]), tuple(m[k:2 * k]), m[2 * k], tuple(m[2 * k + 1:3 * k + 1]),
                m[3 * k + 1])
    out = stats.solve(table, degree, weighted, vectorizer(opts), step)

    def column(name, value):
        if name in FitResult.PER_PARAMETER:  # (computed lowest power first)
            value = in_user_order(None, value)
        return (torch.stack(value, 1) if isinstance(value, tuple) else value).cpu().numpy()

    record = {name: column(name, value) for name, value in out.items()}
    record["n_points"] = record["n_points"].astype(np.int64)
    record["iterations"] = moments.exact_iterations(record["status"])
    return moments.exact_r2(record)
