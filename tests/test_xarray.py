"""batchfit.xarray: DataArray stacks fitted in one batch (or block by block when dask-backed),
checked against batchfit.fit on the same numbers and against xarray's own curvefit (scipy's
curve_fit per series) and polyfit (numpy's least squares), with names and dims compared."""

import subprocess
import sys

import numpy as np
import pytest

import batchfit

xr = pytest.importorskip("xarray")
bx = pytest.importorskip("batchfit.xarray")
stacks = pytest.importorskip("batchfit.pipeline.stacks")

T = np.linspace(0.0, 1.0, 12)


def decay_stack(seed=0, noise=0.01, dims=("y", "x", "t")):
    """A 6 x 5 stack of 12-point decays a exp(-b t) + c, the points along ``dims``' "t"."""
    rng = np.random.default_rng(seed)
    a, b, c = (rng.uniform(lo, hi, (6, 5, 1)) for lo, hi in ((1, 3), (1, 4), (0, 1)))
    y = a * np.exp(-b * T) + c + rng.normal(0, noise, (6, 5, 12))
    da = xr.DataArray(y, dims=("y", "x", "t"),
                      coords={"t": T, "y": np.arange(6), "x": 2.0 * np.arange(5)})
    return da.transpose(*dims)


def curvefit_decay(da, dim="t"):
    return da.curvefit(dim, lambda t, a, b, c: a * np.exp(-b * t) + c,
                       p0={"a": 2.0, "b": 2.0, "c": 0.5})


def test_results_equal_batchfit_fit_on_the_same_numbers():
    da = decay_stack(dims=("t", "y", "x"))  # the fitted dim first: moved to the end inside
    ds = bx.fit(da, "t", model="exp", dtype="float64", compile=False)
    ref = batchfit.fit(T, np.moveaxis(da.values, 0, -1), model="exp", dtype="float64",
                       compile=False)
    np.testing.assert_array_equal(ds.curvefit_coefficients.values, ref.params.numpy())
    np.testing.assert_array_equal(ds.curvefit_stderr.values, ref.stderr.numpy())
    for name in ("n_points", "loss", "rmse", "r2", "iterations", "status"):
        np.testing.assert_array_equal(ds[name].values, getattr(ref, name).numpy())
    assert list(ds.param.values) == ["a", "b", "c"]


def test_an_exp_decay_matches_xarray_curvefit_names_dims_and_numbers():
    da = decay_stack()
    ds = bx.fit(da, "t", model="exp", dtype="float64", compile=False)
    ref = curvefit_decay(da)
    ours, theirs = ds.curvefit_coefficients, ref.curvefit_coefficients
    assert ours.dims == theirs.dims == ("y", "x", "param")
    for coord in ("param", "y", "x"):
        np.testing.assert_array_equal(ours[coord].values, theirs[coord].values)
    np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-6, atol=1e-8)
    assert ds.curvefit_covariance.dims == ref.curvefit_covariance.dims
    for coord in ("cov_i", "cov_j"):
        np.testing.assert_array_equal(ds[coord].values, ref[coord].values)
    xr.testing.assert_allclose(ds.curvefit_covariance, ref.curvefit_covariance, rtol=1e-3)
    scipy_stderr = np.sqrt(np.diagonal(ref.curvefit_covariance.values, axis1=-2, axis2=-1))
    np.testing.assert_allclose(ds.curvefit_stderr.values, scipy_stderr, rtol=1e-3)
    assert "curvefit_covariance" not in bx.fit(da, "t", model="exp", covariance=False,
                                               compile=False)
    assert (ds.status == 0).all()
    assert ds.status.attrs["flag_meanings"].split()[:2] == ["ok", "too_few_points"]
    np.testing.assert_array_equal(ds.status.attrs["flag_values"], np.arange(6))
    assert ds.attrs["batchfit_model"] == "exp" and ds.attrs["batchfit_loss"] == "mse"
    assert ds.attrs["batchfit_version"] == batchfit.__version__
    # the accessor is the same function
    via_accessor = da.batchfit.fit("t", model="exp", dtype="float64", compile=False)
    xr.testing.assert_identical(via_accessor, ds)


def test_a_polynomial_matches_xarray_polyfit_in_both_styles():
    da = decay_stack(noise=0.05)
    ref = da.polyfit("t", 2, cov=True)
    ds = bx.fit(da, "t", degree=2, style="polyfit")
    assert ds.polyfit_coefficients.dims == ref.polyfit_coefficients.dims == ("degree", "y", "x")
    np.testing.assert_array_equal(ds.degree.values, ref.degree.values)
    xr.testing.assert_allclose(ds.polyfit_coefficients, ref.polyfit_coefficients, rtol=1e-9)
    assert ds.polyfit_covariance.dims == ref.polyfit_covariance.dims
    xr.testing.assert_allclose(ds.polyfit_covariance, ref.polyfit_covariance, rtol=1e-7)
    # xarray.polyval takes the polyfit-style coefficients as they are
    xr.testing.assert_allclose(xr.polyval(da.t, ds.polyfit_coefficients),
                               xr.polyval(da.t, ref.polyfit_coefficients), rtol=1e-9)
    curve = bx.fit(da, "t", degree=2)  # the default style: a, b, c, highest power first
    np.testing.assert_allclose(curve.curvefit_coefficients.values,
                               np.moveaxis(ref.polyfit_coefficients.values, 0, -1), rtol=1e-9)
    assert list(curve.param.values) == ["a", "b", "c"]


