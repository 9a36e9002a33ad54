"""Model choice per series by AICc: ``fit(x, y, model=["exp", "gauss", ...])``.

Least squares (``mse``) counts the noise variance as a parameter, k' = k + 1, as a Gaussian
likelihood with unknown variance has it (Burnham & Anderson; statsmodels and R's ``AIC`` of
``lm``/``nls`` count it too): ``AICc = n log(SSE/n) + 2k' + 2k'(k'+1)/(n-k'-1)``, with SSE the
weighted sum of squares, the weights scaled to mean 1 over the series' points (the same shift
for every candidate, so no choice depends on the weights' scale). ``poisson``: the deviance,
``AICc = D + 2k + 2k(k+1)/(n-k-1)`` (no scale parameter). Where ``n <= k' + 1`` AICc is
undefined (+inf) and that candidate cannot be chosen.

A series keeps the candidate of lowest AICc among those that converged (status ok, finite or
-inf AICc; ties: the first listed). Where none can be chosen, it keeps the candidate of lowest
AICc whatever its status (NaN counted as +inf; ties: the first listed), with that status, and
``too_few_points`` where that fit is ok but its AICc is undefined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchfit.core.names import LIKELIHOOD_LOSSES, STATUS_LABELS, Status
from batchfit.fitting.data import FitResult


def aicc(fit: FitResult) -> torch.Tensor:
    """The AICc of every series of one candidate's fit (module doc), float64, batch shape."""
    n = fit.n_points.to(torch.float64)
    total = fit.loss.to(torch.float64) * n  # SSE, or the deviance (loss is the mean)
    if fit.loss_name in LIKELIHOOD_LOSSES:
        k, misfit = fit.params.shape[-1], total
    else:
        k = fit.params.shape[-1] + 1  # (the noise variance)
        misfit = n * torch.log(total / n)  # (-inf for an exact fit: chosen first)
    room = n - k - 1
    value = misfit + 2 * k + 2 * k * (k + 1) / torch.where(room > 0, room, 1)
    return torch.where(room > 0, value, torch.inf)


@dataclass(frozen=True)
class ChoiceResult:
    """Every candidate's fit of every series, and per series the chosen one.

    ``fits[c]`` is candidate ``candidates[c]``'s ``FitResult`` (its params and stderr for all
    series); ``choice`` (batch shape) the index of the chosen candidate, ``aicc`` (..., C)
    every candidate's AICc; the diagnostics (``loss``, ``rmse``, ``r2``, ``n_points``,
    ``iterations``, ``status``) are the chosen fit's."""

    candidates: tuple[str, ...]
    fits: tuple[FitResult, ...]
    choice: torch.Tensor  # (...,) int64
    aicc: torch.Tensor  # (..., C) float64
    status: torch.Tensor  # (...,) int8, the chosen fit's (module doc)

    @classmethod
    def of(cls, candidates: tuple[str, ...], fits: list[FitResult]) -> ChoiceResult:
        scores = torch.stack([aicc(fit).cpu() for fit in fits], dim=-1)
        ok = torch.stack([fit.status.cpu() == Status.OK for fit in fits], dim=-1)
        eligible = ok & (scores < torch.inf)
        best = torch.where(eligible, scores, torch.inf).argmin(dim=-1)
        fallback = torch.where(scores.isnan(), torch.inf, scores).argmin(dim=-1)
        choice = torch.where(eligible.any(dim=-1), best, fallback)
        status = torch.stack([fit.status.cpu() for fit in fits], dim=-1)
        status = status.take_along_dim(choice[..., None], dim=-1)[..., 0]
        undefined = scores.take_along_dim(choice[..., None], dim=-1)[..., 0] == torch.inf
        status = torch.where(undefined & (status == Status.OK), int(Status.TOO_FEW_POINTS),
                             status).to(torch.int8)
        return cls(tuple(candidates), tuple(fits), choice, scores, status)

    def _chosen(self, name: str) -> torch.Tensor:
        values = torch.stack([getattr(fit, name).cpu() for fit in self.fits], dim=-1)
        return values.take_along_dim(self.choice[..., None], dim=-1)[..., 0]

    @property
    def model(self) -> np.ndarray:
        """Each series' chosen candidate, by name."""
        return np.asarray(self.candidates)[self.choice.numpy()]

    @property
    def loss(self) -> torch.Tensor:
        return self._chosen("loss")

    @property
    def rmse(self) -> torch.Tensor:
        return self._chosen("rmse")

    @property
    def r2(self) -> torch.Tensor:
        return self._chosen("r2")

    @property
    def n_points(self) -> torch.Tensor:
        return self._chosen("n_points")

    @property
    def iterations(self) -> torch.Tensor:
        return self._chosen("iterations")

    @property
    def loss_name(self) -> str:
        return self.fits[0].loss_name

    def candidate_params(self) -> dict[str, tuple[str, ...]]:
        """Each candidate's parameter names, in order."""
        return {name: fit.param_names for name, fit in zip(self.candidates, self.fits)}

    def record(self) -> dict:
        """Per series, flat: ``model`` (index), ``aicc`` (B, C), each candidate's
        ``params``/``stderr`` (B, k) NaN where it was not chosen, and the chosen fit's
        diagnostics (what the output table is made of)."""
        choice = self.choice.numpy().reshape(-1)
        record = {"model": choice, "aicc": self.aicc.numpy().reshape(-1, len(self.fits)),
                  "candidates": {}}
        for c, (name, fit) in enumerate(zip(self.candidates, self.fits)):
            k = fit.params.shape[-1]
            chosen = (choice == c)[:, None]
            record["candidates"][name] = {
                part: np.where(chosen, getattr(fit, part).cpu().numpy().reshape(-1, k), np.nan)
                for part in ("params", "stderr")}
        for name in ("loss", "rmse", "r2", "n_points", "iterations", "status"):
            record[name] = getattr(self, name).numpy().reshape(-1)
        return record

    def to_arrow(self, ids=None):
        """The fits as the output table of ``batchfit run --model auto:...``."""
        from batchfit import io

        return io.choice_arrow(self.record(), self.candidate_params(), ids,
                               {"solver": self.fits[0].solver, "loss": self.loss_name})

    def status_labels(self) -> np.ndarray:
        return np.asarray(STATUS_LABELS)[self.status.numpy()]

    def status_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.status.long().reshape(-1), minlength=len(Status))
        return {s.label: int(counts[s]) for s in Status if counts[s]}

    def __repr__(self) -> str:
        chosen = np.bincount(self.choice.numpy().reshape(-1), minlength=len(self.fits))
        shares = ", ".join(f"{name} {n:,}" for name, n in zip(self.candidates, chosen))
        return f"ChoiceResult({self.choice.numel():,} series, chosen: {shares})"
