"""``fit``'s options, checked and resolved once, into one ``Options`` object.

Everything that can be checked without the data or torch is checked here (names, ranges,
types), with one-line ValueErrors naming the parameter; the engine turns an ``Options`` into
the solvers' torch-level configuration (``engine.config``) and checks what needs torch
(user callables, CUDA). Torch is not imported here, so that the MSE job starts without it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from batchfit.core.names import (
    BUILTIN_LOSSES,
    DTYPES,
    FAMILY_PARAMS,
    FORMULAS,
    LOSS_ALIASES,
    MAX_DEGREE,
    SOLVERS,
    family_columns,
    poly_columns,
)

DEFAULT_EPOCHS = {"gd": 15000, "adam": 15000, "newton": 50}
DEFAULT_LR = 1e-3


INTEGER_LIMIT = 2**63  # (integer options become int64 tensors and counters)
DEFAULT_MAX_DEGREE = 3  # --degree auto: degrees 0..3 unless auto:D says otherwise


def parse_degree(degree) -> tuple[int, bool]:
    """``degree`` as (degree, chosen per series): an int, ``"auto"`` (up to
    ``DEFAULT_MAX_DEGREE``) or ``"auto:D"``."""
    if isinstance(degree, str):
        head, _, top = degree.partition(":")
        if head == "auto":
            if not top:
                return DEFAULT_MAX_DEGREE, True
            if top.isdigit():
                return int(top), True
        if degree.isdigit():
            return int(degree), False
        raise ValueError(f"degree must be an integer, 'auto' or 'auto:D', got {degree!r}")
    return degree, False


def check_number(name, value, *, low=None, integer=False, strictly=False):
    """A finite number (an integer below 2**63 in size if ``integer``), above ``low``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer and abs(value) >= INTEGER_LIMIT:
        raise ValueError(f"{name} must be below 2**63 in size, got {value!r}")
    if low is not None and (value <= low if strictly else value < low):
        raise ValueError(f"{name} must be {'>' if strictly else '>='} {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Options:
    """Resolved options: ``solver`` is never ``auto``; ``loss`` is a built-in name or a user
    callable; ``model`` None (the polynomial), a family name, or a user's model; ``dtype``
    "float32" or "float64"; ``device`` "auto", "cpu", "cuda..." or a torch.device."""

    solver: str
    degree: int
    model: object
    p0: object
    param_names: tuple | None
    bounds: tuple | None
    loss: object
    f_scale: float
    lr: float
    epochs: int | None  # None: the solver's default (a model's LM: 100 (k + 1), as MINPACK)
    tol: float
    init: object
    seed: int
    device: object
    dtype: str
    compile: object
    history_every: int
    history_sample: int
    track: tuple | None
    restarts: int = 0  # extra starting points per series (models)
    auto_degree: bool = False  # each series' degree chosen in 0 .. degree by BIC

    @property
    def is_poly(self) -> bool:
        return self.model is None

    @property
    def family(self) -> str | None:
        return self.model if isinstance(self.model, str) else None

    @property
    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__",
                                                                      "custom")

    @property
    def model_name(self) -> str:
        if self.is_poly:
            return "poly"
        return self.family or getattr(self.model, "name", None) or getattr(
            self.model, "__name__", "custom")

    @property
    def aggregates(self) -> bool:
        """An MSE polynomial fit by the exact solver: a function of per-series statistics."""
        return self.is_poly and self.solver == "exact"

    def columns(self, param_names=None) -> tuple[tuple[str, int], ...]:
        """(output column, parameter index) of the coefficients."""
        if self.is_poly:
            return poly_columns(self.degree)
        if self.family:
            return family_columns(self.family)
        names = param_names or self.param_names or ()
        return tuple((name, i) for i, name in enumerate(names))

    def describe(self, device=None) -> dict:
        """What a job records in its metadata (``device``: where it ran)."""
        return {"solver": self.solver, "loss": self.loss_name,
                "degree": self.degree if self.is_poly else None,
                "degree_chosen_per_series": self.auto_degree, "model": self.model_name,
                "formula": FORMULAS.get(self.model_name),
                "param_columns": [name for name, _ in self.columns()],
                "dtype": self.dtype, "device": str(device or self.device),
                "restarts": self.restarts}

    def with_(self, **changes) -> Options:
        return replace(self, **changes)


def _dtype_name(dtype, y) -> str:
    """Default float32 (the contract's), or float64 when y is already a float64 tensor."""
    if dtype is None:
        kind = type(y).__module__.split(".")[0]
        return "float64" if kind == "torch" and str(y.dtype) == "torch.float64" else "float32"
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


