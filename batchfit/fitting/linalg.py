"""Small dense algebra on one series, unrolled over the matrix size.

Inside the kernels a series' vectors and matrices are tuples of 0-d tensors (``Vec``, ``Mat``),
not (k,) or (k, k) tensors. The same functions take tuples of (B,) tensors, one entry per
series: the solvers' small algebra runs on the whole batch that way, without vmap. Vmapped, every entry becomes one contiguous (B,) vector, so the
compiled code is a single fused, vectorised loop over the batch; (B, k) and (B, k, k) tensors
instead split it into many strided passes (measured 8x slower for a GD step; see
benchmarks/RESULTS.md). A pivot that is not clearly positive marks the matrix as (numerically)
singular instead of raising, so one bad series never disturbs the others.

From ``STACKED_FROM`` parameters on, factorisations and solves stack the matrix and call
LAPACK (``torch.linalg.cholesky_ex``, batched under vmap): an unrolled 8 x 8 Cholesky is
hundreds of scalar nodes, and three of them took inductor a minute to compile. Callers
that are compiled once per machine for all models (the damped step's arithmetic) pass
``unrolled=True``: unrolled, an 8 x 8 step runs 3-4x faster, eager (7-8 ms against 21-32 ms
on 1e4 series) and compiled (26 ms against 400 ms a fit).
"""

from __future__ import annotations

import torch

Vec = tuple  # of k 0-d tensors
Mat = tuple  # of k Vecs (rows)


def mat_vec(a: Mat, v: Vec) -> Vec:
    return tuple(sum(aij * vj for aij, vj in zip(row, v)) for row in a)


def mat_mat(a: Mat, b: Mat) -> Mat:
    columns = list(zip(*b))
    return tuple(tuple(sum(x * y for x, y in zip(row, col)) for col in columns) for row in a)


def transpose(a: Mat) -> Mat:
    return tuple(zip(*a))


def dot(u: Vec, v: Vec):
    return sum(x * y for x, y in zip(u, v))


STACKED_FROM = 5


def _unroll(a: Mat, unrolled: bool | None) -> bool:
    return len(a) < STACKED_FROM if unrolled is None else unrolled


def _stacked(a: Mat) -> torch.Tensor:
    """(..., k, k): the matrix of every series (``...`` is empty per series, (B,) batched)."""
    return torch.stack([torch.stack(row, dim=-1) for row in a], dim=-2)


def _stacked_cholesky(a: Mat, rel_tol: torch.Tensor):
    """(L as a (..., k, k) tensor, ok): LAPACK's factor, with the same relative pivot test."""
    matrix = _stacked(a)
    factor, info = torch.linalg.cholesky_ex(matrix)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1) ** 2
    diagonal = torch.diagonal(matrix, dim1=-2, dim2=-1).abs()
    ok = (info == 0) & (pivots > rel_tol * diagonal).all(dim=-1)
    eye = torch.eye(len(a), dtype=matrix.dtype, device=matrix.device)
    return torch.where(ok[..., None, None], torch.nan_to_num(factor), eye), ok


def _column(v: Vec) -> torch.Tensor:
    return torch.stack(v, dim=-1)[..., None]


def cholesky(a: Mat, rel_tol: torch.Tensor, unrolled: bool | None = None):
    """Lower Cholesky factor of a small symmetric matrix, as nested lists.

    Returns ``(factor, ok)``; ``ok`` is False when some pivot is not above ``rel_tol`` times its
    diagonal entry (rank-deficient or indefinite). Failed pivots are replaced by 1 so the
    arithmetic stays finite; callers must mask by ``ok``.
    """
    k = len(a)
    if not _unroll(a, unrolled):
        stacked, ok = _stacked_cholesky(a, rel_tol)
        return [list(row.unbind(-1)) for row in stacked.unbind(-2)], ok
    factor = [[None] * k for _ in range(k)]
    ok = None
    for j in range(k):
        pivot = a[j][j] - sum(factor[j][m] ** 2 for m in range(j))
        good = pivot > rel_tol * a[j][j].abs()
        ok = good if ok is None else ok & good
        root = torch.sqrt(torch.where(good, pivot, 1))
        factor[j][j] = root
        for i in range(j + 1, k):
            factor[i][j] = (a[i][j] - sum(factor[i][m] * factor[j][m] for m in range(j))) / root
    return factor, ok


def _forward(factor, b: Vec) -> list:
    """Solve L z = b."""
    z = []
    for i in range(len(factor)):
        z.append((b[i] - sum(factor[i][m] * z[m] for m in range(i))) / factor[i][i])
    return z


def _backward(factor, z) -> Vec:
    """Solve L^T x = z."""
    k = len(factor)
    x = [None] * k
    for i in reversed(range(k)):
        x[i] = (z[i] - sum(factor[m][i] * x[m] for m in range(i + 1, k))) / factor[i][i]
    return tuple(x)


def solve(a: Mat, b: Vec, rel_tol: torch.Tensor, unrolled: bool | None = None):
    """``(a^-1 b, ok)`` for a small symmetric positive definite ``a``."""
    if not _unroll(a, unrolled):
        factor, ok = _stacked_cholesky(a, rel_tol)
        return tuple(torch.cholesky_solve(_column(b), factor)[..., 0].unbind(-1)), ok
    factor, ok = cholesky(a, rel_tol, unrolled=True)
    return _backward(factor, _forward(factor, b)), ok


def inverse(a: Mat, rel_tol: torch.Tensor):
    """``(a^-1, ok)`` for a small symmetric positive definite ``a``."""
    if len(a) >= STACKED_FROM:
        factor, ok = _stacked_cholesky(a, rel_tol)
        inverse = torch.cholesky_inverse(factor)
        return tuple(tuple(row.unbind(-1)) for row in inverse.unbind(-2)), ok
    factor, ok = cholesky(a, rel_tol, unrolled=True)
    k = len(a)
    one, zero = torch.ones_like(a[0][0]), torch.zeros_like(a[0][0])
    columns = [_backward(factor, _forward(factor, [one if i == j else zero for i in range(k)]))
               for j in range(k)]
    return transpose(columns), ok


def inverse_quadratic(a: Mat, g: Vec, rel_tol: torch.Tensor, unrolled: bool | None = None):
    """``(g^T a^-1 g, ok)``: the squared Newton decrement when ``a`` is a Hessian."""
    if not _unroll(a, unrolled):
        factor, ok = _stacked_cholesky(a, rel_tol)
        z = torch.linalg.solve_triangular(factor, _column(g), upper=False)
        return (z * z).sum(dim=(-2, -1)), ok
    factor, ok = cholesky(a, rel_tol, unrolled=True)
    return sum(z**2 for z in _forward(factor, g)), ok
