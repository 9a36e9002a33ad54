"""The torch twin of the native kernel: moment tables (``batchfit.moments.layout``) gathered and
solved with torch, on any device. It serves CUDA, installs without a usable native kernel, and the
tests (as an independent implementation of the same statistics).

``TorchAggregator`` gathers a table a batch at a time (``index_add``); ``dense_kernel``
makes one series' row from its points (vmapped, for ``fit`` on dense arrays);
``solve_kernel`` fits one series from its row (vmapped, compiled by the engine's policy);
``reframe`` and ``merge_tables`` move rows between frames.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from batchfit.core.keys import factory
from batchfit.fitting import linalg
from batchfit.fitting.data import scale_for, shared_tensor, used_points
from batchfit.fitting.diagnostics import coefficient_errors, finalize, frame_of
from batchfit.fitting.models import Sums, gram_from_sums, to_raw_map
from batchfit.moments.layout import (
    CENTRE,
    HALF,
    HI,
    INVH,
    LO,
    NPTS,
    WSCALE,
    YREF,
    YSCALE,
    block_size,
    new_table,
)
from batchfit.moments.shared import (
    CANCELLATION_MARGIN,
    HEADER,
    SLACK,
    SLACK_MAX_DEGREE,
    TRUST_PIVOT,
)

# ---------------------------------------------------------------- frames, in torch

def _times_t(nm: int, device) -> torch.Tensor:
    """The (nm, nm) matrix of multiplication by t in the Chebyshev basis (row j: T_j's
    coefficient): t T_0 = T_1, t T_i = (T_{i+1} + T_{i-1}) / 2."""
    m = torch.zeros(nm, nm, dtype=torch.float64, device=device)
    if nm > 1:
        m[1, 0] = 1
    for i in range(1, nm):
        m[i - 1, i] += 0.5
        if i + 1 < nm:
            m[i + 1, i] += 0.5
    return m


def cheb_map(a: torch.Tensor, b: torch.Tensor, nm: int) -> torch.Tensor:
    """(R, nm, nm): row m holds the Chebyshev coefficients of ``T_m(a t + b)``."""
    times = _times_t(nm, a.device)
    rows = [torch.zeros(len(a), nm, dtype=torch.float64, device=a.device)]
    rows[0][:, 0] = 1
    if nm > 1:
        first = torch.zeros_like(rows[0])
        first[:, 0], first[:, 1] = b, a
        rows.append(first)
    while len(rows) < nm:
        current = rows[-1]
        rows.append(2 * (a[:, None] * (current @ times.T) + b[:, None] * current) - rows[-2])
    return torch.stack(rows, dim=1)


def reframe(table: torch.Tensor, degree: int, weighted: bool, centre: torch.Tensor,
            half: torch.Tensor) -> torch.Tensor:
    """The rows of ``table`` (R, W) mapped onto frames (centre, half) that hold their points."""
    nm, k, block = 2 * degree + 1, degree + 1, block_size(degree)
    safe = torch.where(half > 0, half, 1)
    a = torch.where(half > 0, table[:, HALF] / safe, 0)
    b = torch.where(half > 0, (table[:, CENTRE] - centre) / safe, 0)
    m = cheb_map(a, b, nm)
    out = table.clone()
    for start in [HEADER] + ([HEADER + block] if weighted else []):
        sums = table[:, start:start + nm]
        out[:, start:start + nm] = torch.einsum("rmj,rj->rm", m, sums)
        rhs = table[:, start + nm:start + nm + k]
        out[:, start + nm:start + nm + k] = torch.einsum("rmj,rj->rm", m[:, :k, :k], rhs)
    out[:, CENTRE], out[:, HALF] = centre, half
    out[:, INVH] = torch.where(half > 0, 1 / safe, 0)
    return out


def rescale(table: torch.Tensor, degree: int, weighted: bool, ys: torch.Tensor,
            ws: torch.Tensor) -> torch.Tensor:
    """The rows' sums re-expressed with the scales (ys, ws), as aggregate.c's ``rescale``."""
    nm, k, block = 2 * degree + 1, degree + 1, block_size(degree)
    fy, fw = ys / table[:, YSCALE], ws / table[:, WSCALE]
    out = table.clone()
    for b, start in enumerate([HEADER] + ([HEADER + block] if weighted else [])):
        f = fw if b == 0 else torch.ones_like(fw)  # (the second block has unit weights)
        out[:, start:start + nm] *= f[:, None]
        out[:, start + nm:start + nm + k] *= (f * fy)[:, None]
        out[:, start + nm + k] *= f * fy * fy
    out[:, YSCALE], out[:, WSCALE] = ys, ws
    return out


def chebyshev_columns(t: torch.Tensor, count: int) -> list[torch.Tensor]:
    terms = [torch.ones_like(t), t]
    while len(terms) < count:
        terms.append(2 * t * terms[-1] - terms[-2])
    return terms[:count]


class TorchAggregator:
    """The native kernel's algorithm in vectorised torch, a batch at a time, on any device:
    the batch's range per series first (frames widened where needed), then its sums."""


    def __init__(self, degree: int, weighted: bool, device, rows: int = 1):
        self.degree, self.weighted, self.device = degree, weighted, torch.device(device)
        self.slack = SLACK if degree <= SLACK_MAX_DEGREE else 1.0
        self.table = torch.from_numpy(new_table(0, degree, weighted)).to(self.device)
        self.seen = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.last, self.nruns, self.runlist = -1, 0, []
        self.reserve(rows)

    @property
    def rows(self) -> int:
        return len(self.seen)

    def reserve(self, rows: int):
        if rows <= self.rows:
            return
        rows = max(rows, 2 * self.rows)
        table = torch.from_numpy(new_table(rows, self.degree, self.weighted)).to(self.device)
        table[: self.rows] = self.table
        seen = torch.zeros(rows, dtype=torch.bool, device=self.device)
        seen[: self.rows] = self.seen
        self.table, self.seen = table, seen

    def _note_runs(self, codes: torch.Tensor):
        starts = torch.ones(len(codes), dtype=torch.bool, device=codes.device)
        starts[1:] = codes[1:] != codes[:-1]
        if len(codes) and int(codes[0]) == self.last:
            starts[0] = False
        run_codes = codes[starts]
        self.nruns += len(run_codes)
        if self.runlist is not None:
            self.runlist.append(run_codes.cpu())
            if self.nruns > self.rows:
                self.runlist = None
        if len(codes):
            self.last = int(codes[-1])

    def add(self, codes, x, y, w=None, offset: int = 0, series=None):
        dev = self.device
        codes = shared_tensor(np.asarray(codes), torch.int64, dev) - offset
        if series is not None:  # list format: the rows are the runs, points or not
            rows = shared_tensor(np.asarray(series), torch.int64, dev) - offset
            self._note_runs(rows)
            self.seen[rows] = True
        x = shared_tensor(np.asarray(x), device=dev).to(torch.float64)
        y = shared_tensor(np.asarray(y), device=dev).to(torch.float64)
        w = None if w is None else shared_tensor(np.asarray(w), device=dev).to(torch.float64)
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.rows):
            raise ValueError("a series code is outside the table (a bug in batchfit)")
        if series is None:
            self._note_runs(codes)
        self.seen[codes] = True
        used = torch.isfinite(x) & torch.isfinite(y)
        if w is not None:
            used &= torch.isfinite(w) & (w > 0)
        codes, x, y = codes[used], x[used], y[used]
        w = torch.ones_like(x) if w is None else w[used]
        if not len(codes):
            return
        table, rows = self.table, self.rows
        lo = torch.full((rows,), torch.inf, dtype=torch.float64, device=dev).scatter_reduce(
            0, codes, x, "amin")
        hi = torch.full((rows,), -torch.inf, dtype=torch.float64, device=dev).scatter_reduce(
            0, codes, x, "amax")
        first = torch.full((rows,), len(codes), dtype=torch.int64, device=dev).scatter_reduce(
            0, codes, torch.arange(len(codes), device=dev), "amin")
        largest = torch.zeros((2, rows), dtype=torch.float64, device=dev)
        largest[0].scatter_reduce_(0, codes, y.abs(), "amax")
        largest[1].scatter_reduce_(0, codes, w, "amax")
        touched = torch.isfinite(lo)
        fresh = touched & (table[:, NPTS] == 0)
        new_lo, new_hi = torch.minimum(table[:, LO], lo), torch.maximum(table[:, HI], hi)
        grow = touched & ~fresh & ((new_lo < table[:, CENTRE] - table[:, HALF])
                                   | (new_hi > table[:, CENTRE] + table[:, HALF]))
        table[:, LO], table[:, HI] = new_lo, new_hi
        if bool(fresh.any()):
            rows_f = torch.nonzero(fresh).squeeze(1)
            table[rows_f, CENTRE] = (lo[rows_f] + hi[rows_f]) / 2
            table[rows_f, HALF] = (hi[rows_f] - lo[rows_f]) / 2
            half = table[rows_f, HALF]
            table[rows_f, INVH] = torch.where(half > 0, 1 / torch.where(half > 0, half, 1), 0)
            table[rows_f, YREF] = y[first[rows_f]]
            table[rows_f, YSCALE] = scale_for(largest[0, rows_f])
            table[rows_f, WSCALE] = scale_for(largest[1, rows_f])
        if bool(grow.any()):
            rows_g = torch.nonzero(grow).squeeze(1)
            part = table[rows_g]
            centre = (part[:, LO] + part[:, HI]) / 2
            half = (part[:, HI] - part[:, LO]) / 2 * self.slack
            half = torch.maximum(half, torch.maximum(centre - part[:, LO], part[:, HI] - centre))
            table[rows_g] = reframe(part, self.degree, self.weighted, centre, half)
        self._sum(codes, x, y, w)

    def _sum(self, codes, x, y, w):
        table, degree = self.table, self.degree
        nm, k = 2 * degree + 1, degree + 1
        t = (x - table[codes, CENTRE]) * table[codes, INVH]
        yy = (y - table[codes, YREF]) * table[codes, YSCALE]  # (in the rows' scales)
        terms = chebyshev_columns(t, nm)
        blocks = [(HEADER, w * table[codes, WSCALE])] + (
            [(HEADER + block_size(degree), torch.ones_like(w))] if self.weighted else [])
        for start, weight in blocks:
            values = [weight * tm for tm in terms] + [weight * yy * tm for tm in terms[:k]] \
                + [weight * yy * yy]
            table[:, start:start + len(values)].index_add_(0, codes, torch.stack(values, 1))
        table[:, NPTS].index_add_(0, codes, torch.ones_like(x))

    def flush(self):
        pass

    def finish(self, rows: int | None = None) -> torch.Tensor:
        rows = self.rows if rows is None else rows
        part = self.table[:rows]
        centre, half = (part[:, LO] + part[:, HI]) / 2, (part[:, HI] - part[:, LO]) / 2
        off = (part[:, NPTS] > 0) & ((centre != part[:, CENTRE]) | (half != part[:, HALF]))
        if bool(off.any()):
            idx = torch.nonzero(off).squeeze(1)
            part[idx] = reframe(part[idx], self.degree, self.weighted, centre[idx], half[idx])
        return part

    def runs(self) -> np.ndarray | None:
        if self.runlist is None:
            return None
        return torch.cat(self.runlist).numpy() if self.runlist else np.zeros(0, np.int64)

    def seen_codes(self) -> np.ndarray:
        return torch.nonzero(self.seen).squeeze(1).cpu().numpy()

    def state(self) -> dict:
        runs = self.runs()
        return {"table": self.table.cpu().numpy(), "seen": self.seen.cpu().numpy(),
                "last": self.last, "nruns": self.nruns,
                "runlist": np.zeros(0, np.int64) if runs is None else runs,
                "scattered": runs is None}

    def load_state(self, state: dict):
        self.reserve(len(state["seen"]))
        rows = len(state["seen"])
        self.table[:rows] = torch.from_numpy(state["table"]).to(self.device)
        self.seen[:rows] = torch.from_numpy(state["seen"]).to(self.device)
        self.last, self.nruns = int(state["last"]), int(state["nruns"])
        self.runlist = None if bool(state["scattered"]) else [torch.from_numpy(
            np.asarray(state["runlist"], np.int64))]

    def residual(self, codes, x, y, w, flagged: np.ndarray, q: np.ndarray, out: np.ndarray,
                 offset: int = 0):
        """As ``native.Aggregator.residual``: residual moments of the flagged rows' points."""
        dev, k = self.device, self.degree + 1
        codes = shared_tensor(np.asarray(codes), torch.int64, dev) - offset
        x = shared_tensor(np.asarray(x), device=dev).to(torch.float64)
        y = shared_tensor(np.asarray(y), device=dev).to(torch.float64)
        w = torch.ones_like(x) if w is None else \
            shared_tensor(np.asarray(w), device=dev).to(torch.float64)
        keep = torch.as_tensor(flagged, device=dev)[codes].bool() & torch.isfinite(x) \
            & torch.isfinite(y) & torch.isfinite(w) & (w > 0)
        codes, x, y, w = codes[keep], x[keep], y[keep], w[keep]
        table = self.table
        t = (x - table[codes, CENTRE]) * table[codes, INVH]
        terms = chebyshev_columns(t, k)
        qs = torch.as_tensor(q, device=dev)[codes]
        r = (y - table[codes, YREF]) * table[codes, YSCALE] \
            - sum(qs[:, j] * terms[j] for j in range(k))
        w = w * table[codes, WSCALE]
        values = [w * r * tm for tm in terms] + [w * r * r]
        if self.weighted:
            values += [r * tm for tm in terms] + [r * r]
        moments = torch.zeros(out.shape, dtype=torch.float64, device=dev)
        moments.index_add_(0, codes, torch.stack(values, 1))
        out += moments.cpu().numpy()


