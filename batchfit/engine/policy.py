"""The compile policy: how a per-series function runs over the batch.

Solvers hand per-series functions to ``Vectorizer``, which vmaps them over the batch (inputs
with a leading batch axis are mapped, scalars are shared) and runs them compiled where this
machine keeps a kernel for them (``batchfit.engine.ahead``: built once, ahead of time,
loaded in milliseconds by every later process; users' models and losses too, by the
fingerprint of their code). A missing kernel is built now only when that pays back within
the call, else in the background after the process ends (``engine.background``); a
callable with no fingerprint is compiled in-process (``torch.compile(dynamic=True)``) when
its eager run would outlast that compile. The policy lives here and nowhere else."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
import torch._dynamo.exc
import torch._inductor.exc
from torch.func import vmap
from torch.utils import _pytree as pytree

from batchfit.core import cache
from batchfit.core.keys import key_of
from batchfit.core.options import Options
from batchfit.engine import aot
from batchfit.engine.ahead import (
    _BY_SIGNATURE,
    _LOOKED,
    _SCALE,
    LOOK_AGAIN_S,
    TRIVIAL_S,
    Bounded,
    _ahead_of_time,
)

# An in-process torch.compile costs about this much (warm inductor cache, 2 cores; a cold one
# 10-30 s): a user callable's kernel is compiled when its estimated eager time is larger.
# With compile=True, every kernel above TRIVIAL_S is compiled (a handful of rows never is).
COMPILE_COST_S = 5.0


def _own_entry(batched: Callable) -> Callable:
    """A wrapper with a code object of its own.

    Dynamo keeps compiled graphs per code object, at most 8 of them; every vmapped kernel
    would otherwise share the code of vmap's wrapper and they would evict each other.
    """
    def entry(*args):
        return batched(*args)
    entry.__code__ = entry.__code__.replace()  # a copy: same bytecode, separate cache
    return entry


def _in_dims(args):
    """Map every tensor with a leading axis over the batch; share scalars and everything else."""
    return pytree.tree_map(
        lambda a: 0 if isinstance(a, torch.Tensor) and a.ndim > 0 else None, args)


# Eager, a kernel over the points runs in chunks of series whose largest intermediate (the
# points times ``fan_out``: a model's forward-mode Jacobian has k values per point) holds
# about this many elements: past it the temporaries leave the caches and the allocator maps
# fresh pages for every op; much below it the per-op overhead of each chunk adds up
# (measured: the 8-parameter, 250-point model on 1e4 series took 35 s in one piece, 13 s in
# chunks of 500 series; huber on 1e5 x 100 took 6.5 s in one piece, 7.3 s in chunks of 260
# series, 3.2-4.3 s in chunks of 1,000-16,000).
EAGER_CHUNK_ELEMENTS = 1 << 20


def _chunk_size(args, fan_out: int) -> int | None:
    """Series per eager chunk, or None for the whole batch at once."""
    shapes = [a.shape for a in pytree.tree_leaves(args)
              if isinstance(a, torch.Tensor) and a.ndim >= 2]
    if not shapes:
        return None
    batch, points = max(s[0] for s in shapes), max(s[1] for s in shapes)
    size = max(1, EAGER_CHUNK_ELEMENTS // (points * fan_out))
    return size if size < batch else None


# What torch.compile raises when its own compiler fails (not an error of the fitted code).
COMPILER_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError)
UNCOMPILABLE = object()  # a kernel whose compile failed, in _COMPILED


def _interrupt_in(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (Ctrl-C, SIGTERM) that torch's compiler wrapped, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if not isinstance(exc, Exception):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Vectorizer:
    """``vectorize(fn, *args, eager_s=0)``: run per-series ``fn`` over the batch.

    ``eager_s`` estimates the uncompiled run time of the fit this call belongs to (times a
    job's number of calls: see ``many_calls``). The policy, ``compile="auto"``:

    * a kernel compiled ahead of time for this machine (``batchfit.engine.aot``) is used when there
      is one; batchfit's kernels, and a user's whose code has a fingerprint
      (``batchfit.core.keys``), are kept across processes;
    * a missing one worth having (``eager_s`` of at least AOT_WORTH_S) is built in the
      foreground only when the build pays back within the call (``eager_s`` above
      AOT_BUILD_S); otherwise this call runs uncompiled and the build goes to the
      background (``batchfit.engine.background``), which later calls pick up;
    * a kernel with no key (made from a callable with no fingerprint) is compiled
      in-process when ``eager_s`` exceeds ``compile_s``, the cost of that compile.

    ``compile=True`` compiles every kernel above TRIVIAL_S now: ahead of time and kept,
    where it has a key, else in-process; ``compile=False`` never compiles.
    ``fan_out``: intermediates per point (see EAGER_CHUNK_ELEMENTS), for eager chunking.
    ``batched``: ``fn``'s code is elementwise on tuples of tensors, so uncompiled it runs on
    the batch's tuples directly (no vmap, no per-op batching overhead).
    """

    def __init__(self, compile, fullgraph: bool):
        self.compile = compile
        self.fullgraph = fullgraph

    def __call__(self, fn: Callable, *args, eager_s: float = 0,
                 compile_s: float = COMPILE_COST_S, fan_out: int = 1, batched: bool = False):
        weight = eager_s * _SCALE[0]
        if self.compile is not False:
            tensors: list = []
            signature = (fn, aot.structure(args, tensors))
            ahead = _BY_SIGNATURE.get(signature)  # (this process has looked it up already)
            now = time.monotonic()
            if ahead is None and now - _LOOKED.get(signature, -LOOK_AGAIN_S) >= LOOK_AGAIN_S:
                _LOOKED.put(signature, now)  # (a kernel building elsewhere: look again later)
                ahead = _ahead_of_time(fn, _in_dims(args), args, weight, self.compile)
                if ahead is not None:
                    _BY_SIGNATURE.put(signature, ahead)
            if ahead is not None:
                return ahead.run(tensors)
        hot = eager_s >= TRIVIAL_S if self.compile is True else (
            self.compile == "auto" and key_of(fn) is None and weight >= compile_s)
        in_dims = _in_dims(args)
        key = (fn, in_dims)
        if hot and _COMPILED.get(key) is not UNCOMPILABLE:
            batched_fn = _COMPILED.get(key)
            if batched_fn is None:
                batched_fn = torch.compile(_own_entry(vmap(fn, in_dims=in_dims)), dynamic=True,
                                           fullgraph=self.fullgraph)
                _COMPILED.put(key, batched_fn)
            try:
                with warnings.catch_warnings():
                    # inductor's own lowering calls a deprecated torch helper: not the user's
                    # business
                    warnings.filterwarnings("ignore", message="`torch._prims_common.check` is "
                                            "deprecated", category=FutureWarning)
                    return batched_fn(*args)
            except COMPILER_ERRORS as exc:  # (torch's compiler failed: the kernel runs eager)
                interrupt = _interrupt_in(exc)
                if interrupt is not None:  # (a signal that arrived while it compiled)
                    raise interrupt from None
                _COMPILED.put(key, UNCOMPILABLE)
                cache.notice(f"could not compile {getattr(fn, '__qualname__', 'a kernel')} "
                             f"({type(exc).__name__}); it runs uncompiled")
        if batched:  # (elementwise code on tuples: it runs on the whole batch as it is)
            return fn(*args)
        chunk = _chunk_size(args, fan_out)
        batched_fn = _VMAPPED.get((key, chunk))
        if batched_fn is None:
            batched_fn = vmap(fn, in_dims=in_dims, chunk_size=chunk)
            _VMAPPED.put((key, chunk), batched_fn)
        return batched_fn(*args)


_VMAPPED = Bounded(256)


_COMPILED = Bounded(64)


def vectorizer(opts: Options) -> Vectorizer:
    """The kernel runner of these options (the compile policy lives here)."""
    return Vectorizer(opts.compile, fullgraph=not callable(opts.loss))
