"""Kernels compiled ahead of time: AOTInductor packages, built once per machine and loaded in
milliseconds by every later process (no Dynamo tracing, no recompiling).

``build(fn, in_dims, args, path)`` exports ``vmap(fn, in_dims)`` with a dynamic batch size
(and number of points) through ``torch.export`` and compiles it with AOTInductor into a
``.pt2`` package at ``path``; ``load(path)`` maps it back into a callable. The engine decides
when to use them (``batchfit.engine``); the cache's location and keys are ``batchfit.cache``'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

MIN_BATCH = 2  # export specialises sizes 0 and 1: smaller calls run eagerly


def split(args) -> tuple[list, list, object]:
    """``args`` -> (tensor leaves, the other leaves (constants), the tree's spec)."""
    leaves, spec = pytree.tree_flatten(args)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tensors, constants, spec


class _Batched(torch.nn.Module):
    """``vmap(fn)`` as a module of tensors only (what export takes)."""

    def __init__(self, fn: Callable, in_dims, constants: list, spec):
        super().__init__()
        self.fn, self.in_dims, self.constants, self.spec = fn, in_dims, constants, spec

    def forward(self, *tensors):
        feed = iter(tensors)
        leaves = [next(feed) if c is None else c for c in self.constants]
        return vmap(self.fn, in_dims=self.in_dims)(*pytree.tree_unflatten(leaves, self.spec))


def _dynamic_shapes(tensors: list) -> tuple:
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    points = torch.export.Dim("points", min=MIN_BATCH)
    return tuple(None if t.ndim == 0 else {0: batch} if t.ndim == 1 else {0: batch, 1: points}
                 for t in tensors)


def build(fn: Callable, in_dims, args, path: str) -> float:
    """Compile ``vmap(fn, in_dims)(*args)`` into an AOTInductor package at ``path``; returns
    the seconds it took. Raises whatever export or compilation raises."""
    import torch._inductor  # (the compiler: imported only when building)
    from torch._inductor import config

    start = time.perf_counter()
    tensors, constants, spec = split(args)
    tensors = [t.contiguous() for t in tensors]
    module = _Batched(fn, in_dims, constants, spec)
    exported = torch.export.export(module, tuple(tensors),
                                   dynamic_shapes=(_dynamic_shapes(tensors),), strict=False)
    directory = os.path.dirname(path)
    temp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    # threads chosen when the kernel runs (torch.get_num_threads), not when it was built
    with config.patch({"cpp.dynamic_threads": True}):
        torch._inductor.aoti_compile_and_package(exported, package_path=temp)
    os.replace(temp, path)
    return time.perf_counter() - start


class Loaded:
    """A package, callable on the same arguments as the function it was built from."""

    def __init__(self, path: str):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])

    def __call__(self, *args):
        tensors, _, _ = split(args)
        flat = self.loader.boxed_run([t.contiguous() for t in tensors])
        return pytree.tree_unflatten(flat, self.out_spec)


def load(path: str) -> Loaded | None:
    try:
        return Loaded(path)
    except (RuntimeError, OSError, ValueError):
        return None