def merge_tables(dst: torch.Tensor, src: torch.Tensor, degree: int, weighted: bool
                 ) -> torch.Tensor:
    """``dst + src`` row by row, each row in any frame; merged rows in their exact frame."""
    nm, k, block = 2 * degree + 1, degree + 1, block_size(degree)
    out = torch.where((dst[:, NPTS] == 0)[:, None], src, dst)
    both = torch.nonzero((dst[:, NPTS] > 0) & (src[:, NPTS] > 0)).squeeze(1)
    if not len(both):
        return out
    d, s = dst[both], src[both]
    lo, hi = torch.minimum(d[:, LO], s[:, LO]), torch.maximum(d[:, HI], s[:, HI])
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    d, s = reframe(d, degree, weighted, centre, half), reframe(s, degree, weighted, centre, half)
    ys = torch.minimum(d[:, YSCALE], s[:, YSCALE])
    ws = torch.minimum(d[:, WSCALE], s[:, WSCALE])
    d, s = rescale(d, degree, weighted, ys, ws), rescale(s, degree, weighted, ys, ws)
    shift = (s[:, YREF] - d[:, YREF]) * ys
    for start in [HEADER] + ([HEADER + block] if weighted else []):
        sums, rhs = s[:, start:start + nm], s[:, start + nm:start + nm + k]
        r0 = rhs[:, 0].clone()
        s[:, start + nm:start + nm + k] = rhs + shift[:, None] * sums[:, :k]
        s[:, start + nm + k] += 2 * shift * r0 + shift**2 * sums[:, 0]
    merged = d.clone()
    merged[:, HEADER:] += s[:, HEADER:]
    merged[:, NPTS] += s[:, NPTS]
    merged[:, LO], merged[:, HI] = lo, hi
    out[both] = merged
    return out


