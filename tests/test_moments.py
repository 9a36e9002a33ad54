"""The MSE job as an aggregation (issue 12): mergeable per-series moments, gathered by the
native kernel or its torch twin, wherever a series' points are; checked against float64
numpy.polyfit, exact rational least squares, and each other."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from zoo import assert_same_fits, load_benchmark

import batchfit
from batchfit import io
from batchfit.app.cli import main
from batchfit.app.generate import generate
from batchfit.fitting.moment_twin import TorchAggregator, merge_tables
from batchfit.moments import layout, native

cond = load_benchmark("conditioning")


def polyfit(x, y, degree, w=None):
    """float64 numpy.polyfit, highest power first as batchfit (``w`` batchfit weights)."""
    return np.polyfit(x, y, degree, w=None if w is None else np.sqrt(w))


def scattered(rng, series=300, degree=2, weights=False, offset=0.0, span=1.0):
    """Long-format points of ``series`` series of 3-40 points each, in random order."""
    rows = []
    truth = {}
    for sid in range(series):
        n = int(rng.integers(3, 41))
        x = offset + span * rng.uniform(0, 1, n)
        t = (x - offset) / span
        coef = rng.normal(0, 3, degree + 1)
        y = sum(c * t**j for j, c in enumerate(coef)) + rng.normal(0, 0.1, n)
        w = rng.uniform(0.5, 2.0, n) if weights else None
        truth[sid] = (x, y, w)
        rows += [(sid, *values) for values in zip(x, y, *(() if w is None else (w,)))]
    order = rng.permutation(len(rows))
    columns = list(zip(*[rows[i] for i in order]))
    table = {"series_id": np.array(columns[0]), "x": np.array(columns[1]),
             "y": np.array(columns[2])}
    if weights:
        table["weight"] = np.array(columns[3])
    return pa.table(table), truth


def solutions(table: np.ndarray, degree: int, weighted: bool) -> np.ndarray:
    return native.solve(table, degree, weighted)["params"]


@pytest.mark.parametrize("degree", [0, 1, 2, 4])
@pytest.mark.parametrize("weights", [False, True])
def test_native_and_torch_aggregators_agree_with_polyfit(rng, degree, weights):
    table, truth = scattered(rng, series=200, degree=degree, weights=weights)
    codes = table["series_id"].to_numpy()
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    w = table["weight"].to_numpy() if weights else None
    results = []
    for make in (lambda: native.Aggregator(degree, weights, True, rows=200),
                 lambda: TorchAggregator(degree, weights, "cpu", rows=200)):
        agg = make()
        for part in np.array_split(np.arange(len(codes)), 7):  # several batches
            agg.add(codes[part], x[part], y[part], None if w is None else w[part])
        results.append(solutions(np.asarray(agg.finish(200)), degree, weights))
    sizes = np.array([len(truth[s][0]) for s in range(200)])
    fitted = np.flatnonzero(sizes > degree + 1)  # (polyfit has no answer for fewer points)
    want = np.array([polyfit(truth[s][0], truth[s][1], degree, truth[s][2]) for s in fitted])
    for got in results:
        assert np.isnan(got[sizes < degree + 1]).all()
        scale = np.abs(want).max(1, keepdims=True)
        assert np.all(np.abs(got[fitted] - want) <= 1e-9 * scale)


def test_tables_of_parts_merge_into_the_whole(rng):
    """Moments of the two halves of every series, gathered apart in different frames, merge
    (native and torch) into the moments of the whole."""
    table, truth = scattered(rng, series=150, weights=True)
    codes, x, y, w = (table[c].to_numpy() for c in ("series_id", "x", "y", "weight"))
    halves = []
    for part in (np.arange(len(codes)) % 2 == 0, np.arange(len(codes)) % 2 == 1):
        agg = native.Aggregator(2, True, True, rows=150)
        agg.add(codes[part], x[part], y[part], w[part])
        halves.append(np.array(agg.finish(150)))
    merged = halves[0].copy()
    native.merge(merged, halves[1], 2, True)
    twin = merge_tables(torch.from_numpy(halves[0]), torch.from_numpy(halves[1]), 2, True)
    want = np.array([polyfit(truth[s][0], truth[s][1], 2, truth[s][2]) for s in range(150)])
    for table_ in (merged, twin.numpy()):
        got = solutions(table_, 2, True)
        assert np.all(np.abs(got - want) <= 1e-9 * np.abs(want).max(1, keepdims=True))
        np.testing.assert_array_equal(table_[:, layout.NPTS],
                                      [len(truth[s][0]) for s in range(150)])


@pytest.mark.parametrize("make_id", [lambda i: i, lambda i: f"sensor-{i:04d}",
                                     lambda i: i * 7_919_003 - 11])  # dense, strings, sparse
def test_a_series_spread_over_every_file_and_row_group(tmp_path, rng, make_id):
    table, truth = scattered(rng, series=120)
    ids = pa.array([make_id(int(i)) for i in table["series_id"].to_numpy()])
    table = table.set_column(0, "series_id", ids)
    (tmp_path / "parts").mkdir()
    for i, rows in enumerate(np.array_split(np.arange(table.num_rows), 4)):  # every series in
        pq.write_table(table.take(rows), tmp_path / "parts" / f"{i}.parquet",  # every file
                       row_group_size=97)
    sorted_table = table.take(np.argsort(table["series_id"].to_numpy(zero_copy_only=False),
                                         kind="stable"))
    pq.write_table(sorted_table, tmp_path / "sorted.parquet")
    summary = batchfit.run_job(str(tmp_path / "parts"), str(tmp_path / "a.parquet"))
    assert not summary.grouped and summary.n_series == 120
    batchfit.run_job(str(tmp_path / "sorted.parquet"), str(tmp_path / "b.parquet"))
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert_same_fits(a, b)
    for row in a.to_pylist():
        sid = next(k for k in truth if make_id(k) == row["series_id"])
        want = polyfit(*truth[sid][:2], 2)
        got = np.array([row["a"], row["b"], row["c"]])
        assert np.all(np.abs(got - want) <= 1e-9 * np.abs(want).max())


def test_the_aggregation_agrees_with_the_points_path(tmp_path, rng):
    """The job's moments (input order, any layout) against fit_table's per-series fits
    (canonical point order) and against newton, which fits on the points."""
    generate(str(tmp_path / "d.parquet"), series=500, points=30, min_points=3, max_points=60,
             x_kind="uniform")
    batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "job.parquet"))
    job = pq.read_table(tmp_path / "job.parquet")
    in_memory = batchfit.fit_table(pq.read_table(tmp_path / "d.parquet"))
    assert_same_fits(job, in_memory.replace_schema_metadata(job.schema.metadata))
    batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "newton.parquet"),
                     solver="newton", dtype="float64")
    newton = pq.read_table(tmp_path / "newton.parquet")
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(newton[name].to_numpy(), job[name].to_numpy(), rtol=1e-7,
                                   atol=1e-7)


def test_default_coefficients_are_float64_grade(tmp_path):
    """float32 data, default options (dtype float32): the coefficients agree with float64
    polyfit of the same (float32) points to 1e-9 relative; x in [0, 1]."""
    generate(str(tmp_path / "d.parquet"), series=2000, points=100, x_kind="uniform")
    assert main(["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet")]) == 0
    data, out = pq.read_table(tmp_path / "d.parquet"), pq.read_table(tmp_path / "o.parquet")
    x = data["x"].to_numpy().astype(np.float64).reshape(2000, 100)
    y = data["y"].to_numpy().astype(np.float64).reshape(2000, 100)
    want = np.array([np.polyfit(x[i], y[i], 2) for i in range(2000)])
    got = np.stack([out[c].to_numpy() for c in ("a", "b", "c")], 1)
    assert np.max(np.abs(got - want).max(1) / np.abs(want).max(1)) < 1e-9
    fitted = batchfit.fit(x.astype(np.float32), y.astype(np.float32))  # the Python API too
    assert np.max(np.abs(fitted.params.numpy() - want).max(1)
                  / np.abs(want).max(1)) < 1e-9


def test_unix_timestamps_keep_their_digits(tmp_path):
    """x = Unix seconds over a day (float64): the raw coefficients against exact rational
    least squares keep at least the 6.6 digits of the float32 solver before (and ~8 here)."""
    rng = np.random.default_rng(4)
    x = 1.7e9 + np.sort(rng.uniform(0, 86400, (12, 80)), axis=1)
    t = (x - 1.7e9) / 86400
    y = 20 + 3 * t - 5 * t**2 + rng.normal(0, 0.1, x.shape)
    pq.write_table(pa.table({"series_id": np.repeat(np.arange(12), 80), "x": x.ravel(),
                             "y": y.ravel()}), tmp_path / "t.parquet")
    assert main(["run", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "o.parquet")]) == 0
    out = pq.read_table(tmp_path / "o.parquet")
    got = np.stack([out[c].to_numpy() for c in ("a", "b", "c")], 1)
    digits = [cond.coef_digits(got[i], cond.oracle(x[i], y[i], 2).coef) for i in range(12)]
    assert min(digits) >= 6.6, digits
    fitted = batchfit.fit(x, y)
    digits = [cond.coef_digits(fitted.params[i].numpy(), cond.oracle(x[i], y[i], 2).coef)
              for i in range(12)]
    assert min(digits) >= 6.6, digits


def test_sums_that_lose_digits_are_refined_on_a_second_pass(tmp_path, rng):
    """Nearly exact data (a residual far below the spread) and clustered x (small Cholesky
    pivots): the first pass's sums cannot give the residual or the solution to float64
    accuracy; a second pass over those series' points refines them."""
    x = np.concatenate([np.full(20, 1.0), np.full(20, 1.001), [5.0]])  # clustered
    series = {0: (x, 3 - x + 0.5 * x**2 + rng.normal(0, 1e-9, x.size)),  # nearly exact
              1: (x, 1 + 2 * x + rng.normal(0, 0.1, x.size))}
    ids = np.repeat([0, 1], x.size)
    points = np.concatenate([series[0][0], series[1][0]])
    values = np.concatenate([series[0][1], series[1][1]])
    order = rng.permutation(len(ids))  # scattered too
    pq.write_table(pa.table({"series_id": ids[order], "x": points[order],
                             "y": values[order]}), tmp_path / "d.parquet")
    assert main(["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet")]) == 0
    for row in pq.read_table(tmp_path / "o.parquet").to_pylist():
        ref = cond.oracle(*series[row["series_id"]], 2)
        got = [row["a"], row["b"], row["c"]]
        assert cond.coef_digits(got, ref.coef) >= 8
        exact_loss = float(ref.sse) / x.size
        np.testing.assert_allclose(row["loss"], exact_loss, rtol=1e-6)


