"""Per-point losses: scipy.optimize.least_squares' robust family, and user callables.

A built-in loss of a residual ``r`` is ``f_scale**2 * rho((r / f_scale)**2)`` with scipy's
``rho`` (``linear`` is plain squared error, the seed's MSE). A series' loss is the weighted mean
of its points' losses, so minimisers are exactly scipy's (its cost is half the unweighted sum).

A user loss is a callable ``loss(pred, y)`` on one series' 1-D tensors. It returns either the
per-point losses (same shape as ``y``; batchfit takes the weighted mean over valid points, so
ragged, weighted and NaN-holed data all work) or one scalar, the seed's form
``lambda pred, y: ((pred - y) ** 2).mean()``, which is only allowed when every series has all
its points valid and unit weights (a scalar cannot skip padding).

``poisson`` is a likelihood, not a function of the residual: the Poisson deviance of counts
``y >= 0`` at predictions ``mu``, ``2 (y log(y / mu) - (y - mu))`` per point (``y log y = 0``
at y = 0), twice the negative log-likelihood up to a constant, so its minimiser is the
maximum-likelihood fit (a weight multiplies a point's log-likelihood term). It is +inf
where ``mu <= 0``, so Levenberg-Marquardt rejects any step that leaves the domain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchfit.core.keys import fingerprint
from batchfit.core.names import BUILTIN_LOSSES, LIKELIHOOD_LOSSES


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

# Each built-in loss written out in the residual r: ``l(r) = f^2 rho((r / f)^2)`` and, with
# ``slopes``, also ``l'(r)`` and ``l''(r)``. The solvers' gradients and Hessians of built-in
# losses come from these, with no autograd (eager, a few passes over the points instead of a
# graph per step; compiled, a small graph); the loss itself is this one formula everywhere,
# so a loss computed with its derivatives equals the loss computed alone, bit for bit. They
# equal ``RHO``'s definitions and their autograd derivatives to rounding
# (tests/test_robust.py).


def _linear_terms(r, f, slopes):
    value = r * r
    return (value, 2 * r, torch.full_like(r, 2.0)) if slopes else value


def _huber_terms(r, f, slopes):
    a = r.abs()
    inside = a <= f
    value = torch.where(inside, r * r, f * (2 * a - f))
    if not slopes:
        return value
    return value, 2 * r.clamp(min=-f, max=f), torch.where(inside, 2.0, 0.0).to(r.dtype)


def _soft_l1_terms(r, f, slopes):
    root = torch.sqrt(1 + (r / f) ** 2)
    value = 2 * f * f * (root - 1)
    return (value, 2 * r / root, 2 / root**3) if slopes else value


def _cauchy_terms(r, f, slopes):
    z = (r / f) ** 2
    value = f * f * torch.log1p(z)
    if not slopes:
        return value
    inverse = 1 / (1 + z)
    return value, 2 * r * inverse, 2 * (1 - z) * inverse**2


def _arctan_terms(r, f, slopes):
    z = (r / f) ** 2
    value = f * f * torch.arctan(z)
    if not slopes:
        return value
    inverse = 1 / (1 + z * z)
    return value, 2 * r * inverse, 2 * (1 - 3 * z * z) * inverse**2


def _poisson_terms(pred, y, slopes):
    """The deviance and, with ``slopes``, its derivatives in the prediction: the slope
    ``2 (1 - y / mu)`` and Fisher's curvature ``2 / mu`` (the observed one, ``2 y / mu^2``
    as Gpufit's MLE uses, is 0 at y = 0, where a Levenberg-Marquardt step needs a positive
    one; at the optimum both give the same information on average). +inf, with no slope,
    where ``mu <= 0``."""
    positive = pred > 0
    mu = torch.where(positive, pred, 1)  # (the discarded branch stays finite for autograd)
    value = torch.where(positive, 2 * (torch.xlogy(y, y / mu) - (y - mu)), torch.inf)
    if not slopes:
        return value
    return value, torch.where(positive, 2 * (1 - y / mu), 0), torch.where(positive, 2 / mu, 0)


TERMS = {_linear: _linear_terms, _huber: _huber_terms, _soft_l1: _soft_l1_terms,
         _cauchy: _cauchy_terms, _arctan: _arctan_terms}


@dataclass(frozen=True)
class Loss:
    """A resolved loss: a built-in name (with ``rho``) or a user callable."""

    name: str
    rho: Callable | None = None
    user: Callable | None = None
    reduces: bool = False  # the user callable returns a scalar per series

    @property
    def stable_key(self):
        """A name that means the same in every process: a built-in loss's, a user's by its
        code's fingerprint (None when its code has none)."""
        if self.user is None:
            return ("loss", self.name)
        code = fingerprint(self.user)
        return None if code is None else ("user loss", code, self.reduces)

    @property
    def is_mse(self) -> bool:
        return self.rho is _linear

    @property
    def likelihood(self) -> bool:
        """A deviance of (pred, y) (``poisson``), not a function of the residual."""
        return self.name in LIKELIHOOD_LOSSES and self.user is None

    def weighted(self, w: torch.Tensor, per_point: torch.Tensor) -> torch.Tensor:
        """``w * per_point``, 0 on unused points (w = 0) even where a likelihood is +inf
        there (an unused point's prediction may leave its domain)."""
        return torch.where(w > 0, w * per_point, 0) if self.likelihood else w * per_point

    def pred_derivatives(self, pred: torch.Tensor, y: torch.Tensor, f_scale: torch.Tensor):
        """Per-point ``(l, dl/dpred, d2l/dpred2)`` in closed form (built-in losses only)."""
        if self.likelihood:
            return _poisson_terms(pred, y, slopes=True)
        value, slope, bend = self.derivatives(y - pred, f_scale)
        return value, -slope, bend

    def point_loss(self, r: torch.Tensor, f_scale: torch.Tensor) -> torch.Tensor:
        """Per-point loss of residuals ``r`` (built-in losses only)."""
        return TERMS[self.rho](r, f_scale, slopes=False)

    def derivatives(self, r: torch.Tensor, f_scale: torch.Tensor):
        """Per-point ``(l(r), l'(r), l''(r))`` in closed form (built-in losses only)."""
        return TERMS[self.rho](r, f_scale, slopes=True)

    def psi(self, r: torch.Tensor, f_scale: torch.Tensor):
        """Per-point ``psi(r) = l'(r) / 2`` and its derivative (built-in losses only)."""
        _, first, second = self.derivatives(r, f_scale)
        return first / 2, second / 2

    def series_loss(self, pred, y, w, f_scale):
        """Weighted mean loss of one series; ``w`` is 0 on points that are not used."""
        if self.likelihood:
            per_point = _poisson_terms(pred, y, slopes=False)
        elif self.user is None:
            per_point = self.point_loss(y - pred, f_scale)
        else:
            per_point = self.user(pred, y)
            if self.reduces:
                return per_point
        return self.weighted(w, per_point).sum() / w.sum()


def resolve_loss(loss: str | Callable) -> Loss:
    if callable(loss):
        probe = torch.linspace(0.0, 1.0, 4)
        out = torch.as_tensor(loss(probe + 0.5, probe))
        if out.shape not in (torch.Size([]), probe.shape):
            raise ValueError("a loss callable must return per-point losses (same shape as y) "
                             f"or a scalar, got shape {tuple(out.shape)}")
        return Loss(getattr(loss, "__name__", "custom"), user=loss, reduces=out.ndim == 0)
    if loss in LIKELIHOOD_LOSSES:
        return Loss(loss)
    if loss not in RHO:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(BUILTIN_LOSSES)} "
                         "or pass a callable")
    return Loss("mse" if loss == "linear" else loss, rho=RHO[loss])
