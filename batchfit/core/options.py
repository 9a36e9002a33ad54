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

from batchfit.core.formula import Formula, ModuleSpec, module_spec, parse_formula
from batchfit.core.names import (
    BUILTIN_LOSSES,
    DTYPES,
    FAMILY_PARAMS,
    FORMULAS,
    LIKELIHOOD_LOSSES,
    LOSS_ALIASES,
    MAX_DEGREE,
    SOLVERS,
    family_columns,
    poly_columns,
    poly_names,
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


CHOICE_PREFIX = "auto:"  # --model auto:A,B,...: each series' model chosen by AICc


def parse_models(model) -> tuple[str, ...] | None:
    """The candidates of a model choice (``["exp", "gauss"]`` or ``"auto:exp,gauss"``), or
    None for a single model (resolved as before). A candidate is ``poly`` (the polynomial of
    ``degree``), ``polyD`` (degree D) or a built-in family; one candidate is allowed (a
    choice of one, so a script can pass any list)."""
    if isinstance(model, str):
        if not model.startswith(CHOICE_PREFIX):
            return None
        names = [name.strip() for name in model[len(CHOICE_PREFIX):].split(",")]
        names = [] if names == [""] else names
    elif isinstance(model, list | tuple) and all(isinstance(name, str) for name in model):
        names = list(model)
    else:
        return None
    if not names:
        raise ValueError("model: a model choice needs at least one candidate, e.g. "
                         "auto:exp,gauss")
    for name in names:
        if candidate_degree(name) is None and name not in FAMILY_PARAMS:
            raise ValueError(f"model: unknown candidate {name!r}; choose among poly, polyD "
                             f"(D = 0..{MAX_DEGREE}), {', '.join(FAMILY_PARAMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"model: candidates repeat: {','.join(names)}")
    return tuple(names)


def candidate_degree(name: str, degree: int = 2) -> int | None:
    """The degree of a polynomial candidate (``poly``: ``degree``; ``polyD``: D), else None."""
    if name == "poly":
        return degree
    tail = name[4:] if name.startswith("poly") else ""
    return int(tail) if tail.isdigit() and int(tail) <= MAX_DEGREE else None


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
    covariance: bool = False  # each series' full parameter covariance (FitResult.covariance)
    # a model choice (parse_models): the candidates; the other fields are the first one's
    candidates: tuple | None = None

    @property
    def is_poly(self) -> bool:
        return self.model is None

    @property
    def family(self) -> str | None:
        return self.model if isinstance(self.model, str) else None

    @property
    def formula(self) -> str | None:
        """The model's formula: a formula model's text, a family's formula."""
        if isinstance(self.model, Formula):
            return self.model.text
        return FORMULAS.get(self.model_name)

    @property
    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__",
                                                                      "custom")

    @property
    def model_name(self) -> str:
        if self.is_poly:
            return "poly"
        if isinstance(self.model, ModuleSpec):
            return self.model.text
        return self.family or getattr(self.model, "name", None) or getattr(
            self.model, "__name__", "custom")

    @property
    def aggregates(self) -> bool:
        """An MSE polynomial fit by the exact solver: a function of per-series statistics."""
        return self.is_poly and self.solver == "exact" and self.candidates is None

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
                "formula": self.formula,
                "param_columns": [name for name, _ in self.columns()],
                "dtype": self.dtype, "device": str(device or self.device),
                "restarts": self.restarts}

    def candidate_params(self) -> dict[str, tuple[str, ...]]:
        """A model choice's candidates and each one's parameter names."""
        return {name: poly_names(degree) if (degree := candidate_degree(name, self.degree))
                is not None else FAMILY_PARAMS[name] for name in self.candidates}

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


def _model(model, param_names):
    if model is None or (isinstance(model, str) and model == "poly"):
        return None
    if isinstance(model, str):
        if model in FAMILY_PARAMS:
            return model
        if model.isidentifier():  # (a formula must use x: a misspelt name is not one)
            raise ValueError(f"unknown model {model!r}; choose poly, {', '.join(FAMILY_PARAMS)}"
                             ", a formula such as 'a*exp(-x/tau) + c', package.module:function"
                             " or a callable f(x, params)")
        return module_spec(model) or parse_formula(model, param_names)
    if callable(model) or hasattr(model, "param_names"):  # a function, or a models.Model
        return model
    raise ValueError(f"model must be a name or a callable f(x, params), got {model!r}")