def test_list_format_series_without_points_and_weights(tmp_path, rng):
    x = [[0.0, 1.0, 2.0, 3.0], [], None, [0.0, 1.0, 2.0]]
    y = [[1.0, 2.0, 5.0, 10.0], [], [1.0], [1.0, 2.0, np.nan]]
    w = [[1.0, 2.0, 1.0, 0.5], [], [1.0], [1.0, 1.0, 1.0]]
    pq.write_table(pa.table({"series_id": ["a", "b", "c", "d"],
                             "x": pa.array(x, pa.list_(pa.float64())),
                             "y": pa.array(y, pa.list_(pa.float64())),
                             "weight": pa.array(w, pa.list_(pa.float64()))}),
                   tmp_path / "l.parquet")
    assert main(["run", str(tmp_path / "l.parquet"), "-o", str(tmp_path / "o.parquet")]) == 0
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [r["series_id"] for r in rows] == ["a", "b", "c", "d"]  # input order (grouped)
    assert [r["n_points"] for r in rows] == [4, 0, 0, 2]
    assert [r["status"] for r in rows] == ["ok", "too_few_points", "too_few_points",
                                           "too_few_points"]
    want = polyfit(np.array(x[0]), np.array(y[0]), 2, np.array(w[0]))
    np.testing.assert_allclose([rows[0]["a"], rows[0]["b"], rows[0]["c"]], want, rtol=1e-12,
                               atol=1e-12 * np.abs(want).max())


