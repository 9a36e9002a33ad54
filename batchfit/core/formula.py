"""Models named on the command line: a formula such as ``"a*exp(-x/tau) + c"``, or a user's
own function as ``package.module:function``.

A formula is read by Python's parser into a syntax tree and then walked against a whitelist
(numbers, parameter names, ``x`` or ``x0, x1, ...``, ``+ - * / **``, the functions in
``FORMULA_FUNCTIONS``); it is never evaluated as Python. What comes out is a small tree of
tuples that ``fitting.user_models`` turns into torch operations. Nothing here imports torch
or the user's module: both happen in the fitting layer, when a fit needs them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from batchfit.core.names import FORMULA_FUNCTIONS

# package.module:function, the convention of Python's entry points
_MODULE_SPEC = r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)"
_X_COLUMN = r"x\d+"
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_MAX_LENGTH = 2000


@dataclass(frozen=True)
class ModuleSpec:
    """A user's ``f(x, params)`` in an importable module (the user's own code)."""

    module: str
    function: str

    @property
    def text(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass(frozen=True)
class Formula:
    """A parsed formula: ``tree`` nodes are ``("num", value)``, ``("param", index)``,
    ``("x", column)`` (column None: x itself), ``("neg", node)``, ``(op, left, right)`` and
    ``("call", name, node)``. ``x_columns``: the x columns it reads (1 for plain ``x``; for
    ``x0 .. xj``, j + 1)."""

    text: str
    tree: tuple
    param_names: tuple[str, ...]
    x_columns: int

    @property
    def name(self) -> str:
        return "formula"


def module_spec(text: str) -> ModuleSpec | None:
    """``text`` as a ``package.module:function`` reference, or None when it is not one."""
    match = re.fullmatch(_MODULE_SPEC, text)
    return ModuleSpec(*match.groups()) if match else None


def _fail(text: str, why: str):
    raise ValueError(f"formula {text!r}: {why}")


def parse_formula(text: str, params=None) -> Formula:
    """The formula ``text``; its parameters are the names other than x in order of first
    appearance, or ``params`` (the same names, in the order given)."""
    if len(text) > _MAX_LENGTH:
        _fail(text[:40] + "...", f"longer than {_MAX_LENGTH} characters")
    try:
        expression = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, RecursionError):
        _fail(text, "not an expression of numbers, names, + - * / ** and functions "
                    f"({', '.join(FORMULA_FUNCTIONS)})")
    given = None if params is None else tuple(str(name) for name in params)
    # x0, x1, ... are x's columns, unless plain x is used or params names them (the
    # logistic's and the Lorentzian's centre is called x0)
    plain_x = any(isinstance(node, ast.Name) and node.id == "x" for node in ast.walk(expression))
    names: list[str] = []
    x_used: set = set()

    def walk(node) -> tuple:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return ("num", float(node.value))
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                _fail(text, f"name {node.id!r} is not allowed")
            if node.id in FORMULA_FUNCTIONS:
                _fail(text, f"{node.id} is a function: call it, {node.id}(...)")
            if node.id == "x" or (re.fullmatch(_X_COLUMN, node.id) and not plain_x
                                  and node.id not in (given or ())):
                column = None if node.id == "x" else int(node.id[1:])
                x_used.add(column)
                return ("x", column)
            if node.id not in names:
                names.append(node.id)
            return ("param", node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return (_OPERATORS[type(node.op)], walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = walk(node.operand)
            return ("neg", inner) if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                _fail(text, "only named functions may be called "
                            f"({', '.join(FORMULA_FUNCTIONS)})")
            if node.func.id not in FORMULA_FUNCTIONS:
                _fail(text, f"unknown function {node.func.id!r}; use "
                            f"{', '.join(FORMULA_FUNCTIONS)}")
            if len(node.args) != 1 or node.keywords:
                _fail(text, f"{node.func.id} takes one argument")
            return ("call", node.func.id, walk(node.args[0]))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
            _fail(text, "use ** for powers (^ is not allowed)")
        if isinstance(node, ast.Attribute):
            _fail(text, f"attribute access (.{node.attr}) is not allowed")
        _fail(text, f"{ast.unparse(node)!r} is not allowed (numbers, parameter names, x, "
                    "+ - * / ** and named functions only)")

    try:
        tree = walk(expression)
    except RecursionError:
        _fail(text, "nested too deeply")
    if not x_used:  # (a misspelt family name would otherwise fit a constant)
        _fail(text, "does not use x (for a built-in model check its name)")
    if x_used == {0}:  # (one column is plain x: x0 would index its points)
        _fail(text, "x0 alone is x's only column: write x")
    if not names:
        _fail(text, "has no parameters to fit")
    if given is not None:
        if sorted(given) != sorted(names):
            _fail(text, f"params {', '.join(given)} do not match the formula's parameters "
                        f"{', '.join(names)}")
        names = list(given)
    index = {name: i for i, name in enumerate(names)}

    def numbered(node):  # parameter names to their positions
        if node[0] == "param":
            return ("param", index[node[1]])
        return tuple(numbered(part) if isinstance(part, tuple) else part for part in node)

    columns = 1 if None in x_used else max(x_used) + 1
    return Formula(text.strip(), numbered(tree), tuple(names), columns)