def resolve(*, degree: int = 2, model=None, p0=None, param_names=None, bounds=None, loss="mse",
            f_scale: float = 1.0, solver: str = "auto", lr: float | None = None,
            epochs: int | None = None, tol: float | None = None, init="random", seed: int = 0,
            device="auto", dtype=None, compile="auto", history_every: int = 0,
            history_sample: int = 1 << 14, track=None, restarts: int = 0, y=None,
            covariance: bool = False) -> Options:
    """Check and resolve ``fit``'s options (``y``, when given, picks the default dtype)."""
    candidates = parse_models(model)
    if candidates is not None:
        return _resolve_choice(candidates, dict(
            degree=degree, p0=p0, param_names=param_names, bounds=bounds, loss=loss,
            f_scale=f_scale, solver=solver, lr=lr, epochs=epochs, tol=tol, init=init,
            seed=seed, device=device, dtype=dtype, compile=compile,
            history_every=history_every, history_sample=history_sample, track=track,
            restarts=restarts, y=y, covariance=covariance))
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    degree, auto_degree = parse_degree(degree)
    check_number("degree", degree, low=0, integer=True)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be at most {MAX_DEGREE}, got {degree}")
    model = _model(model, param_names)
    if isinstance(model, Formula):  # (its names, in the order params gave, if it did)
        param_names = model.param_names
    elif isinstance(model, ModuleSpec) and param_names is None and np.ndim(p0) in (1, 2):
        param_names = tuple(f"p{i}" for i in range(np.shape(p0)[-1]))
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
    if loss in LIKELIHOOD_LOSSES and model is None:
        raise ValueError(f"loss {loss} fits nonlinear models (a family or your own f): a "
                         "polynomial's predictions go negative, where counts have no "
                         "likelihood; fit e.g. model='exp' or a positive model of your own")
    if not isinstance(covariance, bool):
        raise ValueError(f"covariance must be True or False, got {covariance!r}")
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
                   restarts=int(restarts), auto_degree=auto_degree, covariance=covariance)


# Losses whose fits have a likelihood for AICc: least squares (Gaussian noise of unknown
# variance) and the Poisson deviance.
CHOICE_LOSSES = ("mse", "poisson")


def _resolve_choice(candidates: tuple, options: dict) -> Options:
    """A model choice's options: each candidate checked as a single model would be; the
    first candidate's options, with ``candidates``."""
    loss = LOSS_ALIASES.get(options["loss"], options["loss"]) \
        if isinstance(options["loss"], str) else options["loss"]
    if loss not in CHOICE_LOSSES:
        raise ValueError(f"loss {options['loss']!r} has no likelihood for choosing models by "
                         f"AICc; use {' or '.join(CHOICE_LOSSES)} with a model choice")
    for name in ("p0", "param_names", "bounds"):
        if options[name] is not None:
            raise ValueError(f"{name} is one model's; a model choice uses each candidate's "
                             "data-driven start and no bounds")
    if options["solver"] == "exact" and any(candidate_degree(name) is None
                                            for name in candidates):
        raise ValueError("the exact solver fits polynomials; use solver auto with a model "
                         "choice")
    degree, auto_degree = parse_degree(options["degree"])
    if auto_degree:
        raise ValueError("degree 'auto' is a choice of its own; list the degrees as "
                         "candidates instead (auto:poly0,poly1,poly2)")
    each = [resolve(**candidate_options(name, options)) for name in candidates]
    return each[0].with_(candidates=candidates, degree=degree)


def candidate_options(name: str, options: dict) -> dict:
    """``fit``'s options for one candidate of a model choice."""
    degree = candidate_degree(name, options.get("degree", 2))
    return {**options, "model": name if degree is None else None,
            "degree": options.get("degree", 2) if degree is None else degree}
