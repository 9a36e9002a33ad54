"""Names for batchfit's per-series kernels that stay the same from one process to the next.

A kernel is a function of ONE series that the engine vmaps and may compile. Kernels are
made by factories (``solve_kernel(degree, ...)``); ``factory`` memoises a factory (a
bounded cache: kernels of user callables are not kept for ever) and tags each kernel with
``key_of``: the factory's name and its arguments, when every argument has a stable name of
its own (numbers, strings, built-in losses and models, users' models and losses by their
``fingerprint``, other tagged kernels). A kernel with a key can be compiled once per
machine and loaded by later processes (``batchfit.engine.aot``); one made from a callable with no
fingerprint has no key and is compiled per process, if at all.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import sys
import types
from collections.abc import Callable

import numpy as np

KERNEL_CACHE_SIZE = 256


def stable(value):
    """A hashable, process-independent name of ``value``, or None when it has none."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        parts = tuple(stable(v) for v in value)
        return None if any(p is None and v is not None for p, v in zip(parts, value)) \
            else parts
    named = getattr(value, "stable_key", None)  # Loss, Model
    if named is not None:
        return named() if callable(named) else named
    return key_of(value) if callable(value) else None


def key_of(fn: Callable):
    """The stable key of a kernel: set by ``factory``, or the name of a module-level
    function of batchfit; None otherwise."""
    key = getattr(fn, "__batchfit_key__", None)
    if key is not None:
        return key
    module, name = getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "")
    if module.startswith("batchfit.") and "<locals>" not in name and "<lambda>" not in name:
        return (module, name)
    return None


def factory(make: Callable) -> Callable:
    """Memoise a kernel factory and tag what it makes with a stable key (see module doc)."""
    name = (make.__module__, make.__qualname__)

    @functools.lru_cache(maxsize=KERNEL_CACHE_SIZE)
    def cached(*args):
        fn = make(*args)
        parts = tuple(stable(a) for a in args)
        known = all(p is not None or a is None for p, a in zip(parts, args))
        try:
            fn.__batchfit_key__ = (name, parts) if known else None
        except AttributeError:  # (a builtin; never happens for batchfit's kernels)
            pass
        return fn

    functools.update_wrapper(cached, make)
    return cached


def fingerprint(fn) -> str | None:
    """A digest of what defines a user's function: its bytecode, constants and names, its
    defaults and closure values, and the globals it reads (functions by their own
    fingerprint, modules by name and version, numbers, strings, arrays and tensors by
    value), recursively; None when some part has no stable value (an object of another
    kind), so that such a function's kernels are never kept under a name that could
    outlive a change to it. Two processes running the same code get the same digest."""
    h = hashlib.sha256()
    try:
        _feed(h, fn, set())
    except _Unstable:
        return None
    return h.hexdigest()[:24]


class _Unstable(Exception):
    """A part of the function has no stable value."""


def _feed(h, value, seen: set):
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        h.update(repr((type(value).__name__, value)).encode())
    elif isinstance(value, tuple | list | frozenset):
        h.update(f"{type(value).__name__}{len(value)}(".encode())
        for item in (sorted(value, key=repr) if isinstance(value, frozenset) else value):
            _feed(h, item, seen)
        h.update(b")")
    elif isinstance(value, types.ModuleType):
        h.update(f"module {value.__name__} {getattr(value, '__version__', '')}".encode())
    elif isinstance(value, types.CodeType):
        h.update(value.co_code)
        _feed(h, (value.co_names, value.co_varnames, value.co_freevars, value.co_consts), seen)
    elif isinstance(value, functools.partial):
        _feed(h, (value.func, value.args, tuple(sorted(value.keywords.items()))), seen)
    elif isinstance(value, types.FunctionType):
        _feed_function(h, value, seen)
    elif isinstance(value, types.BuiltinFunctionType | types.BuiltinMethodType) or (
            callable(value) and (getattr(value, "__module__", "") or "").startswith("torch")):
        # (a library's function, e.g. torch.exp: by its name; the torch version is in the key)
        h.update(f"builtin {getattr(value, '__module__', '')}.{value.__qualname__}".encode())
    elif isinstance(value, np.ndarray):
        h.update(f"array {value.dtype} {value.shape}".encode() + value.tobytes())
    elif type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        values = value.detach().cpu()
        h.update(f"tensor {values.dtype} {tuple(values.shape)}".encode())
        h.update(repr(values.tolist()).encode())
    else:
        raise _Unstable(type(value).__name__)


def _feed_function(h, fn: types.FunctionType, seen: set):
    if id(fn) in seen:  # (recursion)
        h.update(f"again {fn.__qualname__}".encode())
        return
    seen.add(id(fn))
    code = fn.__code__
    _feed(h, code, seen)
    _feed(h, (fn.__defaults__, tuple(sorted((fn.__kwdefaults__ or {}).items()))), seen)
    _feed(h, tuple(cell.cell_contents for cell in fn.__closure__ or ()), seen)
    for name in sorted(_global_names(code)):
        if name in fn.__globals__:
            h.update(f"global {name}".encode())
            _feed(h, fn.__globals__[name], seen)
        elif name not in vars(sys.modules["builtins"]):
            raise _Unstable(f"global {name} is not defined")


def _global_names(code: types.CodeType) -> set:
    """Names a code object (and the code nested in it) reads as globals."""
    names = {op.argval for op in dis.get_instructions(code)
             if op.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names
