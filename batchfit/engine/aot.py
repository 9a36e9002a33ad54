"""Kernels compiled ahead of time: AOTInductor packages, built once per machine and loaded in
milliseconds by every later process (no Dynamo tracing, no recompiling).

``build(fn, in_dims, args, path)`` traces ``vmap(fn, in_dims)`` into a graph of aten
operations with symbolic sizes (``make_fx``: the torch.func transforms, grad of grad
included, are applied while tracing, which torch.export cannot do with them inside), exports
that graph with a dynamic batch size and number of points, and compiles it with AOTInductor
into a ``.pt2`` package at ``path``. ``Loaded(path)`` runs it. The engine decides when
(``batchfit.engine.ahead``); the cache's location and keys are ``batchfit.core.cache``'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import namedtuple
from collections.abc import Callable

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

MIN_BATCH = 2  # export specialises sizes 0 and 1: smaller calls run eagerly
# Inductor writes out an intermediate that many nodes read (a model's Jacobian columns, read
# by its k (k + 1) / 2 Gauss-Newton sums) instead of computing it where it is used; with
# these thresholds raised it fuses them into one pass over the points (the 8-parameter
# model's normal-equations kernel on 1e4 series: 87 ms a call before, 42 ms after).
BUILD_CONFIG = {"realize_reads_threshold": 10_000, "realize_opcount_threshold": 10_000,
                "max_fusion_size": 10_000}


class _Slot:
    """Where a tensor input goes among a tree's leaves."""

    def __repr__(self):  # (part of a kernel's cache key: the same in every process)
        return "tensor"


TENSOR = _Slot()


def structure(args, tensors: list):
    """A hashable description of ``args``' tree (tuples, named tuples, tensors by dtype,
    rank and device, other leaves by value), its tensors appended to ``tensors`` in the
    order ``split`` gives them: a kernel's in-process lookup key, much cheaper than a
    pytree's spec on every call."""
    if isinstance(args, torch.Tensor):
        tensors.append(args)
        return (args.dtype, args.ndim, args.device.type)
    if isinstance(args, tuple):
        return (type(args), tuple(structure(a, tensors) for a in args))
    return ("value", args)


def split(args) -> tuple[list, list, object]:
    """``args`` -> (tensor leaves, every leaf with TENSOR in the tensors' places, the tree's
    spec)."""
    leaves, spec = pytree.tree_flatten(args)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    constants = [TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tensors, constants, spec


class _Batched(torch.nn.Module):
    """``vmap(fn)`` as a module of tensors only (what export takes)."""

    def __init__(self, fn: Callable, in_dims, constants: list, spec):
        super().__init__()
        self.fn, self.in_dims, self.constants, self.spec = fn, in_dims, constants, spec

    def forward(self, *tensors):
        feed = iter(tensors)
        leaves = [next(feed) if c is TENSOR else c for c in self.constants]
        return vmap(self.fn, in_dims=self.in_dims)(*pytree.tree_unflatten(leaves, self.spec))


def _dynamic_shapes(tensors: list) -> tuple:
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    points = torch.export.Dim("points", min=MIN_BATCH)
    return tuple(None if t.ndim == 0 else {0: batch} if t.ndim == 1 else {0: batch, 1: points}
                 for t in tensors)


def _own_memory(tensors: list) -> list:
    """Contiguous copies that share no memory: tracing merges inputs that alias (a damping
    that starts as one zero tensor for every parameter), and the kernel would then read one
    input for all of them when later called with distinct ones."""
    seen, owned = set(), []
    for t in tensors:
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        owned.append(t)
    return owned


def build(fn: Callable, in_dims, args, path: str) -> float:
    """Compile ``vmap(fn, in_dims)(*args)`` into an AOTInductor package at ``path``; returns
    the seconds it took. Raises whatever tracing, export or compilation raises."""
    import torch._inductor  # (the compiler: imported only when building)
    from torch._inductor import config
    from torch.fx.experimental.proxy_tensor import make_fx

    start = time.perf_counter()
    tensors, constants, spec = split(args)
    tensors = _own_memory(tensors)
    module = _Batched(fn, in_dims, constants, spec)

    def flat(*inputs):
        return pytree.tree_leaves(module(*inputs))

    graph = make_fx(flat, tracing_mode="symbolic")(*tensors)
    with torch.no_grad():  # (the structure of the outputs, kept beside the package)
        few = [t[:MIN_BATCH] if t.ndim else t for t in tensors]
        structure = describe_tree(pytree.tree_structure(module(*few)))
    exported = torch.export.export(graph, tuple(tensors),
                                   dynamic_shapes=_dynamic_shapes(tensors), strict=False)
    directory = os.path.dirname(path)
    temp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    # threads chosen when the kernel runs (torch.get_num_threads), not when it was built
    with config.patch({"cpp.dynamic_threads": True, **BUILD_CONFIG}):
        torch._inductor.aoti_compile_and_package(exported, package_path=temp)
    with open(temp + ".json", "w") as f:
        json.dump(structure, f)
    os.replace(temp + ".json", path + ".json")
    os.replace(temp, path)
    return time.perf_counter() - start


def describe_tree(spec) -> object:
    """A JSON description of an output tree's structure: leaves, tuples, lists, dicts and
    batchfit's named tuples (by name)."""
    kind = spec.type
    children = [describe_tree(child) for child in spec.children()] if spec.children() else []
    if spec.is_leaf():
        return "leaf"
    if kind is tuple:
        return {"tuple": children}
    if kind is list:
        return {"list": children}
    if kind is dict:
        return {"dict": children, "keys": list(spec.context)}
    cls = spec.context if kind is namedtuple else kind  # (how torch's pytree keeps them)
    if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields") \
            and cls.__module__.startswith("batchfit."):
        return {"namedtuple": children, "class": [cls.__module__, cls.__qualname__]}
    raise TypeError(f"kernel outputs of type {kind} cannot be kept")


def rebuild(structure, leaves):
    """The tree ``describe_tree`` describes, with ``leaves`` (an iterator) in it. Named
    tuples are looked up among batchfit's loaded modules: nothing is imported or run."""
    if structure == "leaf":
        return next(leaves)
    (kind, children), = [(k, v) for k, v in structure.items() if k not in ("keys", "class")]
    values = [rebuild(child, leaves) for child in children]
    if kind == "tuple":
        return tuple(values)
    if kind == "list":
        return values
    if kind == "dict":
        return dict(zip(structure["keys"], values))
    module, name = structure["class"]
    cls = getattr(sys.modules.get(module), name, None) if module.startswith("batchfit.") \
        else None
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise ValueError(f"unknown kernel output type {module}.{name}")
    return cls(*values)


class Loaded:
    """A package, called like ``vmap(fn, in_dims)`` on arguments of the structure it was
    built for (its outputs rebuilt from the structure kept beside it)."""

    def __init__(self, path: str):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        with open(path + ".json") as f:
            self.structure = json.load(f)

    def __call__(self, *args):
        tensors, _, _ = split(args)
        return self.run(tensors)

    def run(self, tensors: list):
        """The outputs for the tensor leaves of arguments of the built structure."""
        flat = self.loader.boxed_run([t.contiguous() for t in tensors])
        return rebuild(self.structure, iter(flat))


def load(path: str) -> Loaded | None:
    try:
        return Loaded(path)
    except (RuntimeError, OSError, ValueError):
        return None
