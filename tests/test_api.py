"""The Python front door: user losses, defaults, and bad input answered with clear errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from zoo import polyfit_rows, seed_data

import batchfit


def test_user_loss_per_point_form_equals_builtin(rng):
    x, y = seed_data(10, 30, rng)
    y[2, 5] = np.nan  # per-point losses can skip points
    builtin = batchfit.fit(x, y, loss="mse", solver="newton", dtype="float64", compile=False)
    custom = batchfit.fit(x, y, loss=lambda pred, y: (pred - y) ** 2, dtype="float64",
                          compile=False)
    assert custom.solver == "newton" and custom.loss_name == "<lambda>"
    np.testing.assert_allclose(custom.params, builtin.params, rtol=1e-9)
    assert torch.isnan(custom.stderr).all()  # no likelihood model known for a custom loss


def test_user_loss_seed_scalar_form(rng):
    """The seed's own ``((pred - y) ** 2).mean()``, trained the seed's way."""
    x, y = seed_data(4, 25, rng)
    p0 = np.zeros(3)
    seed_form = batchfit.fit(x, y, loss=lambda pred, y: ((pred - y) ** 2).mean(), solver="gd",
                             lr=0.05, epochs=200, init=p0, dtype="float64", compile=False)
    builtin = batchfit.fit(x, y, solver="gd", lr=0.05, epochs=200, init=p0, dtype="float64",
                           compile=False)
    np.testing.assert_allclose(seed_form.params, builtin.params, rtol=1e-9)


def test_scalar_user_loss_refuses_padded_data(rng):
    x, y = seed_data(3, 10, rng)
    with pytest.raises(ValueError, match="per-point losses"):
        batchfit.fit(x, y, lengths=[10, 5, 10], loss=lambda p, y: ((p - y) ** 2).mean())


def test_robust_user_loss_per_point(rng):
    x, y = seed_data(6, 40, rng)
    mine = batchfit.fit(x, y, loss=lambda p, y: torch.log1p((p - y) ** 2), dtype="float64",
                        compile=False)
    cauchy = batchfit.fit(x, y, loss="cauchy", dtype="float64", compile=False)
    np.testing.assert_allclose(mine.params, cauchy.params, rtol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(solver="lbfgs"), "unknown solver"),
    (dict(loss="l2"), "unknown loss"),
    (dict(degree=-1), "degree must be >= 0"),
    (dict(degree=11), "degree must be at most 10"),
    (dict(degree=2.5), "degree must be an integer"),
    (dict(f_scale=0), "f_scale must be > 0"),
    (dict(lr=-1.0, solver="gd"), "lr must be > 0"),
    (dict(epochs=-5, solver="gd"), "epochs must be >= 0"),
    (dict(tol=-1e-3), "tol must be >= 0"),
    (dict(lr=float("nan"), solver="gd"), "lr must be finite"),  # (nan passed every bound)
    (dict(tol=float("nan")), "tol must be finite"),
    (dict(f_scale=float("inf")), "f_scale must be finite"),
    (dict(epochs=10**20, solver="gd"), r"epochs must be below 2\*\*63"),  # (not an overflow)
    (dict(dtype="float16"), "dtype must be float32 or float64"),
    (dict(device="tpu"), "unknown device"),
    (dict(compile="yes"), "compile must be"),
    (dict(solver="exact", loss="huber"), "exact solver fits MSE only"),
    (dict(solver="gd", init="ones"), "init must be"),
    (dict(solver="gd", init=[1.0, 2.0]), "init must have shape"),
    (dict(weights=-np.ones((2, 5))), "weights must be >= 0"),
    (dict(weights=np.ones((2, 4))), "weights have shape"),
    (dict(lengths=[5, 6]), r"lengths must lie in \[0, 5\]"),
    (dict(lengths=[5.0, 2.0]), "lengths must be 2 integers"),
    (dict(mask=np.ones((2, 5))), "mask must be a bool array"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    x = np.linspace(0, 1, 5)
    y = np.stack([x, x**2])
    with pytest.raises(ValueError, match=message):
        batchfit.fit(x, y, **{"compile": False, **kwargs})


@pytest.mark.parametrize("x,y,message", [
    (np.zeros((2, 3)), np.zeros((2, 4)), "x has shape"),
    (np.zeros((3, 3)), np.zeros((2, 2, 3)), "x of shape \\(3, 3\\) does not broadcast"),
    (np.array(["a", "b"]), np.zeros(2), "x must be numeric"),
    (np.zeros(2), [[1, 2], [3]], "not array-like"),
    (np.zeros(2, dtype=complex), np.zeros(2), "must be real"),
])
def test_bad_arrays_raise_one_clear_error(x, y, message):
    with pytest.raises(ValueError, match=message):
        batchfit.fit(x, y, compile=False)


def test_cuda_request_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        batchfit.fit(np.zeros(3), np.zeros(3), device="cuda")


def test_dtype_and_device_defaults():
    x = np.linspace(0, 1, 10)
    assert batchfit.fit(x, x**2, compile=False).params.dtype == torch.float64
    assert batchfit.fit(x, x**2, compile=False).loss.dtype == torch.float64  # always
    t = torch.as_tensor(x, dtype=torch.float64)
    assert batchfit.fit(t, t**2, compile=False, solver="gd", epochs=10).history.sample_loss.dtype \
        == torch.float64  # float64 tensors in: float64 is the working dtype
    assert batchfit.fit(x, x**2, compile=False).loss.device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")


def test_inputs_are_not_modified(rng):
    x, y = seed_data(3, 10, rng)
    y[0, 0] = np.nan
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    x_copy, y_copy = xt.clone(), yt.clone()
    batchfit.fit(xt, yt, solver="gd", epochs=20, compile=False)
    assert torch.equal(xt, x_copy) and torch.equal(yt.nan_to_num(), y_copy.nan_to_num())


def test_empty_batch():
    fit = batchfit.fit(np.zeros((0, 5)), np.zeros((0, 5)), compile=False)
    assert fit.params.shape == (0, 3) and fit.status_counts() == {}


@settings(max_examples=60, deadline=None)
@given(
    coefs=arrays(np.float64, 3, elements=st.floats(-100, 100)),
    x=arrays(np.int32, st.integers(3, 40), elements=st.integers(-10**6, 10**6), unique=True),
    x_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    noise_seed=st.integers(0, 2**31 - 1),
)
def test_property_exact_matches_polyfit(coefs, x, x_scale, noise_seed):
    """Any x with at least 3 distinct values: exact equals numpy.polyfit in float64."""
    x = x * x_scale
    noise = np.random.default_rng(noise_seed).normal(0, 1, x.shape)
    y = coefs[0] * x**2 + coefs[1] * x + coefs[2] + noise
    fit = batchfit.fit(x, y, dtype="float64", compile=False)
    want, _ = polyfit_rows(x[None], y[None], 2)
    span = np.abs(x).max()
    scale = np.abs(want[0]) * np.array([span**2, span, 1])  # each term's size (a, b, c)
    assert fit.status_labels()[0] == "ok"
    err = np.abs(fit.params[0].numpy() - want[0]) * np.array([span**2, span, 1])
    assert (err <= 1e-7 * (scale.max() + np.abs(y).max())).all()


def _long_frame(rng, series=8, points=15):
    x = rng.uniform(0, 1, (series, points))
    y = 3 * x**2 - 2 * x + 1 + rng.normal(0, 0.1, x.shape)
    return x, y, pa.table({"series_id": np.repeat(np.arange(series), points),
                           "x": x.ravel(), "y": y.ravel()})


def test_a_fit_result_as_a_table_has_the_output_columns(tmp_path, rng):
    x, y, table = _long_frame(rng)
    pq.write_table(table, tmp_path / "d.parquet")
    batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "o.parquet"), dtype="float64")
    written = pq.read_table(tmp_path / "o.parquet")
    fit = batchfit.fit(x, y, dtype="float64")
    arrow = fit.to_arrow()
    assert arrow.column_names == written.column_names
    for name in ("a", "b", "c", "a_stderr", "rmse", "r2"):
        assert np.allclose(arrow[name].to_numpy(), written[name].to_numpy(), rtol=1e-9)
    assert arrow["status"].to_pylist() == written["status"].to_pylist()
    frame = fit.to_pandas(ids=[f"s{i}" for i in range(8)])
    assert list(frame.columns) == written.column_names and frame["series_id"][7] == "s7"
    assert fit.to_polars().columns == written.column_names
    with pytest.raises(ValueError, match="ids has 3 entries for 8 series"):
        fit.to_arrow(ids=[1, 2, 3])
    assert repr(fit) == ("FitResult(8 series, params (a, b, c), solver=exact, loss=mse, "
                         "status: ok 8)")


def test_fit_table_takes_pandas_polars_and_arrow_streams(rng):
    _, _, table = _long_frame(rng)

    class Stream:  # any object with the Arrow PyCapsule stream interface
        def __arrow_c_stream__(self, requested_schema=None):
            return table.__arrow_c_stream__(requested_schema)

    want = batchfit.fit_table(table)
    polars = pytest.importorskip("polars")
    for data in (table.to_pandas(), polars.from_arrow(table), Stream()):
        got = batchfit.fit_table(data)
        assert got.column_names == want.column_names
        assert got["a"].to_pylist() == want["a"].to_pylist()
    with pytest.raises(ValueError, match="must be a pyarrow Table, a pandas or polars"):
        batchfit.fit_table([[1, 2, 3]])


def test_any_batch_shape_gives_the_flat_fits(rng):
    t = np.linspace(0, 1, 12)
    stack = 2 * t**2 - t + 0.5 + rng.normal(0, 0.05, (4, 5, 12))
    flat = batchfit.fit(t, stack.reshape(20, 12))
    fit = batchfit.fit(t, stack)
    assert fit.params.shape == (4, 5, 3) and fit.status.shape == (4, 5)
    assert torch.equal(fit.params.reshape(20, 3), flat.params)
    assert torch.equal(fit.rmse.reshape(20), flat.rmse)
    frames_first = batchfit.fit(t, np.moveaxis(stack, -1, 0), axis=0)  # (T, H, W)
    assert torch.equal(frames_first.params, fit.params)
    per_pixel_x = batchfit.fit(np.broadcast_to(t, stack.shape).copy(), stack)
    assert torch.equal(per_pixel_x.params, fit.params)
    assert fit.to_arrow().num_rows == 20 and fit.status_counts() == {"ok": 20}
    assert repr(fit).startswith("FitResult(4x5 series")
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        batchfit.fit(t, stack, axis=3)
    with pytest.raises(ValueError, match="does not broadcast"):
        batchfit.fit(t, stack, weights=np.ones((3, 12)))


def test_datetime_x_is_fitted_in_seconds(rng):
    """numpy datetime64 x: float seconds since the Unix epoch (UTC); timedelta64: seconds;
    NaT points are skipped. Checked against the same fit on the seconds themselves."""
    start = np.datetime64("2023-11-14T22:13:20.123456789", "ns")
    times = start + (np.arange(48) * 1800).astype("timedelta64[s]")
    seconds = 1_700_000_000.123456789 + np.arange(48) * 1800.0
    y = 1e-9 * (seconds - seconds[0]) ** 2 + rng.normal(0, 0.1, 48) + 20
    as_times, as_seconds = batchfit.fit(times, y), batchfit.fit(seconds, y)
    assert np.allclose(as_times.params.numpy(), as_seconds.params.numpy(), rtol=1e-9)
    elapsed = batchfit.fit(times - times[0], y)
    assert np.allclose(elapsed.params.numpy()[0, 0], as_seconds.params.numpy()[0, 0], rtol=1e-6)
    times[5] = np.datetime64("NaT")
    assert int(batchfit.fit(times, y).n_points[0]) == 47
