"""The engine: the one place that decides where and how the work runs.

This module is torch-free: the CPUs this process may use, and where a job's moment tables
(``batchfit.moments.layout``) are gathered and solved, the native kernel or torch (``MomentBackend``).
The torch side loads on first use of one of its names (``engine.fit``, ...), so the MSE job
runs without importing torch. Its modules, each one job, lowest first:

- ``devices``: where a fit runs, and the threads;
- ``aot`` and ``background``: building and loading kernels ahead of time, and the detached
  builder;
- ``ahead``: the cache lookup of those kernels and when to build one;
- ``policy``: the compile policy (``Vectorizer``: vmap, compiled or not);
- ``exact``: the exact MSE fit (the native kernel or its torch twin);
- ``front``: the front door ``fit``;
- ``ragged``: ``fit_ragged``;
- ``warm``: ``warmup``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from batchfit.core.options import Options
from batchfit.moments import degrees, native


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (containers), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            with open(path) as f:
                text = f.read()
            if parse is not None:
                quota, period = parse(text)
            else:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota, period = text.strip(), f.read().strip()
            if quota not in ("max", "-1"):
                count = min(count, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError):
            continue
    return max(1, count)


class MomentBackend:
    """Where a job's moment tables are gathered and solved: the native kernel (the CPU, no
    torch at all), or its torch twin (``--device cuda``, or no usable native kernel)."""

    def __init__(self, opts: Options, uses_torch: bool):
        self.opts, self.uses_torch = opts, uses_torch
        self.device = "cpu"
        if uses_torch:
            from batchfit.engine.devices import resolve_device

            self.device = str(resolve_device(opts.device))

    @classmethod
    def choose(cls, opts: Options) -> MomentBackend:
        on_cpu = opts.device == "auto" or str(opts.device).startswith("cpu")
        return cls(opts, uses_torch=not (on_cpu and native.library() is not None))

    def aggregator(self, weighted: bool, double: bool, rows: int):
        if not self.uses_torch:
            return native.Aggregator(self.opts.degree, weighted, double, rows)
        from batchfit.fitting.moment_twin import TorchAggregator

        return TorchAggregator(self.opts.degree, weighted, self.device, rows)

    def solve(self, table, weighted: bool, step=None, degree: int | None = None) -> dict:
        """``native.solve``'s record of a table of ``degree`` (default the options')."""
        degree = self.opts.degree if degree is None else degree
        if not self.uses_torch:
            return native.solve(table, degree, weighted, step)
        from batchfit.engine.exact import solve_moments

        return solve_moments(table, weighted, step, self.opts.with_(degree=degree))

    def merge(self, dst: np.ndarray, src: np.ndarray, weighted: bool) -> np.ndarray:
        """Rows of two tables of the same series merged (``dst`` + ``src``, exactly)."""
        if not self.uses_torch:
            native.merge(dst, src, self.opts.degree, weighted)
            return dst
        import torch

        from batchfit.fitting.moment_twin import merge_tables

        return merge_tables(torch.from_numpy(dst), torch.from_numpy(np.array(src)),
                            self.opts.degree, weighted).numpy()

    def fits(self, table, weighted: bool) -> dict:
        """Every row's record: at the options' degree, or with ``auto_degree`` at each
        row's chosen degree (with ``degrees``)."""
        if not self.opts.auto_degree:
            return self.solve(table, weighted)
        return degrees.choose(np.asarray(table), self.opts.degree, weighted,
                              lambda part, degree: self.solve(part, weighted, degree=degree))


def moment_backend(opts: Options) -> MomentBackend:
    """Where an MSE polynomial job gathers and solves its moment tables."""
    return MomentBackend.choose(opts)


def __getattr__(name):
    """The torch side's names (``fit``, ``fit_ragged``, ``resolve_device``, ...)."""
    # (the import machinery asks for dunders, and for a submodule before importing it)
    if name.startswith("__") or os.path.exists(os.path.join(os.path.dirname(__file__),
                                                            f"{name}.py")):
        raise AttributeError(name)
    from batchfit.engine import ahead, devices, exact, front, policy, ragged, warm

    for module in (front, ragged, warm, exact, policy, ahead, devices):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'batchfit.engine' has no attribute {name!r}")
