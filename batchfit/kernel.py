"""Names for batchfit's per-series kernels that stay the same from one process to the next.

A kernel is a function of ONE series that the engine vmaps and may compile. Kernels are
made by factories (``solve_kernel(degree, ...)``); ``factory`` memoises a factory (a
bounded cache: kernels of user callables are not kept for ever) and tags each kernel with
``key_of``: the factory's name and its arguments, when every argument has a stable name of
its own (numbers, strings, built-in losses and models, other tagged kernels). A kernel with
a key can be compiled once per machine and loaded by later processes (``batchfit.aot``); one
made from a user's callable has no key and is compiled per process, if at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
