"""Kernels compiled ahead of time: looked up in the cache, loaded, or built (now, or left to
the background builder) by the rules of the compile policy (``batchfit.engine.policy``).
Each kernel is keyed by its function, its arguments' structure, torch, Python, the CPU and
the source of the layers it is traced from."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import OrderedDict

import torch

from batchfit.core import cache
from batchfit.core.keys import key_of
from batchfit.engine import aot, background

TRIVIAL_S = 0.05


class Bounded(OrderedDict):
    """A small LRU map (kernels keyed by user callables must not pile up)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


# A kernel is worth keeping for this machine when the uncompiled fit would take AOT_WORTH_S;
# building one takes 7-40 s on 2 cores (huber's three: 21, 8 and 26-40 s; a model's LM
# kernels 7-22 s each), so a build only runs in the foreground when the fit's uncompiled
# time exceeds AOT_BUILD_S, where it pays back within the call.
AOT_WORTH_S = 1.0


AOT_BUILD_S = 120.0


_AHEAD: dict = {}  # name -> loaded kernel, or False (failed to build)


_BY_SIGNATURE = Bounded(256)  # the loaded kernels by (fn, argument structure)


_LOOKED = Bounded(256)  # when each signature without a loaded kernel was last looked up


LOOK_AGAIN_S = 1.0


_BUILD_ALL: list = []  # non-empty within ``building_all`` (warmup) or a big job: build all


# The layers whose modules define or shape a traced kernel (io, pipeline and app never do:
# a change there keeps the kept kernels).
TRACED_LAYERS = ("core", "moments", "fitting", "engine")


def _source_digest() -> str:
    """A digest of the source that kernels are traced from: every module of TRACED_LAYERS."""
    if not _SOURCE:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        parts = []
        for layer in TRACED_LAYERS:
            for root, dirs, files in os.walk(os.path.join(package, layer)):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(".py"):
                        with open(os.path.join(root, name), "rb") as f:
                            parts.append(f.read())
        _SOURCE.append(cache.digest(*parts))
    return _SOURCE[0]


_SOURCE: list = []


def _describe(key) -> str:
    (_module, name), args = key if len(key) == 2 and isinstance(key[0], tuple) else (key, ())
    return f"{name}{args!r}" if args else name


def _ahead_of_time(fn, in_dims, args, eager_s: float, compile):
    """The kernel compiled ahead of time for these arguments' structure, dtypes and device:
    loaded from the cache, or built when the policy (``Vectorizer``, ``compile`` True or
    "auto") says so; None to run it another way now."""
    key = key_of(fn)
    if key is None:
        return None
    tensors, constants, spec = aot.split(args)
    sizes = [t.shape[d] for t in tensors for d in range(min(t.ndim, 2))]
    if not tensors or min(sizes, default=aot.MIN_BATCH) < aot.MIN_BATCH:
        return None
    devices = {t.device.type for t in tensors}
    name = cache.digest(key, in_dims, [(str(t.dtype), t.ndim) for t in tensors], constants,
                        spec, sorted(devices), torch.__version__, sys.version_info[:2],
                        cache.cpu_signature(), _source_digest())
    known = _AHEAD.get(name)
    if known is not None:
        return known or None
    directory = cache.cache_dir("aot", f"torch-{torch.__version__}")
    if directory is None:  # (no cache at all: nothing can be kept, so nothing is built)
        _AHEAD[name] = False
        return None
    path = os.path.join(directory, f"{name}.pt2")
    if os.path.exists(path) and os.path.exists(path + ".json"):
        _AHEAD[name] = aot.load(path) or False
        return _AHEAD[name] or None
    if os.path.exists(path + ".failed"):
        _AHEAD[name] = False
        return None
    if not _BUILD_ALL and compile is True and eager_s < TRIVIAL_S:
        return None
    if not _BUILD_ALL and compile == "auto":
        if eager_s < AOT_WORTH_S:
            return None
        if eager_s < AOT_BUILD_S:  # (it cannot pay back within this call)
            background.request(_describe(key), fn, in_dims, args, path)
            return None
    if _SCALE[0] > 1:  # a big job: build all its kernels now (each is needed many times)
        _BUILD_ALL.append(True)
    _AHEAD[name] = build_kernel(fn, in_dims, args, path, _describe(key)) or False
    return _AHEAD[name] or None


def build_kernel(fn, in_dims, args, path: str, what: str):
    """Build and load one ahead-of-time kernel (a failure is kept beside it, so no later
    process retries; the kernel then runs uncompiled)."""
    try:
        with warnings.catch_warnings():  # (torch's internals warn about their own APIs)
            warnings.simplefilter("ignore", FutureWarning)
            seconds = aot.build(fn, in_dims, args, path)
    except Exception as exc:  # noqa: BLE001 (any failure of torch's export/compile: run uncompiled)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        with open(path + ".failed", "w") as f:
            f.write(f"{type(exc).__name__}: {first}\n")
        cache.notice(f"could not compile {what} ahead of time ({type(exc).__name__}); it runs "
                     "uncompiled")
        return None
    cache.notice(f"compiled {what} for this machine in {seconds:.0f} s (once; kept in "
                 f"{os.path.dirname(path)})")
    return aot.load(path)


@contextlib.contextmanager
def many_calls(count: int):
    """A job fits in ``count`` calls of about the same size, each of which may look too small
    to be worth a compile when the job as a whole is: within this block the compile policy
    weighs each kernel's eager time times ``count``."""
    previous, building = _SCALE[0], len(_BUILD_ALL)
    _SCALE[0] = max(1, count) * previous
    try:
        yield
    finally:
        _SCALE[0] = previous
        del _BUILD_ALL[building:]


_SCALE = [1]


@contextlib.contextmanager
def building_all():
    """Within this block every keyed kernel that is not kept yet is built now (``warmup``)."""
    _BUILD_ALL.append(True)
    try:
        yield
    finally:
        _BUILD_ALL.pop()
