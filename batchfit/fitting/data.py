"""The two values everything else passes around: a batch of series in, a batch of fits out."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from batchfit.core.names import STATUS_LABELS, Status
from batchfit.fitting.models import Model, polynomial


@dataclass(frozen=True)
class Problem:
    """B series padded to N points, on one device in one floating dtype.

    A point is used when x, y (and w, when given) are finite, w > 0, ``mask`` (when given) is
    true and its index is below ``lengths`` (when given). Nothing is filtered eagerly: the
    kernels derive the weights, so no (B, N) temporary is made here.
    ``x_offset`` (float64, per series) has been subtracted from x already; it is set when x
    arrived in more precision than the working dtype, so timestamps survive the cast.
    """

    x: torch.Tensor  # (B, N), or (B, N, d) for x with d columns (nonlinear models)
    y: torch.Tensor  # (B, N)
    w: torch.Tensor | None = None  # (B, N), >= 0
    mask: torch.Tensor | None = None  # (B, N) bool
    lengths: torch.Tensor | None = None  # (B,) int64
    x_offset: torch.Tensor | None = None  # (B,) float64

    def take(self, rows: torch.Tensor) -> Problem:
        """The series at ``rows`` (a copy), e.g. to refit a few of them another way."""
        def pick(value):
            return None if value is None else value[rows]
        return Problem(x=self.x[rows], y=self.y[rows], w=pick(self.w), mask=pick(self.mask),
                       lengths=pick(self.lengths), x_offset=pick(self.x_offset))

    @property
    def batch_size(self) -> int:
        return self.y.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype

    @property
    def device(self) -> torch.device:
        return self.y.device


QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class History:
    """Loss over training for the iterative solvers, on a grid of epochs.

    The batch is represented by the loss of an even sample of its series (NaN for series that
    could not be fitted), summarised by ``loss_quantiles``; a few tracked series keep their
    full curve and their initial parameters, enough to draw the seed's before/after pictures.
    Histories of parts of one job (chunks, length groups) ``merge`` exactly: same grid.
    """

    epochs: torch.Tensor  # (R,)
    sample_loss: torch.Tensor  # (R, S)
    tracked: torch.Tensor  # (T,) series positions in the batch
    tracked_loss: torch.Tensor  # (R, T)
    tracked_initial_params: torch.Tensor  # (T, k), raw units, float64

    @property
    def quantile_levels(self) -> torch.Tensor:
        return torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)

    @property
    def loss_quantiles(self) -> torch.Tensor:
        """(R, 5): the 5th, 25th, 50th, 75th and 95th percentiles of the sampled losses."""
        sample = self.sample_loss.to(torch.float64)
        if sample.shape[1] == 0:
            return torch.full((len(self.epochs), len(QUANTILE_LEVELS)), torch.nan)
        return torch.nanquantile(sample, self.quantile_levels, dim=1).T

    @staticmethod
    def merge(parts: list[History], positions: list[torch.Tensor]) -> History:
        """One history from the histories of disjoint parts of a batch; ``positions[i]``
        maps part i's series positions to the whole batch's."""
        for part in parts[1:]:
            if not torch.equal(part.epochs, parts[0].epochs):
                raise ValueError("histories recorded on different epochs cannot be merged")
        tracked = torch.cat([pos[p.tracked] for p, pos in zip(parts, positions)])
        order = torch.argsort(tracked)  # tracked series in batch order
        return History(
            epochs=parts[0].epochs,
            sample_loss=torch.cat([p.sample_loss for p in parts], dim=1),
            tracked=tracked[order],
            tracked_loss=torch.cat([p.tracked_loss for p in parts], dim=1)[:, order],
            tracked_initial_params=torch.cat([p.tracked_initial_params for p in parts])[order])


@dataclass(frozen=True)
class FitResult:
    """One fit per series. ``params`` columns follow ``param_names``: for polynomials
    highest power first (the quadratic's ``a, b, c``; degree D's ``pD .. p0``, ``params[:, i]``
    multiplying ``x**(D - i)``), in the input's units.

    Polynomial fits also carry their frame, in which batchfit fitted them: ``x_centre`` and
    ``x_scale`` (B,) and ``frame_params`` (B, k), the coefficients of
    ``t = (x - x_centre) / x_scale`` in the same order. With x far from 0 (timestamps) the raw
    coefficients cancel when evaluated; the frame does not (``batchfit.predict`` uses it).

    Coefficients and their standard errors are float64 whatever the working dtype: mapping
    them back from the per-series scaled basis is ill-conditioned for offset x, and float32
    storage would throw away the accuracy the fit had. The diagnostics are float64 too: a
    float32 fit of series with huge |y| runs in float64 and its loss would overflow float32.
    """

    params: torch.Tensor  # (B, k) float64
    stderr: torch.Tensor  # (B, k) float64, NaN where undefined
    loss: torch.Tensor  # (B,) weighted mean of the per-point loss
    rmse: torch.Tensor  # (B,) root mean squared residual over used points
    r2: torch.Tensor  # (B,) weighted coefficient of determination
    n_points: torch.Tensor  # (B,) int64
    iterations: torch.Tensor  # (B,) int64
    status: torch.Tensor  # (B,) int8 codes of Status
    solver: str
    loss_name: str
    history: History | None = field(default=None, repr=False)
    model: Model | None = field(default=None, repr=False)  # None: the polynomial
    converged_starts: torch.Tensor | None = field(default=None, repr=False)  # (B,) restarts
    x_centre: torch.Tensor | None = field(default=None, repr=False)  # (B,) float64
    x_scale: torch.Tensor | None = field(default=None, repr=False)  # (B,) float64
    frame_params: torch.Tensor | None = field(default=None, repr=False)  # (B, k) float64
    degrees: torch.Tensor | None = field(default=None, repr=False)  # (B,) degree="auto"
    # (B, k, k) float64, with ``covariance=True``: in the order of ``params`` on both axes
    covariance: torch.Tensor | None = field(default=None, repr=False)

    @property
    def degree(self) -> int | None:
        """The polynomial's degree (None for other models)."""
        return self.params.shape[-1] - 1 if self.model is None or self.model.is_poly else None

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of ``params``' columns, in column order (for the quadratic: a, b, c)."""
        return self.output_model.param_names

    @property
    def output_model(self) -> Model:
        return polynomial(self.degree) if self.model is None else self.model

    RECORD = ("params", "stderr", "loss", "rmse", "r2", "n_points", "iterations", "status")
    OPTIONAL = ("x_centre", "x_scale", "frame_params", "degrees", "converged_starts",
                "covariance")
    PER_PARAMETER = ("params", "stderr", "frame_params")

    @classmethod
    def from_record(cls, record: dict, *, solver: str, loss_name: str, model=None,
                    device=None) -> FitResult:
        """A result from a record of numpy arrays (``native.solve``'s)."""
        def tensor(value):
            out = torch.from_numpy(np.ascontiguousarray(value))
            return out if device is None else out.to(device)
        return cls(**{name: tensor(record[name]) for name in cls.RECORD + cls.OPTIONAL
                      if name in record}, solver=solver, loss_name=loss_name, model=model)

    def reshaped(self, batch_shape: tuple) -> FitResult:
        """The same fits with the batch laid out as ``batch_shape`` (params (..., k))."""
        def shaped(value):
            return value.reshape(*batch_shape, *value.shape[1:])
        return dataclasses.replace(self, **{name: shaped(getattr(self, name))
                                            for name in self.fields})

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-series fields this result has (``RECORD``, then those of ``OPTIONAL`` it
        carries: a polynomial's frame, its chosen degrees, a multi-start's counts)."""
        return self.RECORD + tuple(name for name in self.OPTIONAL
                                   if getattr(self, name) is not None)

    def record(self) -> dict:
        """The per-series fields as numpy arrays, one row per series whatever the batch
        shape (what the output tables are made of)."""
        k = self.params.shape[-1]
        record = {name: getattr(self, name).cpu().numpy().reshape(
            (-1, k) if name in self.PER_PARAMETER else (-1, k, k) if name == "covariance"
            else (-1,)) for name in self.fields}
        return {**record, **self._derived(record)}

    @property
    def derived(self) -> dict[str, np.ndarray]:
        """The model's derived columns (``Model.derived``: hill4's ``ic50``, ``ic50_low``,
        ``ic50_high``), one value per series (batch shape kept; NaN where undefined); empty
        for models without them."""
        k = self.params.shape[-1]
        flat = {"params": self.params.cpu().numpy().reshape(-1, k),
                "stderr": self.stderr.cpu().numpy().reshape(-1, k),
                "n_points": self.n_points.cpu().numpy().reshape(-1)}
        return {name: values.reshape(self.status.shape)
                for name, values in self._derived(flat).items()}

    def _derived(self, record: dict) -> dict[str, np.ndarray]:
        model = self.model
        if model is None or model.derived is None:
            return {}
        return dict(zip(model.derived_names, model.derived(
            record["params"], record["stderr"], record["n_points"])))

    def with_rows(self, rows: torch.Tensor, part: FitResult) -> FitResult:
        """This result with the series at ``rows`` taken from ``part`` (fitted apart)."""
        rows = rows.to(self.status.device)
        return dataclasses.replace(self, **{
            name: getattr(self, name).index_put((rows,), getattr(part, name).to(
                getattr(self, name).device, getattr(self, name).dtype))
            for name in self.fields})

    def marked(self, rows: torch.Tensor, status: Status) -> FitResult:
        """This result with the series where ``rows`` (B,) is True given ``status`` and no
        numbers (NaN; their point counts kept)."""
        rows = rows.to(self.status.device)
        blank = {name: torch.where(rows.reshape(-1, *[1] * (value.ndim - 1)),
                                   torch.nan, value)
                 for name in self.fields if (value := getattr(self, name)).is_floating_point()}
        return dataclasses.replace(self, **blank, status=torch.where(
            rows, int(status), self.status).to(self.status.dtype))

    def take(self, rows: torch.Tensor) -> FitResult:
        """The series at ``rows`` (history and model kept)."""
        rows = rows.to(self.status.device)
        return dataclasses.replace(self, **{name: getattr(self, name)[rows]
                                            for name in self.fields})

    def to_arrow(self, ids=None):
        """The fits as a pyarrow Table with the columns of ``batchfit run``'s output (``ids``:
        one per series, any sequence or Arrow array; default 0 .. B-1)."""
        from batchfit import io
        from batchfit.fitting.models import output_columns

        model = self.output_model
        meta = {"solver": self.solver, "loss": self.loss_name, "model": model.name,
                "degree": self.degree, "param_columns": list(model.param_names)}
        if model.formula is not None:  # (what ``predict`` and ``plot`` evaluate it from)
            meta["formula"] = model.formula
        return io.fit_arrow(self.record(), output_columns(model), ids, meta,
                            derived=model.derived_names)

    def to_pandas(self, ids=None):
        """``to_arrow`` as a pandas DataFrame (needs pandas)."""
        table = self.to_arrow(ids)
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ValueError("to_pandas needs pandas: pip install 'batchfit[pandas]'") from None
        return table.to_pandas()

    def to_polars(self, ids=None):
        """``to_arrow`` as a polars DataFrame (needs polars)."""
        table = self.to_arrow(ids)
        try:
            import polars
        except ImportError:
            raise ValueError("to_polars needs polars: pip install 'batchfit[polars]'") from None
        return polars.from_arrow(table)

    def __repr__(self) -> str:
        counts = ", ".join(f"{label} {n:,}" for label, n in self.status_counts().items())
        shape = "x".join(map(str, self.status.shape)) if self.status.ndim > 1 else \
            f"{self.status.numel():,}"
        return (f"FitResult({shape} series, params "
                f"({', '.join(self.param_names)}), solver={self.solver}, "
                f"loss={self.loss_name}, status: {counts or 'none'})")

    def status_labels(self) -> np.ndarray:
        """Status names ('ok', 'singular', ...) as a numpy array of str."""
        return np.asarray(STATUS_LABELS)[self.status.cpu().numpy()]

    def status_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.status.long().cpu().reshape(-1), minlength=len(Status))
        return {s.label: int(counts[s]) for s in Status if counts[s]}


def _as_tensor(name: str, value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not array-like: {exc}") from None
    if name == "x" and array.dtype.kind in "mM":
        array = datetime_seconds(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    return shared_tensor(array, device=device)


def shared_tensor(array: np.ndarray, dtype=None, device=None) -> torch.Tensor:
    """``torch.as_tensor`` of an array that may be read-only (zero-copy from Arrow): fine,
    since batchfit never writes its inputs, so torch's warning about it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array, dtype=dtype, device=device)


