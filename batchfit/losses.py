"""Per-point losses: scipy.optimize.least_squares' robust family, and user callables.

A built-in loss of a residual ``r`` is ``f_scale**2 * rho((r / f_scale)**2)`` with scipy's
``rho`` (``linear`` is plain squared error, the seed's MSE). A series' loss is the weighted mean
of its points' losses, so minimisers are exactly scipy's (its cost is half the unweighted sum).

A user loss is a callable ``loss(pred, y)`` on one series' 1-D tensors. It returns either the
per-point losses (same shape as ``y``; batchfit takes the weighted mean over valid points, so
ragged, weighted and NaN-holed data all work) or one scalar, the seed's form
``lambda pred, y: ((pred - y) ** 2).mean()``, which is only allowed when every series has all
its points valid and unit weights (a scalar cannot skip padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .names import BUILTIN_LOSSES


def _linear(z):
    return z


def _huber(z):
    # sqrt is guarded so the branch torch.where discards has a finite gradient.
    return torch.where(z <= 1, z, 2 * torch.sqrt(torch.where(z <= 1, 1, z)) - 1)


def _soft_l1(z):
    return 2 * (torch.sqrt(1 + z) - 1)


def _cauchy(z):
    return torch.log1p(z)


def _arctan(z):
    return torch.arctan(z)


RHO = {"mse": _linear, "linear": _linear, "huber": _huber, "soft_l1": _soft_l1,
       "cauchy": _cauchy, "arctan": _arctan}


@dataclass(frozen=True)
class Loss:
    """A resolved loss: a built-in name (with ``rho``) or a user callable."""

    name: str
    rho: Callable | None = None
    user: Callable | None = None
    reduces: bool = False  # the user callable returns a scalar per series

    @property
    def stable_key(self):
        """A name that means the same in every process (None for user callables)."""
        return None if self.user is not None else ("loss", self.name)

    @property
    def is_mse(self) -> bool:
        return self.rho is _linear

    def point_loss(self, r: torch.Tensor, f_scale: torch.Tensor) -> torch.Tensor:
        """Per-point loss of residuals ``r`` (built-in losses only)."""
        return f_scale**2 * self.rho((r / f_scale) ** 2)

    def psi(self, r: torch.Tensor, f_scale: torch.Tensor):
        """Per-point ``psi(r) = l'(r) / 2`` and its derivative (built-in losses only)."""
        half_loss = lambda ri: self.point_loss(ri, f_scale) / 2
        first = torch.func.grad(half_loss)
        return torch.func.vmap(first)(r), torch.func.vmap(torch.func.grad(first))(r)

    def series_loss(self, pred, y, w, f_scale):
        """Weighted mean loss of one series; ``w`` is 0 on points that are not used."""
        if self.user is None:
            per_point = self.point_loss(y - pred, f_scale)
        else:
            per_point = self.user(pred, y)
            if self.reduces:
                return per_point
        return (w * per_point).sum() / w.sum()


def resolve_loss(loss: str | Callable) -> Loss:
    if callable(loss):
        probe = torch.linspace(0.0, 1.0, 4)
        out = torch.as_tensor(loss(probe + 0.5, probe))
        if out.shape not in (torch.Size([]), probe.shape):
            raise ValueError("a loss callable must return per-point losses (same shape as y) "
                             f"or a scalar, got shape {tuple(out.shape)}")
        return Loss(getattr(loss, "__name__", "custom"), user=loss, reduces=out.ndim == 0)
    if loss not in RHO:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(BUILTIN_LOSSES)} "
                         "or pass a callable")
    return Loss("mse" if loss == "linear" else loss, rho=RHO[loss])
