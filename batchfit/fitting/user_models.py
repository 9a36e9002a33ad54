"""The models named on the command line as ``Model``s: a parsed formula evaluated with torch
operations, and a user's function imported from ``package.module:function``."""

from __future__ import annotations

import functools
import importlib

import torch

from batchfit.core.formula import Formula, ModuleSpec, parse_formula
from batchfit.fitting.models import Model

_FUNCTIONS = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sin": torch.sin,
              "cos": torch.cos, "tanh": torch.tanh, "abs": torch.abs,
              "erf": torch.special.erf}
_BINARY = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "**": torch.pow}


def _evaluate(node: tuple, x, p):
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "param":
        return p[node[1]]
    if kind == "x":
        return x if node[1] is None else x[..., node[1]]
    if kind == "neg":
        return -_evaluate(node[1], x, p)
    if kind == "call":
        return _FUNCTIONS[node[1]](torch.as_tensor(_evaluate(node[2], x, p)))
    left, right = _evaluate(node[1], x, p), _evaluate(node[2], x, p)
    if not isinstance(left, torch.Tensor) and not isinstance(right, torch.Tensor):
        left = torch.as_tensor(left)
    return _BINARY[kind](left, right)


@functools.lru_cache(maxsize=64)
def formula_model(formula: Formula) -> Model:
    """A formula as a model (one per formula, so that every chunk of a job shares its
    kernels). Its start is all ones, as ``scipy.optimize.curve_fit``'s; ``p0`` sets one."""
    def f(x, params):
        return _evaluate(formula.tree, x, params)

    def start(x, y, w):
        return torch.ones((y.shape[0], len(formula.param_names)), dtype=y.dtype,
                          device=y.device)

    return Model("formula", formula.param_names, f, start, tuple_params=True, pointwise=True,
                 formula=formula.text, x_count=formula.x_columns)


def imported_model(spec: ModuleSpec) -> Model:
    """The user's ``f(x, params)`` at ``spec`` (their own module, named by them on the
    command line or in ``fit``; never a name read from data). Its parameters are named by
    ``param_names`` (``--params``), else counted by ``p0``."""
    try:
        module = importlib.import_module(spec.module)
    except Exception as error:  # noqa: BLE001 (any failure of the user's module is theirs)
        raise ValueError(f"model {spec.text!r}: cannot import {spec.module!r} "
                         f"({type(error).__name__}: {error})".splitlines()[0]) from None
    function = getattr(module, spec.function, None)
    if not callable(function):
        raise ValueError(f"model {spec.text!r}: module {spec.module!r} has no function "
                         f"{spec.function!r}")
    return Model(spec.text, (), function)


def model_of(spec) -> Model:
    if isinstance(spec, Formula):
        return formula_model(spec)
    return imported_model(spec)


def table_model(meta: dict) -> Model | None:
    """The model of an output table written from a formula (its text is in the metadata),
    or None for other kinds."""
    if meta.get("model") != "formula" or not meta.get("formula"):
        return None
    names = [name for name, _ in meta.get("columns") or meta.get("coefficient_columns")]
    return formula_model(parse_formula(meta["formula"], names))