def datetime_seconds(values: np.ndarray) -> np.ndarray:
    """numpy ``datetime64`` as float seconds since 1970-01-01 (UTC), ``timedelta64`` as float
    seconds; NaT becomes NaN (a skipped point). Whole seconds and the fraction are converted
    apart, so nanosecond inputs lose nothing float64 can hold."""
    ticks = values.astype("datetime64[ns]" if values.dtype.kind == "M" else "timedelta64[ns]")
    count = ticks.view(np.int64)
    seconds = (count // 1_000_000_000).astype(np.float64)
    seconds += (count % 1_000_000_000).astype(np.float64) / 1e9
    return np.where(np.isnat(values), np.nan, seconds)


def _real(name: str, value: torch.Tensor):
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {value.dtype}")


# Float32 sums of squares overflow above, and squared residuals underflow below, this band of
# |y| (with up to ~1e8 points per series); series outside it are fitted in float64.
FLOAT32_SAFE_Y = (2.0**-32, 2.0**48)


def float32_unsafe_rows(y) -> np.ndarray:
    """(B,) bool: series whose largest finite |y| lies outside ``FLOAT32_SAFE_Y`` (all-zero
    series are safe). One pass over y; rows holding NaN or inf get a second, masked look."""
    y = _as_tensor("y", y, None)
    y = (y[None] if y.ndim == 1 else y).to(torch.float64 if not y.is_floating_point() else y.dtype)
    if y.ndim != 2 or y.numel() == 0:
        return np.zeros(y.shape[:1], dtype=bool)
    top = torch.linalg.vector_norm(y, ord=torch.inf, dim=1)
    odd = ~torch.isfinite(top)
    if bool(odd.any()):
        rows = y[odd]
        top[odd] = torch.where(torch.isfinite(rows), rows.abs(), 0).amax(dim=1)
    low, high = FLOAT32_SAFE_Y
    return ((top > high) | ((top < low) & (top > 0))).cpu().numpy()


# The largest |y| of a series that the iterative solvers fit as it is: squares and products
# (losses, gradients, Hessians) then stay inside float64's range with room for sums. Beyond,
# a series gets Status.OUT_OF_RANGE. (Weights are scaled per series: no fit depends on
# their scale.)
ITERATIVE_SAFE = (2.0**-250, 2.0**250)


def scale_for(magnitude: torch.Tensor) -> torch.Tensor:
    """As aggregate.c's ``scale_for``: 1, or for a magnitude far from 1 (beyond 2^+-100) the
    power of two that brings it into [0.5, 1) (at most 2^1000)."""
    far = (magnitude > 0) & torch.isfinite(magnitude) & ~((magnitude > 2.0**-100)
                                                          & (magnitude < 2.0**100))
    # (the exponent as a float: inductor's AVX-512 code cannot take the maximum of int32s)
    exponent = torch.frexp(torch.where(far, magnitude, 1)).exponent.to(magnitude.dtype
                                                                       ).clamp(min=-1000)
    return torch.where(far, torch.ldexp(torch.ones_like(magnitude), -exponent), 1)


def _used(inputs: Inputs) -> torch.Tensor:
    used = finite_x(inputs.x, inputs.y) & torch.isfinite(inputs.y)
    if inputs.w is not None:
        used &= torch.isfinite(inputs.w) & (inputs.w > 0)
    if inputs.mask is not None:
        used &= inputs.mask
    if inputs.lengths is not None:
        used &= torch.arange(inputs.y.shape[1], device=inputs.y.device) < inputs.lengths[:, None]
    return used


def out_of_range_rows(inputs: Inputs) -> torch.Tensor:
    """(B,) bool: series whose largest |y| among their used points lies outside
    ``ITERATIVE_SAFE`` (all-zero y is fine)."""
    low, high = ITERATIVE_SAFE
    if not inputs.y.shape[1]:  # (series without points)
        return torch.zeros(inputs.y.shape[0], dtype=torch.bool, device=inputs.y.device)
    top = torch.where(_used(inputs), inputs.y.abs(), 0).amax(dim=1).to(torch.float64)
    return (top > high) | ((top < low) & (top > 0))


def float32_overflows(y) -> bool:
    """Whether y, stored wider than float32, holds a finite |y| above ``FLOAT32_SAFE_Y``
    (cast to float32 it would become inf, or its square would). One pass over y."""
    y = _as_tensor("y", y, None)
    if y.numel() == 0 or (y.is_floating_point() and torch.finfo(y.dtype).bits <= 32):
        return False
    low, high = torch.aminmax(y)
    top = max(-float(low), float(high))
    if not math.isfinite(top):  # NaN or inf points: look at the finite ones
        top = float(torch.where(torch.isfinite(y), y.abs(), 0).amax())
    return top > FLOAT32_SAFE_Y[1]


class Inputs(NamedTuple):
    """``fit``'s arrays checked and as tensors on the device, not yet cast: ``y`` (B, N); ``x``
    like y, or (B, N, d) (a shared (N,) or (N, d) x expanded, stride 0, no copy); ``w`` like
    y or None; ``lengths``
    (B,) int64 or None; ``mask`` (B, N) bool or None."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None
    lengths: torch.Tensor | None
    mask: torch.Tensor | None

    @property
    def shared_x(self) -> bool:
        return self.y.shape[0] > 1 and self.x.stride(0) == 0

    def take(self, rows: torch.Tensor) -> Inputs:
        """The series at ``rows``."""
        def pick(value):
            return None if value is None else value[rows.to(value.device)]
        return Inputs(*(pick(v) for v in self))


def x_columns_of(x_shape: tuple, y_shape: tuple) -> int | None:
    """The number of columns d of an x with several (a trailing axis beyond y's points:
    ``(..., N, d)`` for y ``(..., N)`` (broadcast to it), or ``(N, d)`` shared by the series
    of a (B, N) y), None for x with one value per point (the shape of y, or ``(N,)``; an x
    as shaped as y wins)."""
    if len(x_shape) == len(y_shape) + 1:
        return x_shape[-1]
    if len(x_shape) == 2 and len(y_shape) == 2 and x_shape[0] == y_shape[-1] and \
            tuple(x_shape) != tuple(y_shape[-2:]):
        return x_shape[1]
    return None


def finite_x(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether each point's x is finite: over its coordinates for x with several columns."""
    finite = torch.isfinite(x)
    return finite.all(-1) if x.ndim > y.ndim else finite


def checked_inputs(x, y, weights=None, lengths=None, mask=None, *, device) -> Inputs:
    """Validate ``fit``'s arrays or tensors; one-line ValueErrors on bad input.

    ``y`` is (B, N) or (N,) for one series; ``x`` is the same shape, or (N,) shared by all
    series (broadcast without a copy); x with d columns is (B, N, d) (for one series (N, d)),
    or (N, d) shared (``x_columns_of``).
    """
    y_in = _as_tensor("y", y, device)
    y_shape = tuple(y_in.shape)
    if y_in.ndim == 1:
        y_in = y_in[None]
    if y_in.ndim != 2:
        raise ValueError(f"y must be 1-D or 2-D (batch, points), got shape {tuple(y_in.shape)}")
    _real("y", y_in)
    batch, n = y_in.shape
    x_in = _as_tensor("x", x, device)
    columns = x_columns_of(tuple(x_in.shape), y_shape)
    if columns is not None:  # x (B, N, d), or (N, d) shared by all series
        if x_in.shape == (n, columns):
            x_in = x_in.expand(batch, n, columns)
        if x_in.shape[:2] != y_in.shape or columns == 0:
            raise ValueError(f"x has shape {tuple(x_in.shape)} but y has {y_shape}; x with d "
                             "columns must be (B, N, d), or (N, d) shared by all series")
    elif x_in.shape == (n,):
        x_in = x_in.expand(batch, n)
    elif x_in.ndim == 1 and batch == 1:
        x_in = x_in[None]
    if columns is None and x_in.shape != y_in.shape:
        raise ValueError(f"x has shape {tuple(x_in.shape)} but y has {tuple(y_in.shape)}; "
                         "x must match y or be 1-D with one value per point")
    _real("x", x_in)
    w = None
    if weights is not None:
        w = _as_tensor("weights", weights, device)
        _real("weights", w)
        if w.ndim == 1 and w.shape[0] == n:
            w = w.expand(batch, n)
        elif w.ndim == 1 and batch == 1:
            w = w[None]
        if w.shape != y_in.shape:
            raise ValueError(f"weights have shape {tuple(w.shape)} but y has {tuple(y_in.shape)}")
        if bool(((w < 0) & torch.isfinite(w)).any()):  # (NaN and -inf, like inf: skipped)
            raise ValueError("weights must be >= 0 (a weight multiplies a squared residual)")
    if lengths is not None:
        lengths = _as_tensor("lengths", lengths, device).reshape(-1)
        if lengths.is_floating_point() or lengths.shape != (batch,):
            raise ValueError(f"lengths must be {batch} integers, one per series")
        if bool(((lengths < 0) | (lengths > n)).any()):
            raise ValueError(f"lengths must lie in [0, {n}]")
        lengths = lengths.long()
    if mask is not None:
        mask = _as_tensor("mask", mask, device)
        if mask.dtype != torch.bool or mask.shape != y_in.shape:
            raise ValueError(f"mask must be a bool array of shape {tuple(y_in.shape)}")
    return Inputs(x_in, y_in, w, lengths, mask)


def make_problem(x, y, weights=None, lengths=None, mask=None, *,
                 dtype: torch.dtype, device: torch.device, centre_x: bool = True) -> Problem:
    """Validate arrays or tensors (``checked_inputs``) and lay them out as a Problem in
    ``dtype``."""
    inputs = x if isinstance(x, Inputs) else checked_inputs(x, y, weights, lengths, mask,
                                                             device=device)
    return problem_of(inputs, dtype=dtype, centre_x=centre_x)


def problem_of(inputs: Inputs, *, dtype: torch.dtype, centre_x: bool = True) -> Problem:
    x_in, y_in, w, lengths, mask = inputs
    batch, n = y_in.shape
    device = y_in.device
    x_offset = None
    if centre_x and x_in.is_floating_point() and \
            torch.finfo(x_in.dtype).bits > torch.finfo(dtype).bits:
        # Centre in the input's precision before the cast: float32 cannot hold timestamps.
        valid = torch.isfinite(x_in)
        if mask is not None:
            valid &= mask
        if lengths is not None:
            valid &= torch.arange(n, device=device) < lengths[:, None]
        lo = torch.where(valid, x_in, torch.inf).amin(dim=1) if n else torch.zeros(batch)
        hi = torch.where(valid, x_in, -torch.inf).amax(dim=1) if n else torch.zeros(batch)
        mid = (lo + hi) / 2
        x_offset = torch.where(torch.isfinite(mid), mid, 0).to(torch.float64)
        x_in = x_in - x_offset[:, None].to(x_in.dtype)
    if w is not None and w.numel():  # each series' weights near 1 (exact: a power of two)
        heaviest = torch.where(_used(inputs), w, 0).amax(dim=1).to(torch.float64)
        w = w * scale_for(heaviest).to(w.dtype)[:, None]
    return Problem(x=x_in.to(dtype), y=y_in.to(dtype), w=None if w is None else w.to(dtype),
                   mask=mask, lengths=lengths, x_offset=x_offset)


class Series(NamedTuple):
    """A Problem's fields, vmapped over the batch: one series' slice inside the kernels."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None
    mask: torch.Tensor | None
    length: torch.Tensor | None
    x_offset: torch.Tensor | None

    @classmethod
    def of(cls, problem: Problem) -> Series:
        return cls(problem.x, problem.y, problem.w, problem.mask, problem.lengths,
                   problem.x_offset)


def used_points(series: Series):
    """``(w, x, y)`` of one series with every unused point at weight 0 and value 0."""
    x, y = series.x, series.y
    used = finite_x(x, y) & torch.isfinite(y)
    if series.w is not None:
        used &= torch.isfinite(series.w) & (series.w > 0)
    if series.mask is not None:
        used &= series.mask
    if series.length is not None:
        used &= torch.arange(y.shape[-1], device=y.device) < series.length
    w = used.to(y.dtype) if series.w is None else torch.where(used, series.w, 0)
    return w, torch.where(used[..., None] if x.ndim > y.ndim else used, x, 0), \
        torch.where(used, y, 0)