def test_big_row_groups_are_read_in_pieces(tmp_path, rng):
    table, _truth = scattered(rng, series=60)
    pq.write_table(table, tmp_path / "d.parquet")  # one row group
    dataset = io.Dataset(str(tmp_path / "d.parquet"), io.ColumnSpec())
    codes = dataset.series_codes()
    batches = list(dataset.batches(codes, workers=2, rows=97))
    assert len(batches) == -(-table.num_rows // 97)
    assert [b.index for b in batches] == list(range(len(batches)))
    np.testing.assert_array_equal(np.concatenate([b.x for b in batches]), table["x"].to_numpy())
    again = list(dataset.batches(codes, workers=2, rows=97, start=5))  # resuming: skip 5
    assert [b.index for b in again] == list(range(5, len(batches)))


def test_resume_of_an_aggregation_gives_the_same_bytes(tmp_path, rng, monkeypatch):
    """An MSE job killed after some checkpoints of its statistics continues from there."""
    table, _ = scattered(rng, series=400)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=50)  # many batches
    monkeypatch.setattr(batchfit.pipeline.job, "CHECKPOINT_BATCHES", 20)
    args = ["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet"), "--resume"]
    assert main(args) == 0
    reference = (tmp_path / "o.parquet").read_bytes()
    (tmp_path / "o.parquet").unlink()
    saves, real = [], io.Checkpoint.save_statistics

    def interrupted(self, aggregator, codes, batches):
        real(self, aggregator, codes, batches)
        saves.append(batches)
        if len(saves) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, after the third checkpoint

    monkeypatch.setattr(io.Checkpoint, "save_statistics", interrupted)
    assert main(args) == 130 and not (tmp_path / "o.parquet").exists()
    monkeypatch.setattr(io.Checkpoint, "save_statistics", real)
    read = []
    real_batches = io.Dataset.batches

    def counted(self, codes, **options):
        read.append(options.get("start", 0))
        return real_batches(self, codes, **options)

    monkeypatch.setattr(io.Dataset, "batches", counted)
    assert main(args) == 0
    assert read[0] == 60  # continued after the third checkpoint, without re-reading
    assert (tmp_path / "o.parquet").read_bytes() == reference
    assert not (tmp_path / ".o.parquet.resume").exists()


def test_the_mse_job_runs_without_torch(tmp_path):
    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    code = ("import sys; from batchfit.app.cli import main; "
            f"assert main(['run', {str(tmp_path / 'd.parquet')!r}, '--no-progress']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