# ---------------------------------------------------------------- the fit of one series

@factory
def solve_kernel(degree: int, weighted: bool, refined: bool):
    """One series' fit from its row (a tuple of 0-d tensors, as vmapped), in float64.

    Returns the output record of ``diagnostics.finalize`` plus ``trusted`` (False where the
    sums lose digits: an unevenly spread x, a relative Cholesky pivot below TRUST_PIVOT, or a
    residual sum of squares lost in cancellation; such rows get one refinement step with
    their points) and ``q`` (Chebyshev coefficients of y - yref in the frame). ``refined``:
    the kernel also takes that step's residual moments (``q`` of the pass that made them, and
    sum w r T_j, sum w r^2, and the unweighted pair) and applies it.
    """
    nm, k, block = 2 * degree + 1, degree + 1, block_size(degree)

    def kernel(row, consts, *step):
        centre, half, n = row[CENTRE], row[HALF], row[NPTS]
        s, rhs, y2 = row[HEADER:HEADER + nm], row[HEADER + nm:HEADER + nm + k], row[
            HEADER + nm + k]
        gram = gram_from_sums(s, k)
        q, solvable = linalg.solve(gram, rhs, consts.pivot_tol)
        sse = y2 - linalg.dot(q, rhs)
        if weighted:
            u = row[HEADER + block:HEADER + block + nm]
            ru = row[HEADER + block + nm:HEADER + block + nm + k]
            y2u = row[HEADER + block + nm + k]
            gram_u = gram_from_sums(u, k)
        if refined:  # one step of iterative refinement with the residuals of ``q0``
            q0, c, rss, cu, rssu = step
            delta, _ = linalg.solve(gram, c, consts.pivot_tol)
            q = tuple(a + b for a, b in zip(q0, delta))
            sse = rss - linalg.dot(c, delta)
            sse_u = (rssu - 2 * linalg.dot(delta, cu)
                     + linalg.dot(delta, linalg.mat_vec(gram_u, delta))) if weighted else sse
            trusted = torch.ones_like(solvable)
        else:
            sse_u = (y2u - 2 * linalg.dot(q, ru) + linalg.dot(q, linalg.mat_vec(gram_u, q))
                     ) if weighted else sse
            well = linalg.cholesky(gram, consts.trust_pivot)[1]
            kept = (sse >= consts.cancellation_tol * y2) & (sse_u >= consts.cancellation_tol
                                                           * (y2u if weighted else y2))
            trusted = well & ((n <= k) | kept) & torch.isfinite(sse)
        interpolates = n <= k  # as many points as coefficients: no residual at all
        sse = torch.where(interpolates, 0, sse.clamp(min=0))
        sse_u = torch.where(interpolates, 0, sse_u.clamp(min=0))
        # (the sums are in the row's scales, u = (y - yref) yscale, v = w wscale: the fit's
        # numbers are unscaled here; r2 and the trust tests do not depend on them)
        ys = row[YSCALE]
        wsum = s[0]
        sst = y2 - rhs[0] * (rhs[0] / wsum)
        q_full = (q[0] / ys + row[YREF],) + tuple(qj / ys for qj in q[1:])
        sums = Sums(centre=centre, half=half, centre_raw=centre, gram=gram, rhs=rhs,
                    wsum=wsum, n=n, ybar=None)
        scaled_loss = sse / wsum
        summary = {"loss": scaled_loss / ys / ys, "rmse": torch.sqrt(sse_u / n) / ys,
                   "r2": torch.where(sst > 0, 1 - sse / sst, torch.nan),
                   "params": linalg.mat_vec(to_raw_map(centre, half, k), q_full),
                   "stderr": tuple(e / ys for e in coefficient_errors(sums, gram, sse,
                                                                       consts.pivot_tol)[0]),
                   "frame": frame_of(centre, half, q_full)}
        count = n.to(torch.int64)
        # (finite in the row's scale: a loss beyond float64 for |y| above ~1e154 is inf)
        out = finalize({**summary, "loss": scaled_loss}, count, solvable,
                       torch.ones_like(solvable), torch.zeros_like(solvable))
        out["loss"] = torch.where(torch.isnan(out["loss"]), out["loss"], summary["loss"])
        out["trusted"] = trusted
        out["q"] = q
        return out
    return kernel


