"""Compiling kernels in the background, so that no run waits for a compiler.

When the compile policy (``engine.policy.Vectorizer``) meets a kernel worth keeping for this
machine whose build would not pay back within the call, the call runs uncompiled and the
kernel is noted here (``request``, with the first rows of its real arguments). When the
process ends, one builder process is forked for everything noted: it has the functions in
its memory, the user's own model and loss included (nothing is serialised, so nothing is
ever read back as code), runs detached in the idle scheduling class, outlives the process
that started it (a CLI run of a few seconds still leaves its kernels behind), and writes
each kernel into the per-machine cache, renamed into place when complete. Later processes
load them. A kernel that another process is building (a fresh ``.building`` lock beside
it) is not asked for again.

The builder starts at exit, not at once: a builder forked while its parent goes on fitting
made the parent's uncompiled fit 4-7x slower (2 cores; its OpenMP threads spun), where an
unrelated process compiling in the idle class cost it 0-17 %. Linux only; elsewhere, and
with ``BATCHFIT_BACKGROUND=0`` (the test suite's default), kernels not kept yet run
uncompiled until ``batchfit warmup`` or ``compile=True`` builds them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import warnings

import torch

from batchfit.core import cache

STALE_S = 3600  # a builder running longer than this is stopped, its lock abandoned
_ASKED: set = set()  # kernel paths this process has asked for
_PENDING: list = []  # (fn, in_dims, args, path, what) to build when this process ends


def enabled() -> bool:
    return os.environ.get("BATCHFIT_BACKGROUND", "1") != "0" and sys.platform == "linux"


def request(what: str, fn, in_dims, args, path: str):
    """Note the kernel at ``path`` for the builder (once per process)."""
    if not enabled() or not cache.persistent() or path in _ASKED or _fresh(_lock(path)):
        return
    if not _PENDING:
        atexit.register(_at_exit)
    _ASKED.add(path)
    _PENDING.append((fn, in_dims, _first_rows(args), path, what))


def _at_exit():
    if _PENDING:
        pending = list(_PENDING)
        _PENDING.clear()
        start_builder(pending)


def _first_rows(args, rows: int = 8):
    """``args`` with every batched tensor cut to its first ``rows`` rows (a copy)."""
    if isinstance(args, tuple):
        parts = [_first_rows(a, rows) for a in args]
        return type(args)(*parts) if hasattr(args, "_fields") else tuple(parts)
    if isinstance(args, torch.Tensor) and args.ndim:
        return args[:rows].clone()
    return args


def _lock(path: str) -> str:
    return path + ".building"


def _fresh(path: str) -> bool:
    try:
        return time.time() - os.path.getmtime(path) < STALE_S
    except OSError:
        return False


def start_builder(pending: list):
    """Fork a detached builder (through a short-lived middle process, so that no zombie is
    left behind) for the ``pending`` kernels; say so in one line."""
    directory = os.path.dirname(pending[0][3])
    with warnings.catch_warnings():  # (Python 3.12+ warns about forking with threads)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            middle = os.fork()
        except OSError:
            return
        if middle == 0:
            try:
                if os.fork() == 0:
                    _build_all(pending, directory)
            finally:
                os._exit(0)
    os.waitpid(middle, 0)
    cache.notice(f"compiling {len(pending)} kernel(s) for this machine in the background "
                 f"(kept in {directory}); later runs load them (`batchfit warmup` builds the "
                 "common ones ahead)")


def _build_all(pending: list, directory: str):
    """The builder's work: each kernel not built yet, one at a time, under a lock."""
    from batchfit.engine.ahead import build_kernel

    os.setsid()
    # (forked from an exit handler, where Python refuses new exit hooks, which the compiler
    # registers as it starts its thread pools; the builder needs none: it leaves by
    # os._exit)
    atexit.register = lambda fn, *args, **kwargs: fn
    threading._SHUTTING_DOWN = False
    # (the idle class: whatever else runs on the machine comes first)
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    signal.alarm(STALE_S)  # (a builder that hangs does not stay for ever)
    with open(os.path.join(directory, "background.log"), "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    for fn, in_dims, args, path, what in pending:
        if os.path.exists(path) or _fresh(_lock(path)):
            continue
        with open(_lock(path), "w"):
            pass
        try:
            build_kernel(fn, in_dims, args, path, what)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(_lock(path))