def test_datetimes_on_the_fitted_dim_count_nanoseconds_as_polyfit_does():
    rng = np.random.default_rng(1)
    time = np.datetime64("2024-03-01") + np.arange(30) * np.timedelta64(6, "h")
    days = np.arange(30) / 4.0
    y = 3.0 + 0.2 * days + rng.normal(0, 0.1, (4, 3, 30))
    da = xr.DataArray(y, dims=("lat", "lon", "time"), coords={"time": time})
    ref = da.polyfit("time", 1)
    ds = bx.fit(da, "time", degree=1, style="polyfit")
    xr.testing.assert_allclose(ds.polyfit_coefficients, ref.polyfit_coefficients, rtol=1e-7)
    assert ds.attrs["batchfit_dim"] == "time"
    assert '"x_unit": "nanoseconds since 1970-01-01"' in ds.attrs["batchfit"]


def test_nans_are_skipped_and_an_empty_series_says_so():
    da = decay_stack(seed=2).copy()
    da[0, 0, [1, 5]] = np.nan
    da[1, 2, :] = np.nan
    ds = bx.fit(da, "t", model="exp", dtype="float64", compile=False)
    ref = curvefit_decay(da)
    assert int(ds.n_points[0, 0]) == 10 and int(ds.n_points[1, 2]) == 0
    assert ds.status.attrs["flag_meanings"].split()[int(ds.status[1, 2])] == "too_few_points"
    assert np.isnan(ds.curvefit_coefficients[1, 2]).all()
    fitted = np.isfinite(ref.curvefit_coefficients.values)
    np.testing.assert_allclose(ds.curvefit_coefficients.values[fitted],
                               ref.curvefit_coefficients.values[fitted], rtol=1e-6, atol=1e-8)


def test_dask_input_stays_lazy_fits_block_by_block_and_matches_memory(monkeypatch):
    dask_array = pytest.importorskip("dask.array")
    da = decay_stack(seed=3)
    reads, fits = [], []

    def read(block):
        reads.append(block.shape)
        return block

    def counted(*args, **kwargs):
        fits.append(args[1].shape[0])
        return batchfit.fit(*args, **kwargs)

    # chunked along the fitted dim too: each block is rechunked to whole series
    lazy = da.copy(data=dask_array.from_array(da.values, chunks=(3, 5, 6)).map_blocks(
        read, meta=np.array((), dtype=float)))
    monkeypatch.setattr(stacks, "fit_arrays", counted)
    ds = bx.fit(lazy, "t", model="exp", compile=False)
    assert reads == [] and fits == []
    assert isinstance(ds.curvefit_coefficients.data, dask_array.Array)
    computed = ds.compute()
    assert len(reads) == 4 and fits == [15, 15]  # each block read once and fitted once
    xr.testing.assert_identical(computed, bx.fit(da, "t", model="exp", compile=False))


def test_weights_and_a_coordinate_that_is_not_a_dimension():
    da = decay_stack(seed=4).rename(t="echo").assign_coords(te=("echo", 10.0 * T))
    weights = xr.DataArray(np.linspace(1.0, 2.0, 12), dims="echo")
    ds = bx.fit(da, "te", model="exp", weights=weights, dtype="float64", compile=False)
    ref = batchfit.fit(10.0 * T, da.values, np.broadcast_to(weights.values, da.shape),
                       model="exp", dtype="float64", compile=False)
    np.testing.assert_allclose(ds.curvefit_coefficients.values, ref.params.numpy(), rtol=1e-12)
    assert ds.attrs["batchfit_dim"] == "echo"


def test_a_single_series_and_integer_data():
    da = decay_stack(seed=5)
    one = bx.fit(da[0, 0], "t", model="exp", dtype="float64", compile=False)
    assert one.curvefit_coefficients.dims == ("param",) and one.status.dims == ()
    whole = bx.fit(da, "t", model="exp", dtype="float64", compile=False)
    xr.testing.assert_identical(one.curvefit_coefficients, whole.curvefit_coefficients[0, 0])
    counts = (100 * da).round().astype(np.int32)
    np.testing.assert_allclose(bx.fit(counts, "t").curvefit_coefficients.values,
                               bx.fit(counts.astype(float), "t").curvefit_coefficients.values)


@pytest.mark.parametrize(("call", "message"), [
    (lambda da: bx.fit(da, "time"), "dim 'time' is not a dimension or coordinate of da"),
    (lambda da: bx.fit(da.assign_coords(grid=(("y", "x"), np.zeros((6, 5)))), "grid"),
     "must be a dimension or a 1-D coordinate"),
    (lambda da: bx.fit(da.assign_coords(t=[f"e{i}" for i in range(12)]), "t"),
     "must be numbers or datetimes"),
    (lambda da: bx.fit(da.values, "t"), "da must be an xarray.DataArray"),
    (lambda da: bx.fit(da, "t", model="exp", style="polyfit"), "style 'polyfit' is for"),
    (lambda da: bx.fit(da, "t", style="numpy"), "style must be one of"),
    (lambda da: bx.fit(da, "t", weights=np.ones(12)), "weights must be an xarray.DataArray"),
    (lambda da: bx.fit(da, "t", mask=np.ones(12, bool)), "mask comes from da and dim"),
    (lambda da: bx.fit(da, "t", degree=-1), "degree"),
    (lambda da: bx.fit(da, "t", model=["exp", "biexp"]), "takes one model"),
])
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(decay_stack())
    assert "\n" not in str(error.value)


def test_batchfit_imports_without_xarray_and_batchfit_xarray_names_the_extra():
    script = ("import sys\nsys.modules['xarray'] = None\nimport batchfit\n"
              "assert batchfit.__version__\n"
              "try:\n    import batchfit.xarray\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "pip install 'batchfit[xarray]'" in done.stdout


def test_import_xarray_inside_batchfit_finds_the_xarray_package():
    assert stacks.xr.__name__ == "xarray" and hasattr(stacks.xr, "DataArray")
    assert bx.__name__ == "batchfit.xarray" and stacks.xr is not bx
