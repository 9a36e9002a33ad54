"""The engine's torch side: the front door ``fit``, devices, vmap and compilation.

Solvers hand per-series functions to ``_Vectorizer``, which vmaps them over the batch (inputs
with a leading batch axis are mapped, scalars are shared) and runs them compiled where this
machine keeps a kernel for them (``batchfit.engine.aot``: built once, ahead of time, loaded in
milliseconds by every later process; users' models and losses too, by the fingerprint of
their code). A missing kernel is built now only when that pays back within the call, else
in the background after the process ends (``engine.background``); a callable with no
fingerprint is compiled in-process (``torch.compile(dynamic=True)``) when its eager run
would outlast that compile. The compile policy lives here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from batchfit.core import cache
from batchfit.core.keys import key_of
from batchfit.core.names import Status
from batchfit.core.options import Options, resolve
from batchfit.engine import MomentBackend, aot, background, usable_cpus
from batchfit.fitting import moment_twin as stats
from batchfit.fitting.data import (
    FitResult,
    History,
    Inputs,
    Series,
    checked_inputs,
    float32_overflows,
    float32_unsafe_rows,
    make_problem,
    out_of_range_rows,
    problem_of,
    used_points,
)
from batchfit.fitting.diagnostics import PRECISION_LIMITED
from batchfit.fitting.loop import SolverConfig
from batchfit.fitting.losses import resolve_loss
from batchfit.fitting.models import (
    Model,
    in_user_order,
    polynomial,
    resolve_model,
    with_param_count,
)
from batchfit.fitting.nonlinear import solve_model
from batchfit.fitting.solvers import (
    EAGER_S_PER_POINT,
    random_init,
    refit_exact,
    solve_descent,
    solve_exact,
    solve_newton,
    solve_without_points,
)
from batchfit.moments import layout as moments
from batchfit.moments import native
from batchfit.moments.degrees import padded

# An in-process torch.compile costs about this much (warm inductor cache, 2 cores; a cold one
# 10-30 s): a user callable's kernel is compiled when its estimated eager time is larger.
# With compile=True, every kernel above TRIVIAL_S is compiled (a handful of rows never is).
COMPILE_COST_S = 5.0
TRIVIAL_S = 0.05


def resolve_device(device, *arrays) -> torch.device:
    """``auto``: the device of the tensor inputs (results stay where the caller's tensors
    are); for numpy inputs, CUDA when available, else the CPU."""
    if device is None or device == "auto":
        for array in arrays:
            if isinstance(array, torch.Tensor):
                return array.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


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


class _Vectorizer:
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
        if hot:
            batched_fn = _COMPILED.get(key)
            if batched_fn is None:
                batched_fn = torch.compile(_own_entry(vmap(fn, in_dims=in_dims)), dynamic=True,
                                           fullgraph=self.fullgraph)
                _COMPILED.put(key, batched_fn)
            with warnings.catch_warnings():
                # inductor's own lowering calls a deprecated torch helper: not the user's business
                warnings.filterwarnings("ignore", message="`torch._prims_common.check` is "
                                        "deprecated", category=FutureWarning)
                return batched_fn(*args)
        if batched:  # (elementwise code on tuples: it runs on the whole batch as it is)
            return fn(*args)
        chunk = _chunk_size(args, fan_out)
        batched_fn = _VMAPPED.get((key, chunk))
        if batched_fn is None:
            batched_fn = vmap(fn, in_dims=in_dims, chunk_size=chunk)
            _VMAPPED.put((key, chunk), batched_fn)
        return batched_fn(*args)


class _Bounded(OrderedDict):
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


_VMAPPED = _Bounded(256)
_COMPILED = _Bounded(64)
# A kernel is worth keeping for this machine when the uncompiled fit would take AOT_WORTH_S;
# building one takes 7-40 s on 2 cores (huber's three: 21, 8 and 26-40 s; a model's LM
# kernels 7-22 s each), so a build only runs in the foreground when the fit's uncompiled
# time exceeds AOT_BUILD_S, where it pays back within the call.
AOT_WORTH_S = 1.0
AOT_BUILD_S = 120.0
_AHEAD: dict = {}  # name -> loaded kernel, or False (failed to build)
_BY_SIGNATURE = _Bounded(256)  # the loaded kernels by (fn, argument structure)
_LOOKED = _Bounded(256)  # when each signature without a loaded kernel was last looked up
LOOK_AGAIN_S = 1.0
_BUILD_ALL: list = []  # non-empty within ``building_all`` (warmup) or a big job: build all


def _source_digest() -> str:
    """A digest of the source that kernels are traced from: every module of the package but
    those that never define or shape one (a change there keeps the kept kernels)."""
    if not _SOURCE:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        parts = []
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d not in _NO_KERNELS)
            for name in sorted(files):
                if name.endswith(".py") and name not in _NO_KERNELS:
                    with open(os.path.join(root, name), "rb") as f:
                        parts.append(f.read())
        _SOURCE.append(cache.digest(*parts))
    return _SOURCE[0]


_SOURCE: list = []
_NO_KERNELS = {"io", "native", "__pycache__", "job.py", "cli.py", "bench.py", "plots.py",
               "generate.py", "demo.py", "distributed.py", "peers.py", "cache.py",
               "background.py", "__main__.py"}


def _describe(key) -> str:
    (_module, name), args = key if len(key) == 2 and isinstance(key[0], tuple) else (key, ())
    return f"{name}{args!r}" if args else name


def _ahead_of_time(fn, in_dims, args, eager_s: float, compile):
    """The kernel compiled ahead of time for these arguments' structure, dtypes and device:
    loaded from the cache, or built when the policy (``_Vectorizer``, ``compile`` True or
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
                        _source_digest())
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