def _loss(loss):
    if callable(loss):
        return loss
    name = LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss
    if name not in BUILTIN_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(BUILTIN_LOSSES)} "
                         "or pass a callable")
    return name


def _model(model):
    if model is None or (isinstance(model, str) and model == "poly"):
        return None
    if isinstance(model, str):
        if model not in FAMILY_PARAMS:
            raise ValueError(f"unknown model {model!r}; choose poly, {', '.join(FAMILY_PARAMS)}"
                             ", or pass a callable f(x, params)")
        return model
    if callable(model) or hasattr(model, "param_names"):  # a function, or a models.Model
        return model
    raise ValueError(f"model must be a name or a callable f(x, params), got {model!r}")


def resolve(*, degree: int = 2, model=None, p0=None, param_names=None, bounds=None, loss="mse",
            f_scale: float = 1.0, solver: str = "auto", lr: float | None = None,
            epochs: int | None = None, tol: float | None = None, init="random", seed: int = 0,
            device="auto", dtype=None, compile="auto", history_every: int = 0,
            history_sample: int = 1 << 14, track=None, restarts: int = 0, y=None) -> Options:
    """Check and resolve ``fit``'s options (``y``, when given, picks the default dtype)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    degree, auto_degree = parse_degree(degree)
    check_number("degree", degree, low=0, integer=True)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be at most {MAX_DEGREE}, got {degree}")
    model = _model(model)
    if param_names is not None:
        param_names = tuple(str(n) for n in param_names)
        if isinstance(model, str) and len(param_names) != len(FAMILY_PARAMS[model]):
            raise ValueError(f"param_names has {len(param_names)} names, the model has "
                             f"{len(FAMILY_PARAMS[model])} parameters")
    if bounds is not None:
        if model is None:
            raise ValueError("bounds apply to nonlinear models (the polynomial is solved "
                             "exactly)")
        lower, upper = bounds
        bounds = (None if lower is None else tuple(map(float, lower)),
                  None if upper is None else tuple(map(float, upper)))
    if model is None and p0 is not None:
        init = p0
    check_number("f_scale", f_scale, low=0, strictly=True)
    dtype = _dtype_name(dtype, y)
    if tol is None:  # nonlinear models converge linearly at the end: ask for more
        tol = 1e-10 if model is not None and dtype == "float64" else 1e-6
    check_number("tol", tol, low=0)
    check_number("seed", seed, integer=True)
    check_number("restarts", restarts, low=0, integer=True)
    if restarts and model is None:
        raise ValueError("restarts apply to nonlinear models (a polynomial's least squares "
                         "has one minimum)")
    check_number("history_every", history_every, low=0, integer=True)
    check_number("history_sample", history_sample, low=0, integer=True)
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    loss = _loss(loss)
    if solver == "auto":
        solver = "exact" if loss == "mse" and model is None else "newton"
    if solver == "exact" and model is not None:
        name = model if isinstance(model, str) else "custom"
        raise ValueError(f"the exact solver fits polynomials; use newton (Levenberg-Marquardt)"
                         f" for the {name} model")
    if solver == "exact" and loss != "mse":
        name = loss if isinstance(loss, str) else "custom"
        raise ValueError(f"the exact solver fits MSE only; use newton for loss {name!r}")
    if auto_degree and not (model is None and solver == "exact"):
        raise ValueError("degree 'auto' chooses among least-squares polynomial fits (BIC); "
                         "it needs loss mse, solver exact or auto and no model")
    lr = DEFAULT_LR if lr is None else lr
    check_number("lr", lr, low=0, strictly=True)
    if epochs is None and not (solver == "newton" and model is not None):
        epochs = DEFAULT_EPOCHS.get(solver, 1)
    if epochs is not None:
        check_number("epochs", epochs, low=0, integer=True)
        epochs = int(epochs)
    if isinstance(init, str) and init not in ("random", "zeros"):
        raise ValueError(f"init must be 'random', 'zeros' or an array, got {init!r}")
    if isinstance(device, str) and device != "auto" and not device.startswith(("cpu", "cuda")):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if track is not None:
        track = tuple(int(i) for i in np.asarray(track, dtype=np.int64).reshape(-1))
    return Options(solver=solver, degree=degree, model=model, p0=p0, param_names=param_names,
                   bounds=bounds, loss=loss, f_scale=float(f_scale), lr=float(lr),
                   epochs=epochs, tol=float(tol), init=init, seed=seed,
                   device="auto" if device is None else device, dtype=dtype, compile=compile,
                   history_every=history_every, history_sample=history_sample, track=track,
                   restarts=int(restarts), auto_degree=auto_degree)