class Consts(NamedTuple):
    """The solve's tolerances, float64 0-d tensors (so that changing them never recompiles)."""

    pivot_tol: torch.Tensor
    trust_pivot: torch.Tensor
    cancellation_tol: torch.Tensor

    @classmethod
    def make(cls, degree: int, device) -> Consts:
        eps = torch.finfo(torch.float64).eps
        def scalar(v):
            return torch.tensor(v, dtype=torch.float64, device=device)
        return cls(scalar(100 * (degree + 1) * eps), scalar(TRUST_PIVOT),
                   scalar(CANCELLATION_MARGIN * eps))


def columns(table: torch.Tensor) -> tuple:
    """(R, W) -> W contiguous (R,) tensors: the tuple layout the kernels vmap over."""
    return tuple(table.T.contiguous().unbind(0))


def solve(table: torch.Tensor, degree: int, weighted: bool, vectorize, step=None) -> dict:
    """Every row's fit (``solve_kernel``), ``vectorize`` being the engine's hook; ``step``:
    a refinement step's residual moments, (q0, c, rss, cu, rssu) as tuples of (R,) tensors."""
    consts = Consts.make(degree, table.device)
    args = (columns(table), consts) + (() if step is None else tuple(step))
    return vectorize(solve_kernel(degree, weighted, step is not None), *args,
                     eager_s=EAGER_S_PER_ROW * len(table))