_POOL: list = []


def thread_pool() -> ThreadPoolExecutor:
    """One pool of ``usable_cpus()`` threads for the work that releases the GIL (the native
    kernel, Parquet decoding)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(usable_cpus(), thread_name_prefix="batchfit"))
    return _POOL[0]


def configure_threads():
    """Size torch's thread pool to the CPUs this process may use (once)."""
    if not _CONFIGURED:
        torch.set_num_threads(usable_cpus())
        _CONFIGURED.append(True)


_CONFIGURED: list = []
NATIVE_MIN_ROWS = 8192  # rows per thread of the native kernel, at least


def _exact(inputs: Inputs, cfg: SolverConfig, vectorize, opts: Options) -> FitResult:
    """The exact fit of dense inputs from their moment tables (``batchfit.moments.layout``): on the
    CPU gathered and solved by the native kernel (rows shared out over the threads), else
    (CUDA, or no usable native kernel) by its torch twin on the inputs' device. Series whose sums lost
    digits are fitted again on their points. ``opts.auto_degree``: each series' degree is
    chosen (``batchfit.moments.degrees``) and its refit made at that degree."""
    def points(rows):
        return problem_of(inputs.take(rows), dtype=torch.float64)

    torch_twin = inputs.y.device.type != "cpu" or native.library() is None
    if torch_twin and not opts.auto_degree:
        table, weighted = _aggregate_torch(inputs, cfg.degree, vectorize)
        return solve_exact(table, weighted, cfg, vectorize, points)
    if torch_twin:
        table, weighted = _aggregate_torch(inputs, cfg.degree, vectorize)
        record = MomentBackend(opts, uses_torch=True).fits(table.cpu().numpy(), weighted)
    else:
        record = _solve_native(inputs, opts)
    result = FitResult.from_record(record, solver="exact", loss_name=cfg.loss.name,
                                   model=cfg.model, device=inputs.y.device)
    redo = np.flatnonzero(~record["trusted"])
    degrees = record.get("degrees", np.full(len(record["status"]), cfg.degree))
    for degree in np.unique(degrees[redo]):
        rows = redo[degrees[redo] == degree]
        part = refit_exact(points(torch.from_numpy(rows)),
                           dataclasses.replace(cfg, degree=int(degree),
                                               model=polynomial(int(degree))), vectorize)
        if opts.auto_degree:
            part = FitResult.from_record(padded(part.record(), int(degree), cfg.degree),
                                         solver="exact", loss_name=cfg.loss.name,
                                         model=cfg.model, device=inputs.y.device)
        result = result.with_rows(torch.from_numpy(rows), part)
    return result


