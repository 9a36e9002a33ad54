"""A model choice (``fit(..., model=["exp", "gauss"])``): every candidate fitted to every
series, one batched fit each with its own data-driven start, then AICc per series
(``fitting.choice``)."""

from __future__ import annotations

from collections.abc import Callable

from batchfit.core.options import candidate_options, resolve
from batchfit.fitting.choice import ChoiceResult


def fit_choice(fit_one: Callable, options: dict) -> ChoiceResult:
    """``fit_one(**options)`` per candidate of ``options["model"]`` (checked first, all of
    them, so that a bad candidate fails before any fit runs)."""
    candidates = resolve(**options).candidates
    fits = [fit_one(**candidate_options(name, options)) for name in candidates]
    return ChoiceResult.of(candidates, fits)