EAGER_S_PER_ROW = 3e-7  # the solve, eager, per series (measured: 2-core Xeon, torch 2.13)


@factory
def dense_kernel(degree: int, weighted: bool):
    """One series' row from its points (torch; vmapped): the native kernel's result for a
    whole series, for CUDA and where no native kernel is usable. Float64 throughout."""
    nm, k = 2 * degree + 1, degree + 1

    def kernel(series):
        w, x, y = used_points(series)
        w, x, y = w.to(torch.float64), x.to(torch.float64), y.to(torch.float64)
        used = w > 0
        n = used.sum().to(torch.float64)
        lo = torch.where(used, x, torch.inf).amin()
        hi = torch.where(used, x, -torch.inf).amax()
        some = n > 0
        centre = torch.where(some, (lo + hi) / 2, 0)
        half = torch.where(some, (hi - lo) / 2, 0)
        inv = torch.where(half > 0, 1 / torch.where(half > 0, half, 1), 0)
        first = used & (torch.cumsum(used.to(torch.int64), 0) == 1)
        yref = torch.where(first, y, 0).sum()
        ys = scale_for(torch.where(used, y.abs(), 0).amax())
        ws = scale_for(torch.where(used, w, 0).amax()) if weighted else torch.ones_like(ys)
        t = torch.where(used, (x - centre) * inv, 0)
        yy = torch.where(used, (y - yref) * ys, 0)
        terms = chebyshev_columns(t, nm)
        row = [centre, half, inv, yref, lo, hi, n, ys, ws]
        for weight in [w * ws] + ([used.to(torch.float64)] if weighted else []):
            row += [(weight * tm).sum() for tm in terms]
            row += [(weight * yy * tm).sum() for tm in terms[:k]]
            row.append((weight * yy * yy).sum())
        return tuple(row)
    return kernel