def _aggregate_torch(inputs: Inputs, degree: int, vectorize) -> tuple[torch.Tensor, bool]:
    problem = problem_of(inputs, dtype=torch.float64, centre_x=False)
    weighted = problem.w is not None
    rows = vectorize(stats.dense_kernel(degree, weighted), Series.of(problem),
                     eager_s=EAGER_S_PER_POINT["careful"] * problem.y.numel())
    return torch.stack(rows, dim=1), weighted


def _solve_native(inputs: Inputs, opts: Options) -> dict:
    """``native.solve``'s record of dense inputs, each thread gathering and solving its own
    share of the rows."""
    x, y, w, lengths, mask = inputs
    batch, n = y.shape
    if lengths is not None or mask is not None:  # unused points become weight 0
        keep = torch.ones((batch, n), dtype=torch.bool) if mask is None else mask
        if lengths is not None:
            keep = keep & (torch.arange(n) < lengths[:, None])
        w = keep.to(torch.float64) if w is None else w * keep
    single = all(v is None or v.dtype == torch.float32 for v in (x, y, w))
    dtype = np.float32 if single else np.float64

    def array(value):
        return None if value is None else np.asarray(value.detach().numpy(), dtype=dtype)

    xs = array(x[0] if inputs.shared_x else x)
    ys, ws = array(y), array(w)
    parts = max(1, min(usable_cpus(), batch // NATIVE_MIN_ROWS))
    bounds = np.linspace(0, batch, parts + 1).astype(int)

    def part(lo: int, hi: int) -> dict:
        agg = native.Aggregator(opts.degree, ws is not None, dtype == np.float64,
                                rows=hi - lo)
        agg.add_dense(0, xs if xs.ndim == 1 else xs[lo:hi], ys[lo:hi],
                      None if ws is None else ws[lo:hi])
        return MomentBackend(opts, uses_torch=False).fits(agg.finish(hi - lo), ws is not None)

    records = list(thread_pool().map(part, bounds[:-1], bounds[1:]))
    return records[0] if parts == 1 else {
        name: np.concatenate([record[name] for record in records]) for name in records[0]}


def aggregator(degree: int, weighted: bool, double: bool, device, rows: int = 1):
    """Where a job's statistics are gathered: the native kernel on the CPU (when it can be
    built here), else torch on ``device``."""
    device = resolve_device(device)
    if device.type == "cpu" and native.library() is not None:
        return native.Aggregator(degree, weighted, double, rows)
    return stats.TorchAggregator(degree, weighted, device, rows)


def solve_moments(table, weighted: bool, step, opts: Options) -> dict:
    """``native.solve``'s record, computed by the torch twin (``stats.solve_kernel``) on
    ``opts``' device: for jobs that gather their tables with torch."""
    degree, k = opts.degree, opts.degree + 1
    device = resolve_device(opts.device)
    table = torch.as_tensor(np.asarray(table), device=device)
    if step is not None:
        m = torch.as_tensor(np.asarray(step), device=device).T
        step = (tuple(m[:k]), tuple(m[k:2 * k]), m[2 * k], tuple(m[2 * k + 1:3 * k + 1]),
                m[3 * k + 1])
    out = stats.solve(table, degree, weighted, vectorizer(opts), step)

    def column(name, value):
        if name in FitResult.PER_PARAMETER:  # (computed lowest power first)
            value = in_user_order(None, value)
        return (torch.stack(value, 1) if isinstance(value, tuple) else value).cpu().numpy()

    record = {name: column(name, value) for name, value in out.items()}
    record["n_points"] = record["n_points"].astype(np.int64)
    record["iterations"] = np.isin(record["status"], (0, 4)).astype(np.int64)
    return moments.exact_r2(record)


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


def fit(x, y, weights=None, lengths=None, *, mask=None, degree: int = 2, model=None, p0=None,
        param_names=None, bounds=None, loss="mse",
        f_scale: float = 1.0, solver: str = "auto", lr: float | None = None,
        epochs: int | None = None, tol: float | None = None, init="random", seed: int = 0,
        device="auto", dtype=None, compile="auto", history_every: int = 0,
        history_sample: int = 1 << 14, track=None, restarts: int = 0,
        axis: int = -1) -> FitResult:
    """Fit ``y = sum_i p_i x**i`` (degree 2: ``a x^2 + b x + c``) to every series at once.

    Parameters
    ----------
    x, y : (B, N) arrays or tensors (padded), or (N,) for one series; x may be (N,) shared.
        Any batch shape works: ``y`` (..., N), e.g. an (H, W, T) image stack, with ``x``
        (N,) or broadcastable to ``y`` (and weights, mask likewise, lengths (...)); ``axis``
        picks the points' axis (default the last). The result then has params (..., k)
        and diagnostics (...).
    weights : (B, N), >= 0; a weight multiplies the point's squared residual (as in WLS).
    lengths : (B,) ints, points beyond them are padding. ``mask`` (B, N) bool does the same.
        Points with a non-finite x, y or weight, or weight 0, are skipped.
    degree : polynomial degree, 0 to 10; or ``"auto"`` / ``"auto:D"``: each series' degree in
        0..D (default 3) chosen by BIC (``FitResult.degrees``; higher coefficients 0).
    model : ``None``/``"poly"`` (the polynomial of ``degree``), a built-in family (``"exp"``,
        ``"gauss"``, ``"logistic"``, ``"power"``, see batchfit.fitting.models.FAMILIES), or a callable
        ``f(x, params)`` on ONE series (1-D ``x``, 1-D ``params``), like the seed's ``f``.
    p0 : starting parameters of a nonlinear model: (k,) or (B, k), or a callable
        ``p0(x, y) -> params`` on one series (unused points are NaN); families have their
        own data-driven start. For polynomials it is the ``init`` of gd/adam/newton.
    param_names, bounds : names of a custom model's parameters (default p0, p1, ...);
        ``(lower, upper)`` box constraints (sequences of k, +-inf where free), kept by
        projecting every step onto the box.
    loss : ``mse`` or scipy's robust ``huber``, ``soft_l1``, ``cauchy``, ``arctan`` (with
        ``f_scale``), or a callable ``loss(pred, y)`` (see batchfit.fitting.losses).
    solver : ``auto`` (exact for MSE, newton otherwise), ``exact``, ``newton``, ``gd``, ``adam``.
    lr, epochs, tol, init, seed : iterative solvers. GD/Adam: learning rate (default 1e-3) and
        epochs (default 15000), initial raw coefficients (``random`` seeded normal, ``zeros``
        or an array, highest power first as ``params``); Newton: epochs is the iteration cap
        (default 50; for a model 100 (k + 1), MINPACK's budget). ``tol``: converged when half
        the squared Newton decrement is below tol * |loss| (default 1e-6; 1e-10 for nonlinear
        models in float64, whose last steps converge linearly); Newton then keeps stepping
        while the loss does not rise and a parameter still moves by more than sqrt(eps) of
        itself.
    device, dtype : ``auto|cpu|cuda``; the working precision of the iterative solvers and
        of GPU kernels, float32 (default) or float64. The exact solver accumulates its
        statistics in float64 whatever the dtype (float64-grade coefficients).
    compile : ``auto`` (batchfit's kernels compiled ahead of time, once per machine, used
        when kept and built when the eager call would take over a second; user callables
        compiled in-process when their eager run time exceeds a compile's, about 5 s),
        True (compile every kernel that is not trivial), or False (never).
    history_every, history_sample, track : iterative solvers record the training loss every
        so many epochs (0: about 300 records) for an even sample of ``history_sample`` series
        (the batch's quantiles) and for the ``track`` series (indices; default: 5 spread
        over the batch), see ``FitResult.history``.
    restarts : nonlinear models: fit every series from this many more starting points, each
        parameter of the first start (``p0``, or a family's data-driven guess) scaled by a
        seeded random factor between 1/10 and 10 (a zero one drawn from [-1, 1]); keep the
        converged fit of lowest loss (``FitResult.converged_starts`` counts them).

    Returns
    -------
    FitResult
        ``params`` (B, k) float64 in the column order of ``param_names`` (polynomials highest
        power first, the quadratic's ``a, b, c``: ``params[:, i]`` multiplies
        ``x**(degree - i)``), ``stderr``, ``loss``, ``rmse``,
        ``r2``, ``n_points``, ``iterations``, ``status`` (``status_labels()``), for
        polynomials the frame they were fitted in (``x_centre``, ``x_scale``,
        ``frame_params``: evaluate with ``batchfit.predict``), and for iterative solvers
        ``history``.
    """
    opts = resolve(degree=degree, model=model, p0=p0, param_names=param_names, bounds=bounds,
                   loss=loss, f_scale=f_scale, solver=solver, lr=lr, epochs=epochs, tol=tol,
                   init=init, seed=seed, device=device, dtype=dtype, compile=compile,
                   history_every=history_every, history_sample=history_sample, track=track,
                   restarts=restarts, y=y)
    try:
        ndim = np.ndim(y)
    except ValueError:  # ragged nesting: the input checks say so in their words
        ndim = 2
    if ndim <= 2 and axis in (-1, ndim - 1):
        return solve(x, y, weights, lengths, mask, opts)
    batch_shape, flat = _as_batch(x, y, weights, lengths, mask, axis)
    return solve(*flat, opts).reshaped(batch_shape)


def _as_batch(x, y, weights, lengths, mask, axis: int):
    """(batch shape, (x, y, weights, lengths, mask) as (B, N) with the points last), for y of
    any shape with its points on ``axis``."""
    def moved(value):
        return torch.movedim(value, axis, -1) if isinstance(value, torch.Tensor) \
            else np.moveaxis(np.asarray(value), axis, -1)

    if not -np.ndim(y) <= axis < np.ndim(y):
        raise ValueError(f"axis {axis} is out of range for y of {np.ndim(y)} dimensions")
    y = moved(y)
    shape, n = tuple(y.shape[:-1]), y.shape[-1]

    def flat(value, name):
        if value is None:
            return None
        if np.ndim(value) == 1 and axis in (-1, np.ndim(y) - 1):
            return value  # (N,): shared by every series
        value = moved(value)
        try:
            value = value.expand(*y.shape) if isinstance(value, torch.Tensor) else \
                np.broadcast_to(value, y.shape)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to y's "
                             f"{tuple(y.shape)}") from None
        return value.reshape(-1, n)

    if lengths is not None:
        lengths = np.asarray(lengths).reshape(-1) if not isinstance(lengths, torch.Tensor) \
            else lengths.reshape(-1)
    return shape, (flat(x, "x"), y.reshape(-1, n), flat(weights, "weights"), lengths,
                   flat(mask, "mask"))


def _epochs(opts: Options, model: Model) -> int:
    """The iteration cap: as given, or MINPACK's budget for a model's Levenberg-Marquardt
    (100 (k + 1) evaluations; hard problems from far starts need hundreds)."""
    return 100 * (model.k + 1) if opts.epochs is None else opts.epochs


def config(opts: Options) -> SolverConfig:
    """The solvers' configuration of resolved options: losses and models as torch objects
    (user callables checked here: they need torch)."""
    model = _resolved_model(opts.model, opts.degree, opts.p0, opts.param_names, opts.bounds)
    return SolverConfig(degree=opts.degree, model=model, loss=resolve_loss(opts.loss),
                        f_scale=opts.f_scale, lr=opts.lr, epochs=_epochs(opts, model), tol=opts.tol,
                        init=opts.init, seed=opts.seed, history_every=opts.history_every,
                        history_sample=opts.history_sample, track=opts.track,
                        restarts=opts.restarts)


def vectorizer(opts: Options) -> _Vectorizer:
    """The kernel runner of these options (the compile policy lives here)."""
    return _Vectorizer(opts.compile, fullgraph=not callable(opts.loss))


def solve(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    """``fit`` on resolved options: one precision pass, then the solve (a float32 fit's
    series that float32 cannot hold, or whose fit it limits, solved again in float64)."""
    configure_threads()
    opts = opts.with_(device=resolve_device(opts.device, x, y))
    if opts.solver == "exact":  # float64 statistics whatever the dtype: one pass, then a solve
        inputs = checked_inputs(x, y, weights, lengths, mask, device=opts.device)
        if inputs.y.numel() == 0:
            return solve_without_points(inputs.y.shape[0], opts.device, config(opts),
                                        opts.solver)
        return _exact(inputs, config(opts), vectorizer(opts), opts)
    result = _solve_iterative(x, y, weights, lengths, mask, opts)
    far = out_of_range_rows(checked_inputs(x, y, weights, lengths, mask, device=opts.device))
    return result.marked(far, Status.OUT_OF_RANGE) if bool(far.any()) else result


def _solve_iterative(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    if opts.dtype == "float32" and float32_overflows(y):  # huge |y| would cast to inf
        wide = float32_unsafe_rows(y)
        if wide.any():
            return _fit_wide_apart(x, y, weights, lengths, mask, wide, opts)
    result = _solve_points(x, y, weights, lengths, mask, opts)
    wide = _needs_float64(result, y) if opts.dtype == "float32" else None
    if wide is None:
        return result
    if result.history is None and np.ndim(y) == 2:
        # Rows are independent: redo only the flagged ones (a history would need them
        # merged back in, which the group path does).
        return _with_float64_rows(result, x, y, weights, lengths, mask, wide, opts)
    return _fit_wide_apart(x, y, weights, lengths, mask, wide, opts)


def _solve_points(x, y, weights, lengths, mask, opts: Options) -> FitResult:
    """The iterative solvers' fit in ``opts.dtype``, on the points."""
    cfg, vectorize = config(opts), vectorizer(opts)
    problem = make_problem(x, y, weights, lengths, mask, dtype=getattr(torch, opts.dtype),
                           device=opts.device, centre_x=cfg.model.is_poly)
    if cfg.loss.reduces and bool((vectorize(used_points, Series.of(problem))[0] != 1).any()):
        raise ValueError("a loss callable that returns a scalar cannot skip padded, masked, "
                         "weighted or non-finite points; return per-point losses instead")
    if problem.y.numel() == 0:
        return solve_without_points(problem.batch_size, problem.device, cfg, opts.solver)
    if not cfg.model.is_poly:
        return solve_model(problem, cfg, vectorize, opts.solver, opts.p0)
    if opts.solver == "newton":
        return solve_newton(problem, cfg, vectorize)
    return solve_descent(problem, cfg, vectorize, opts.solver)


def _resolved_model(model, degree, p0, param_names, bounds) -> Model:
    """The model, with a custom model's parameter count taken from ``p0`` if need be."""
    spec = resolve_model(model, degree, param_names, bounds)
    if spec.is_poly:
        return spec
    if p0 is not None and not callable(p0) and np.ndim(p0) in (1, 2):
        spec = with_param_count(spec, int(np.shape(p0)[-1]))
    elif not spec.param_names:
        raise ValueError("a custom model needs p0 as an array (its starting parameters), "
                         "or param_names to say how many parameters it has")
    if spec.start is None and p0 is None:
        raise ValueError(f"the {spec.name} model needs p0 (starting parameters)")
    for side in (spec.lower, spec.upper):
        if side is not None and len(side) != spec.k:
            raise ValueError(f"bounds need {spec.k} values on each side")
    return spec


def _needs_float64(result: FitResult, y) -> np.ndarray | None:
    """The series of a float32 fit to redo in float64, or None: those limited by float32
    rounding (diagnostics.PRECISION_LIMITED), and those whose |y| over- or underflowed
    float32 squares (looked for only where a loss is non-finite or below 2**-100: only exact
    data have a float32 loss that small, otherwise its squares underflowed)."""
    limited = result.status == PRECISION_LIMITED
    loss = result.loss
    suspect = bool(((~torch.isfinite(loss)) | (loss < 2.0**-100)).any())
    if not suspect and not bool(limited.any()):
        return None
    wide = limited.cpu().numpy()
    if suspect:
        wide = wide | float32_unsafe_rows(y)
    return wide if wide.any() else None


def _with_float64_rows(result: FitResult, x, y, weights, lengths, mask, wide: np.ndarray,
                       opts: Options) -> FitResult:
    """``result`` with its ``wide`` rows fitted again in float64."""
    rows = np.flatnonzero(wide)
    part = _solve_points(_take_rows(x, rows, 2), _take_rows(y, rows, 2),
                         _take_rows(weights, rows, 2), _take_rows(lengths, rows, 1),
                         _take_rows(mask, rows, 2),
                         opts.with_(dtype="float64", init=_take_rows(opts.init, rows, 2),
                                    p0=_take_rows(opts.p0, rows, 2), track=()))
    return result.with_rows(torch.from_numpy(rows), part)


def _fit_wide_apart(x, y, weights, lengths, mask, wide: np.ndarray, opts: Options):
    """Fit the ``wide`` series (beyond float32's range, or limited by its rounding) in
    float64, the others in float32."""
    def fit_group(rows, group: Options):
        return _solve_points(_take_rows(x, rows, 2), _take_rows(y, rows, 2),
                             _take_rows(weights, rows, 2), _take_rows(lengths, rows, 1),
                             _take_rows(mask, rows, 2),
                             group.with_(dtype="float64" if wide[rows[0]] else "float32"))

    if np.ndim(y) == 1:  # one series
        return _solve_points(x, y, weights, lengths, mask, opts.with_(dtype="float64"))
    groups = [rows for rows in (np.flatnonzero(~wide), np.flatnonzero(wide)) if len(rows)]
    return _fit_in_groups(groups, len(wide), fit_group, opts)


def _gather(values: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Equal-length series stored at ``starts`` -> a (len(starts), length) array; adjacent
    series are a reshape (no copy)."""
    count = len(starts)
    if count and (np.diff(starts) == length).all():
        return values[starts[0]:starts[0] + count * length].reshape(count, length)
    return values[starts[:, None] + np.arange(length)]


def fit_ragged(x: np.ndarray, y: np.ndarray, offsets: np.ndarray, weights=None,
               **options) -> FitResult:
    """``fit`` for series stored back to back: series i is ``x[offsets[i]:offsets[i + 1]]``.

    Series are fitted in groups of equal length, so nothing is padded (equal-length data
    takes the fast path) and a series' numbers depend only on its own points, never on
    which other series share its batch. Results come back in series order, with the groups'
    training histories merged (``track`` and ``history_sample`` refer to the whole batch).
    """
    opts = resolve(**options, y=y)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths, starts = np.diff(offsets), offsets[:-1]
    groups = [np.flatnonzero(lengths == length) for length in np.unique(lengths)]
    if not groups:
        return solve(np.zeros((0, 1)), np.zeros((0, 1)), None, None, None, opts)

    def fit_group(rows, group: Options):
        at, length = starts[rows], lengths[rows[0]]
        return solve(_gather(x, at, length), _gather(y, at, length),
                     None if weights is None else _gather(weights, at, length), None, None,
                     group)

    return _fit_in_groups(groups, len(lengths), fit_group, opts)


def _fit_in_groups(groups: list[np.ndarray], batch: int, fit_group: Callable,
                   opts: Options) -> FitResult:
    """Fit a batch as disjoint groups of rows, ``fit_group(rows, group_options)`` each;
    results and training histories come back in row order. ``track``, ``history_sample``
    and a random ``init`` refer to the whole batch, so no number depends on the grouping."""
    track = opts.track
    if track is None:  # the default spread, over the whole batch
        track = sorted({round(i * (batch - 1) / 4) for i in range(5)}) if batch else []
    track = np.asarray(track, dtype=np.int64)
    init = opts.init
    if isinstance(init, str) and init == "random" and opts.solver in ("gd", "adam"):
        # (by position in the whole batch; Newton starts from the exact fit instead)
        init = random_init(opts.seed, 0, batch, opts.degree + 1)

    parts = [fit_group(rows, opts.with_(
        track=tuple(np.flatnonzero(np.isin(rows, track)).tolist()),
        history_sample=-(-opts.history_sample * len(rows) // batch),
        init=_take_rows(init, rows, 2), p0=_take_rows(opts.p0, rows, 2))) for rows in groups]
    positions = [torch.from_numpy(rows) for rows in groups]
    histories = [part.history for part in parts]
    history = None if histories[0] is None else History.merge(histories, positions)
    order = torch.from_numpy(np.argsort(np.concatenate(groups), kind="stable"))
    fields = {}
    for field in parts[0].fields:
        joined = torch.cat([getattr(part, field) for part in parts])
        fields[field] = joined[order.to(joined.device)]
    return dataclasses.replace(parts[0], history=history, **fields)


def _take_rows(value, rows: np.ndarray, per_series_ndim: int):
    """Rows of a per-series argument (one with ``per_series_ndim`` dims); shared ones as is."""
    if value is None or np.ndim(value) != per_series_ndim:
        return value
    return value[torch.from_numpy(rows)] if isinstance(value, torch.Tensor) else \
        np.asarray(value)[rows]


def warmup(losses=("huber",), dtypes=("float32",), degree: int = 2) -> list[str]:
    """Build, once for this machine, what batchfit compiles (and check the native kernel
    that the install built): the ahead-of-time kernels of robust polynomial fits for ``losses`` in ``dtypes`` (shaped as
    ``batchfit run`` and ``fit`` call them) and of the exact solver's refinement step. What
    is built already is only loaded. Returns what was done, a line each."""
    done = []
    start = time.perf_counter()
    if native.library() is None:
        done.append("native kernel: unusable (see the warning above); the torch twin does the sums")
    else:
        done.append(f"native kernel: ready ({time.perf_counter() - start:.1f} s)")
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 1.0, 64)
    y = 20 * x**2 + 5 * x - 3 + rng.normal(0, 1, (256, 64))
    with building_all():
        for loss in losses:
            for dtype in dtypes:
                begun = time.perf_counter()
                for xs in (np.tile(x, (256, 1)).astype(dtype), x):  # a job's, numpy's
                    fit(xs, y.astype(dtype), loss=loss, degree=degree, dtype=dtype)
                done.append(f"{loss} ({dtype}): ready ({time.perf_counter() - begun:.0f} s)")
        begun = time.perf_counter()
        cfg = config(resolve(degree=degree))
        problem = make_problem(x, y, dtype=torch.float64, device=torch.device("cpu"))
        refit_exact(problem, cfg, _Vectorizer("auto", fullgraph=True))
        done.append(f"exact refinement: ready ({time.perf_counter() - begun:.0f} s)")
    return done
