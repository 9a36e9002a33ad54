"""The native moment kernel (aggregate.c), built with the package and loaded through ctypes.

``library()`` loads the extension ``batchfit.moments.native._aggregate`` (or its AVX-512
build, ``_aggregate_avx512``, on a CPU that has it) once per process (milliseconds; nothing
is compiled at run time) after checking that it was built from this package's shared numbers (``batchfit.moments.shared``: ``bf_shared`` and ``bf_width``). A
kernel that is missing (an install without a compiler), unloadable or stale gets one warning
line, and the job sums with the torch twin (``batchfit.fitting.moment_twin``: the same numbers
to rounding, about 10x slower per point); ``BATCHFIT_NATIVE=0`` picks the twin without a word.

``Aggregator`` owns a table of per-series statistics (layout in ``batchfit.moments.layout``)
and adds batches of points to it. Its calls release the GIL, so other threads decode meanwhile.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading

import numpy as np

from batchfit.core import cache
from batchfit.core.names import MAX_DEGREE, Status
from batchfit.moments import layout as moments
from batchfit.moments import shared

# The kernel's builds (setup.py), the fastest first.
BUILDS = ("batchfit.moments.native._aggregate_avx512", "batchfit.moments.native._aggregate")

_lock = threading.Lock()
_library: list = []  # [ctypes.CDLL or None], once looked for


def _unusable(why: str):
    cache.notice(f"warning: the native moment kernel is unusable ({why}); the torch twin "
                 "does the sums, about 10x slower (reinstall batchfit with a C compiler "
                 "present; BATCHFIT_NATIVE=0 silences this)")


def _installed_build():
    """The path of the fastest installed build that this CPU runs (None: none installed), and
    the build loaded (None when it cannot be: then the reason instead)."""
    for name in BUILDS:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            spec = None
        if spec is None or not spec.origin:
            continue
        try:
            lib = ctypes.CDLL(spec.origin)
            runs_here = lib.bf_cpu_ok
        except (OSError, AttributeError) as error:
            return spec.origin, f"cannot load {spec.origin}: {error}"
        runs_here.restype, runs_here.argtypes = ctypes.c_int64, []
        if runs_here():
            return spec.origin, lib
    return None, None


def _load():
    """The checked kernel, or None after saying why it cannot be used."""
    path, lib = _installed_build()
    if path is None:
        return _unusable("not installed: batchfit was installed without building it")
    if isinstance(lib, str):
        return _unusable(lib)
    try:
        built_from, widths = lib.bf_shared, lib.bf_width
    except AttributeError as error:
        return _unusable(f"stale: {path}: {error}")
    built_from.restype, built_from.argtypes = ctypes.c_int64, []
    widths.restype, widths.argtypes = ctypes.c_int64, [ctypes.c_int, ctypes.c_int]
    if built_from() != shared.signature() or any(
            widths(d, w) != moments.width(d, bool(w))
            for d in range(MAX_DEGREE + 1) for w in (0, 1)):
        return _unusable(f"stale: {path} was built from other shared numbers than this "
                         "package's")
    return _declare(lib)


def _declare(lib):
    V, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bf_width.restype, lib.bf_width.argtypes = I, [C, C]
    lib.bf_new.restype, lib.bf_new.argtypes = V, [C, C, C]
    lib.bf_free.restype, lib.bf_free.argtypes = None, [V]
    lib.bf_set_table.restype, lib.bf_set_table.argtypes = C, [V, V, V, I]
    for name in ("f32", "f64"):
        fn = getattr(lib, f"bf_add_{name}")
        fn.restype, fn.argtypes = C, [V, I, V, I, V, V, V, C]
        fn = getattr(lib, f"bf_add_dense_{name}")
        fn.restype, fn.argtypes = C, [V, I, I, I, V, I, V, V]
        fn = getattr(lib, f"bf_residual_{name}")
        fn.restype, fn.argtypes = C, [C, C, V, I, I, V, I, V, V, V, V, V, V]
    lib.bf_flush.restype, lib.bf_flush.argtypes = None, [V]
    lib.bf_note.restype, lib.bf_note.argtypes = C, [V, I, V, I]
    lib.bf_finish.restype, lib.bf_finish.argtypes = None, [V, I]
    lib.bf_runs.restype, lib.bf_runs.argtypes = I, [V, V]
    lib.bf_merge.restype, lib.bf_merge.argtypes = None, [C, C, V, V, I]
    lib.bf_get_state.restype, lib.bf_get_state.argtypes = None, [V, V]
    lib.bf_solve.restype = None
    lib.bf_solve.argtypes = [C, C, V, I, V] + [V] * 9
    lib.bf_set_state.restype, lib.bf_set_state.argtypes = C, [V, I, I, V]
    return lib


def library():
    """The loaded native kernel, or None when the torch twin is to do the sums (see the
    module's doc)."""
    with _lock:
        if not _library:
            wanted = os.environ.get("BATCHFIT_NATIVE", "1") != "0"
            _library.append(_load() if wanted else None)
        return _library[0]


def _pointer(array: np.ndarray | None):
    return None if array is None else array.ctypes.data


def _require(array, what: str, name: str, dtype, shape: tuple, writable: bool = False):
    """``array`` must be what the C code takes: a C-contiguous ndarray of ``dtype`` and
    ``shape`` (writable where the C code writes); else it would read or write out of it."""
    dtype = np.dtype(dtype)
    if not (isinstance(array, np.ndarray) and array.dtype == dtype and array.shape == shape
            and array.flags.c_contiguous and (array.flags.writeable or not writable)):
        got = (f"a {'C-contiguous' if array.flags.c_contiguous else 'non-contiguous'} "
               f"{array.dtype} array of shape {array.shape}"
               f"{'' if array.flags.writeable else ', read-only'}"
               if isinstance(array, np.ndarray) else type(array).__name__)
        raise ValueError(f"{what}: {name} must be a C-contiguous{' writable' * writable} "
                         f"{dtype} array of shape {shape}, not {got} (a bug in batchfit)")


def _check(code: int, what: str):
    if code == shared.ERRORS["BF_BAD_CODE"]:
        raise ValueError(f"{what}: a series code is outside the table (a bug in batchfit)")
    if code == shared.ERRORS["BF_NO_MEMORY"]:
        raise MemoryError(f"{what}: out of memory in the native aggregation kernel")
    if code == shared.ERRORS["BF_MISMATCH"]:
        raise ValueError(f"{what}: inputs do not match the aggregator (a bug in batchfit)")


class Aggregator:
    """Per-series statistics of degree-``degree`` polynomial MSE fits, in one pass over points
    in any order (see aggregate.c). ``double``: the inputs are float64 (else float32)."""

    def __init__(self, degree: int, weighted: bool, double: bool, rows: int = 0):
        self.lib = library()
        if self.lib is None:
            raise RuntimeError("the native aggregation kernel is not available")
        self.degree, self.weighted, self.double = degree, weighted, double
        self.dtype = np.float64 if double else np.float32
        self.handle = self.lib.bf_new(degree, int(weighted), int(double))
        if not self.handle:
            raise MemoryError("cannot create the native aggregator")
        self.table = moments.new_table(0, degree, weighted)
        self.seen = np.zeros(0, np.uint8)
        self.reserve(max(rows, 1))

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle:
            self.lib.bf_free(handle)
            self.handle = None

    @property
    def rows(self) -> int:
        return len(self.seen)

    def reserve(self, rows: int):
        """Room for series codes 0 .. rows - 1 (grows by doubling, keeping what is there)."""
        if rows <= self.rows:
            return
        rows = max(rows, 2 * self.rows)
        table, seen = moments.new_table(rows, self.degree, self.weighted), np.zeros(rows, np.uint8)
        self.lib.bf_flush(self.handle)  # buffered points go into the old table, copied next
        table[: self.rows], seen[: self.rows] = self.table, self.seen
        # the old table stays (the kernel's, and alive) until the kernel has taken the new
        # one: refused (out of memory), the aggregator is as it was
        _check(self.lib.bf_set_table(self.handle, _pointer(table), _pointer(seen), rows),
               "reserve")
        self.table, self.seen = table, seen

    def _values(self, values, name):
        array = np.ascontiguousarray(values, dtype=self.dtype)
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D")
        return array

    def _points(self, codes, x, y, w, what: str) -> tuple:
        """Codes and values of as many points, in the types the C code reads."""
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        x, y = self._values(x, "x"), self._values(y, "y")
        w = None if w is None else self._values(w, "w")
        if (w is None) == self.weighted:
            raise ValueError("weights given to an unweighted aggregator, or missing")
        if codes.ndim != 1 or any(len(v) != len(codes) for v in (x, y, w) if v is not None):
            raise ValueError(f"{what}: codes, x, y and w are not one value per point "
                             "(a bug in batchfit)")
        return codes, x, y, w

    def add(self, codes: np.ndarray, x, y, w=None, offset: int = 0, series=None):
        """Points ``(x, y, w)`` of the series in rows ``codes - offset`` (< ``rows``).
        ``series``: the rows of a list-format batch, one per series (with or without
        points), in order; they are the batch's runs."""
        codes, x, y, w = self._points(codes, x, y, w, "add")
        if series is not None:
            series = np.ascontiguousarray(series, dtype=np.int64)
            _check(self.lib.bf_note(self.handle, len(series), _pointer(series), offset), "add")
        add = self.lib.bf_add_f64 if self.double else self.lib.bf_add_f32
        _check(add(self.handle, len(codes), _pointer(codes), offset, _pointer(x), _pointer(y),
                   _pointer(w), int(series is None)), "add")

    def add_dense(self, first: int, x, y, w=None):
        """Rows of ``y`` ((rows, n), C order) as series ``first``, ``first + 1``, ...; ``x`` is
        (n,) shared by all rows or like ``y``; ``w`` None or like ``y``. Rows here are whole
        series: nothing else may add to them."""
        y = np.ascontiguousarray(y, dtype=self.dtype)
        x = np.ascontiguousarray(x, dtype=self.dtype)
        rows, n = y.shape
        stride = 0 if x.ndim == 1 else n
        if x.shape not in ((n,), (rows, n)) or (w is not None and np.shape(w) != y.shape):
            raise ValueError("x, y and w shapes do not match (a bug in batchfit)")
        w = None if w is None else np.ascontiguousarray(w, dtype=self.dtype)
        if (w is None) == self.weighted:
            raise ValueError("weights given to an unweighted aggregator, or missing")
        add = self.lib.bf_add_dense_f64 if self.double else self.lib.bf_add_dense_f32
        _check(add(self.handle, first, rows, n, _pointer(x), stride, _pointer(y), _pointer(w)),
               "add_dense")

    def flush(self):
        self.lib.bf_flush(self.handle)

    def finish(self, rows: int | None = None) -> np.ndarray:
        """Sum everything buffered, put every series in its exact frame; the table's first
        ``rows`` rows (default: all), shared with the aggregator."""
        rows = self.rows if rows is None else rows
        if not 0 <= rows <= self.rows:
            raise ValueError(f"finish: {rows} rows asked of a table of {self.rows} "
                             "(a bug in batchfit)")
        self.lib.bf_finish(self.handle, rows)
        return self.table[:rows]

    def runs(self) -> np.ndarray | None:
        """The codes in the order their runs began, or None when some series came back
        after another one (scattered input: then there are more runs than series)."""
        count = self.lib.bf_runs(self.handle, None)
        if count < 0:
            return None
        out = np.empty(count, np.int64)
        self.lib.bf_runs(self.handle, _pointer(out))
        return out

    def seen_codes(self) -> np.ndarray:
        return np.flatnonzero(self.seen)

    def state(self) -> dict:
        """Everything needed to continue later (``load_state``), as numpy arrays. Buffered
        points must have been flushed."""
        head = np.zeros(3, np.int64)
        self.lib.bf_get_state(self.handle, _pointer(head))
        runs = self.runs()
        return {"table": self.table, "seen": self.seen, "last": head[0], "nruns": head[1],
                "runlist": np.zeros(0, np.int64) if runs is None else runs,
                "scattered": runs is None}

    def load_state(self, state: dict):
        self.reserve(len(state["seen"]))
        rows = len(state["seen"])
        self.table[:rows], self.seen[:rows] = state["table"], state["seen"]
        runlist = None if bool(state["scattered"]) else np.ascontiguousarray(
            state["runlist"], np.int64)
        _check(self.lib.bf_set_state(self.handle, int(state["last"]), int(state["nruns"]),
                                     _pointer(runlist)), "load_state")

    def residual(self, codes, x, y, w, flagged: np.ndarray, q: np.ndarray,
                 out: np.ndarray, offset: int = 0):
        """Add the residual moments of the flagged rows' points to ``out`` (see aggregate.c):
        ``flagged`` (rows,) uint8, ``q`` (rows, degree + 1) and ``out`` (rows, (degree + 2)
        x 2 if weighted else 1) float64, for the table's first ``rows`` rows."""
        codes, x, y, w = self._points(codes, x, y, w, "residual")
        rows, k = (np.shape(flagged)[0] if np.ndim(flagged) else 0), self.degree + 1
        if rows > self.rows:
            raise ValueError(f"residual: flags for {rows} rows of a table of {self.rows} "
                             "(a bug in batchfit)")
        _require(flagged, "residual", "flagged", np.uint8, (rows,))
        _require(q, "residual", "q", np.float64, (rows, k))
        _require(out, "residual", "out", np.float64,
                 (rows, (k + 1) * (2 if self.weighted else 1)), writable=True)
        fn = self.lib.bf_residual_f64 if self.double else self.lib.bf_residual_f32
        # (codes are checked against ``rows``: the arrays' rows, not the table's)
        _check(fn(self.degree, int(self.weighted), _pointer(self.table), rows, len(codes),
                  _pointer(codes), offset, _pointer(x), _pointer(y), _pointer(w),
                  _pointer(flagged), _pointer(q), _pointer(out)), "residual")


def merge(dst: np.ndarray, src: np.ndarray, degree: int, weighted: bool):
    """``dst += src`` row by row for two statistics tables of one layout (any frames)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native aggregation kernel is not available")
    shape = (np.shape(dst)[0] if np.ndim(dst) else 0, moments.width(degree, weighted))
    _require(dst, "merge", "dst", np.float64, shape, writable=True)
    _require(src, "merge", "src", np.float64, shape)
    lib.bf_merge(degree, int(weighted), _pointer(dst), _pointer(src), len(dst))


def solve(table: np.ndarray, degree: int, weighted: bool, step: np.ndarray | None = None
          ) -> dict:
    """Every row's fit (see ``bf_solve`` in aggregate.c): a record of numpy arrays, params
    and stderr (rows, k) in raw units (highest power first), the frame (``x_centre``,
    ``x_scale``, ``frame_params``), loss, rmse, r2, n_points,
    status (Status codes), trusted (the sums kept their digits; else refine on the points),
    q (rows, k) (Chebyshev coefficients of y - yref in the frame). ``step``: a refinement
    step's moments per row, (rows, 3k + 2): q0, sum w r T_j, sum w r^2, and the same
    unweighted."""
    lib = library()
    table = np.ascontiguousarray(table, dtype=np.float64)
    rows, k = len(table), degree + 1
    if table.shape[1:] != (moments.width(degree, weighted),):
        raise ValueError("the table does not have this degree's layout (a bug in batchfit)")
    if step is not None:
        step = np.ascontiguousarray(step, dtype=np.float64)
        if step.shape != (rows, 3 * k + 2):
            raise ValueError("the refinement step has the wrong shape (a bug in batchfit)")
    out = {"params": np.empty((rows, k)), "stderr": np.empty((rows, k)),
           "loss": np.empty(rows), "rmse": np.empty(rows), "r2": np.empty(rows),
           "n_points": np.empty(rows, np.int64), "status": np.empty(rows, np.int8),
           "trusted": np.empty(rows, np.uint8), "q": np.empty((rows, k))}
    lib.bf_solve(degree, int(weighted), _pointer(table), rows, _pointer(step),
                 *(_pointer(out[name]) for name in ("params", "stderr", "loss", "rmse", "r2",
                                                    "n_points", "status", "trusted", "q")))
    out["trusted"] = out["trusted"].astype(bool)
    out["iterations"] = moments.exact_iterations(out["status"])
    return _as_record(out, table)


def _as_record(record: dict, table: np.ndarray) -> dict:
    """A solved table's record as ``FitResult.record()`` has it: coefficients highest power
    first, and the fits in their frames (``moments.frame_coefficients``), blank (NaN) where
    the fit is not identified."""
    record = {**record, "params": record["params"][:, ::-1].copy(),
              "stderr": record["stderr"][:, ::-1].copy()}
    record.update(moments.frame_coefficients(table, record["q"]))
    unidentified = np.isin(record["status"], (int(Status.TOO_FEW_POINTS), int(Status.SINGULAR)))
    record["frame_params"][unidentified] = np.nan
    return moments.exact_r2(record)
