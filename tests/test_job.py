"""The Parquet job end to end: batchfit run / generate, in-process and as a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from zoo import assert_same_fits, polyfit_rows

import batchfit
from batchfit.app.cli import main
from batchfit.app.generate import generate
from batchfit.io import read_history, read_metadata

OUTPUT_COLUMNS = ["series_id", "a", "b", "c", "a_stderr", "b_stderr", "c_stderr",
                  "x_centre", "x_scale", "a_frame", "b_frame", "c_frame", "n_points",
                  "loss", "rmse", "r2", "iterations", "status"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def long_table(rng, n_series=30, ids=None, ragged=True):
    """Long-format points with known per-series polynomials; returns (table, {id: (x, y)})."""
    ids = list(range(n_series)) if ids is None else ids
    rows, series = [], {}
    for sid in ids:
        n = int(rng.integers(3, 40)) if ragged else 25
        x = rng.uniform(-2, 3, n)
        y = rng.normal(0, 3) * x**2 + rng.normal(0, 3) * x + rng.normal() + rng.normal(0, .1, n)
        series[sid] = (x, y)
        rows += [(sid, xi, yi) for xi, yi in zip(x, y)]
    sid, x, y = zip(*rows)
    return pa.table({"series_id": list(sid), "x": np.array(x), "y": np.array(y)}), series


def check_against_polyfit(path, series, rtol=1e-7):
    out = pq.read_table(path).to_pylist()
    assert len(out) == len(series) and len({r["series_id"] for r in out}) == len(series)
    for row in out:
        x, y = series[row["series_id"]]
        want = np.polyfit(x, y, 2)
        got = np.array([row["a"], row["b"], row["c"]])
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
        assert row["n_points"] == len(x) and row["status"] == "ok"


def test_long_format_round_trip_matches_polyfit(tmp_path, rng):
    table, series = long_table(rng)
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "--dtype", "float64", "--no-progress") == 0
    out = tmp_path / "d.coeffs.parquet"  # the default output name
    assert pq.read_schema(out).names == OUTPUT_COLUMNS
    check_against_polyfit(out, series)
    meta = read_metadata(out)
    assert meta["solver"] == "exact" and meta["loss"] == "mse" and meta["degree"] == 2
    assert meta["dtype"] == "float64" and meta["device"] == "cpu" and meta["format"] == "long"
    assert meta["version"] == batchfit.__version__ and "options" in meta
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_string_ids_keep_their_type(tmp_path, rng):
    ids = [f"sensor-{i:03d}" for i in range(12)]
    table, series = long_table(rng, ids=ids)
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet",
                   "--dtype", "float64") == 0
    assert pq.read_schema(tmp_path / "o.parquet").field("series_id").type == pa.string()
    check_against_polyfit(tmp_path / "o.parquet", series)


@pytest.mark.parametrize("id_type", [pa.int32(), pa.uint16(), pa.large_string()])
def test_other_id_types_come_back_unchanged(tmp_path, rng, id_type):
    table, _ = long_table(rng, n_series=5)
    ids = table["series_id"].cast(pa.string() if pa.types.is_large_string(id_type) else id_type)
    table = table.set_column(0, "series_id", ids.cast(id_type))
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet") == 0
    assert pq.read_schema(tmp_path / "o.parquet").field("series_id").type == id_type


def test_shuffled_multifile_directory_equals_sorted_file(tmp_path, rng):
    generate(str(tmp_path / "sorted.parquet"), series=400, points=30, min_points=5,
             max_points=40, x_kind="uniform")
    table = pq.read_table(tmp_path / "sorted.parquet")
    shuffled = table.take(rng.permutation(table.num_rows))
    (tmp_path / "parts").mkdir()
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), 3)):
        pq.write_table(shuffled.take(part), tmp_path / "parts" / f"part-{i}.parquet",
                       row_group_size=1000)
    (tmp_path / "parts" / "_SUCCESS").write_text("")  # not Parquet: ignored
    assert run_cli("run", tmp_path / "sorted.parquet", "-o", tmp_path / "a.parquet") == 0
    assert run_cli("run", tmp_path / "parts", "-o", tmp_path / "b.parquet",
                   "--batch-size", "77") == 0
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert_same_fits(a, b)  # same rows, same order, the same numbers to float64 rounding
    assert a.num_rows == 400


def test_series_split_across_row_groups_and_files_is_fitted_whole(tmp_path, rng):
    table, series = long_table(rng, n_series=6, ragged=False)
    (tmp_path / "d").mkdir()
    pq.write_table(table.slice(0, 60), tmp_path / "d" / "0.parquet", row_group_size=7)
    pq.write_table(table.slice(60), tmp_path / "d" / "1.parquet", row_group_size=11)
    assert run_cli("run", tmp_path / "d", "-o", tmp_path / "o.parquet",
                   "--dtype", "float64") == 0
    check_against_polyfit(tmp_path / "o.parquet", series)


def test_list_format_round_trip(tmp_path, rng):
    _, series = long_table(rng, n_series=20)
    ids = list(series)
    table = pa.table({"series_id": ids,
                      "x": [series[i][0].tolist() for i in ids],
                      "y": [series[i][1].tolist() for i in ids]})
    pq.write_table(table, tmp_path / "l.parquet")
    assert run_cli("run", tmp_path / "l.parquet", "-o", tmp_path / "o.parquet",
                   "--dtype", "float64") == 0
    check_against_polyfit(tmp_path / "o.parquet", series)
    assert read_metadata(tmp_path / "o.parquet")["format"] == "list"


def test_generated_list_and_long_give_the_same_fits(tmp_path):
    generate(str(tmp_path / "long.parquet"), series=300, points=50)
    generate(str(tmp_path / "list.parquet"), series=300, points=50, fmt="list")
    assert run_cli("run", tmp_path / "long.parquet", "-o", tmp_path / "a.parquet") == 0
    assert run_cli("run", tmp_path / "list.parquet", "-o", tmp_path / "b.parquet") == 0
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert_same_fits(a, b)


def test_weights_nulls_and_nans(tmp_path, rng):
    table, _ = long_table(rng, n_series=10, ragged=False)
    w = rng.uniform(0.5, 2.0, table.num_rows)
    y = table["y"].to_numpy().copy()
    y[[3, 40]] = np.nan
    y_arrow = pa.array(y, from_pandas=False).to_pylist()
    y_arrow[77] = None  # a null point
    table = table.set_column(2, "y", pa.array(y_arrow, pa.float64())).append_column(
        "weight", pa.array(w))
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet",
                   "--dtype", "float64") == 0
    out = {r["series_id"]: r for r in pq.read_table(tmp_path / "o.parquet").to_pylist()}
    sid = table["series_id"].to_numpy()
    yy = np.array([np.nan if v is None else v for v in y_arrow])
    for s in range(10):
        keep = (sid == s) & np.isfinite(yy)
        want, _ = polyfit_rows(table["x"].to_numpy()[keep][None], yy[keep][None], 2, w=w[keep][None])
        got = [out[s]["a"], out[s]["b"], out[s]["c"]]
        np.testing.assert_allclose(got, want[0], rtol=1e-8)
        assert out[s]["n_points"] == keep.sum()


def test_degenerate_series_get_statuses_and_nulls(tmp_path):
    table = pa.table({"series_id": [1, 1, 2, 2, 2, 3, 3, 3],
                      "x": [0.0, 1.0, 5.0, 5.0, 5.0, 0.0, 1.0, 2.0],
                      "y": [1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 4.0, 9.0]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet") == 0
    out = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [r["status"] for r in out] == ["too_few_points", "singular", "ok"]
    assert out[0]["a"] is None and out[1]["a_stderr"] is None
    assert out[2]["a_stderr"] is None  # 3 points, 3 coefficients: no residual dof
    np.testing.assert_allclose([out[2]["a"], out[2]["b"], out[2]["c"]], [1, 2, 1], atol=1e-4)


def test_robust_loss_and_degree_options(tmp_path):
    generate(str(tmp_path / "d.parquet"), series=50, points=40, outliers=0.1, degree=3)
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet", "--degree", "3",
                   "--loss", "huber", "--f-scale", "2") == 0
    schema = pq.read_schema(tmp_path / "o.parquet")
    assert schema.names[1:5] == ["p3", "p2", "p1", "p0"] and "p3_stderr" in schema.names
    assert schema.names[9:15] == ["x_centre", "x_scale", "p3_frame", "p2_frame", "p1_frame",
                                  "p0_frame"]
    meta = read_metadata(tmp_path / "o.parquet")
    assert meta["solver"] == "newton" and meta["loss"] == "huber"
    out = pq.read_table(tmp_path / "o.parquet")
    truth = pq.read_table(tmp_path / "d.truth.parquet")
    z = np.abs(out["p3"].to_numpy() - truth["p3"].to_numpy()) / out["p3_stderr"].to_numpy()
    assert np.median(z) < 1.5  # errors on the scale of the reported standard errors


def test_summary_line_and_progress(tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=100, points=10)
    assert run_cli("run", tmp_path / "d.parquet") == 0
    err = capsys.readouterr().err
    assert "fitted 100 series (ok 100) from 1,000 points in" in err and "series/s" in err
    assert f"wrote {tmp_path / 'd.coeffs.parquet'}" in err
    seen = []
    summary = batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "o.parquet"),
                               batch_size=30, progress=lambda done, total: seen.append(done))
    steps = np.diff([0] + seen)
    assert seen[-1] == 100 and (steps > 0).all() and (steps <= 30).all()
    assert summary.n_series == 100
    assert summary.status_counts == {"ok": 100} and summary.grouped


def test_fit_table_in_memory(rng):
    table, series = long_table(rng, n_series=8)
    out = batchfit.fit_table(table.take(rng.permutation(table.num_rows)), dtype="float64")
    assert sorted(out["series_id"].to_pylist()) == list(range(8))
    for row in out.to_pylist():
        np.testing.assert_allclose([row["a"], row["b"], row["c"]],
                                   np.polyfit(*series[row["series_id"]], 2), rtol=1e-7)


# ---------------------------------------------------------------- bad input


def bad(tmp_path, args, message, capsys):
    """Exit code 2, the one-line message, no traceback, and no output file."""
    out = tmp_path / "out.parquet"
    code = run_cli(*args, "-o", out) if args[0] == "run" else run_cli(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


@pytest.fixture
def good(tmp_path):
    generate(str(tmp_path / "good.parquet"), series=20, points=10)
    return tmp_path / "good.parquet"


def test_missing_path(tmp_path, capsys):
    bad(tmp_path, ["run", tmp_path / "nope.parquet"], "input not found", capsys)


def test_directory_without_parquet(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    bad(tmp_path, ["run", tmp_path / "empty"], "no Parquet files", capsys)


def test_not_parquet(tmp_path, capsys):
    (tmp_path / "fake.parquet").write_text("series_id,x,y\n1,2,3\n")
    bad(tmp_path, ["run", tmp_path / "fake.parquet"], "cannot read", capsys)


def test_missing_column_is_named(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": [1], "t": [0.0], "y": [1.0]}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"],
        "missing column 'x' in", capsys)
    pq.write_table(pa.table({"series_id": [1], "t": [0.0], "y": [1.0]}), tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "--x-col", "t", "-o", tmp_path / "o.parquet") == 0


def test_missing_column_lists_present_ones(tmp_path, capsys):
    pq.write_table(pa.table({"id": [1], "x": [0.0], "y": [1.0]}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "(columns present: id, x, y)", capsys)


def test_explicit_weight_column_must_exist(tmp_path, good, capsys):
    bad(tmp_path, ["run", good, "--weight-col", "w"], "missing column 'w'", capsys)


def test_non_numeric_column(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": [1, 1], "x": ["a", "b"], "y": [1.0, 2.0]}),
                   tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "column 'x' must be numeric", capsys)


def test_list_lengths_differ(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": ["a", "b"], "x": [[1.0, 2.0], [1.0, 2.0, 3.0]],
                             "y": [[1.0, 2.0], [1.0, 2.0]]}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "series 'b': 'x' has 3 values but 'y' has 2",
        capsys)


def test_empty_dataset(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": pa.array([], pa.int64()), "x": pa.array([], pa.float64()),
                             "y": pa.array([], pa.float64())}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "empty input", capsys)


@pytest.mark.parametrize("args,message", [
    (["--epochs", "-3", "--solver", "gd"], "epochs must be >= 0"),
    (["--loss", "l3"], "invalid choice: 'l3'"),
    (["--f-scale", "0"], "--f-scale must be > 0"),
    (["--degree", "12"], "degree must be at most 10"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--lr", "abc"], "invalid float value"),
    (["--format", "list"], "--format list does not match column 'x'"),
])
def test_bad_option_values(tmp_path, good, capsys, args, message):
    bad(tmp_path, ["run", good, *args], message, capsys)


def test_cuda_without_gpu(tmp_path, good, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bad(tmp_path, ["run", good, "--device", "cuda"], "no CUDA GPU", capsys)


def test_unwritable_output_directory(tmp_path, good, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the check see a locked dir
        real_access = os.access
        monkeypatch.setattr("batchfit.io.write.os.access",
                            lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    try:
        code = run_cli("run", good, "-o", locked / "o.parquet")
        assert code == 2 and "output directory is not writable" in capsys.readouterr().err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_missing_output_directory(tmp_path, good, capsys):
    code = run_cli("run", good, "-o", tmp_path / "no" / "o.parquet")
    assert code == 2 and "output directory does not exist" in capsys.readouterr().err


def test_failed_run_leaves_existing_output_untouched(tmp_path, good, capsys):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    pq.write_table(pa.table({"series_id": [1], "x": ["a"], "y": [1.0]}), tmp_path / "bad.parquet")
    assert run_cli("run", tmp_path / "bad.parquet", "-o", out) == 2
    assert out.read_bytes() == b"precious"
    assert run_cli("run", good, "-o", out) == 0  # and a good run replaces it
    assert pq.read_table(out).num_rows == 20


@pytest.mark.parametrize("solver", ["exact", "newton"])  # the aggregation and the chunks
def test_failure_mid_run_removes_the_temporary_file(tmp_path, monkeypatch, solver):
    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    calls = []
    real = batchfit.io.result_table

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom in the middle")
        return real(*args)

    monkeypatch.setattr(batchfit.io, "result_table", failing)
    with pytest.raises(ValueError, match="boom"):
        batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "o.parquet"), batch_size=20,
                         solver=solver)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "d.truth.parquet"]


def test_generate_bad_options(tmp_path, capsys):
    bad(tmp_path, ["generate", tmp_path / "g.parquet", "--noise", "-1"], "--noise must be",
        capsys)
    bad(tmp_path, ["generate", tmp_path / "g.parquet", "--min-points", "9", "--max-points", "3"],
        "--min-points", capsys)


def test_generate_truth_and_ragged(tmp_path):
    info = generate(str(tmp_path / "g.parquet"), series=250_000 // 1000, points=20,
                    min_points=1, max_points=30, seed=7)
    data, truth = pq.read_table(info["path"]), pq.read_table(info["truth"])
    assert truth.num_rows == 250 and truth.column_names == ["series_id", "a", "b", "c",
                                                            "n_points", "noise"]
    counts = np.bincount(data["series_id"].to_numpy(), minlength=250)
    np.testing.assert_array_equal(counts, truth["n_points"].to_numpy())
    assert counts.min() >= 1 and counts.max() <= 30
    again = pq.read_table(generate(str(tmp_path / "h.parquet"), series=250, points=20,
                                   min_points=1, max_points=30, seed=7)["path"])
    assert data.equals(again)  # reproducible


def test_cli_as_a_subprocess(tmp_path):
    def batchfit_cli(*args):
        return subprocess.run([sys.executable, "-m", "batchfit", *map(str, args)],
                              capture_output=True, text=True, check=False)

    gen = batchfit_cli("generate", tmp_path / "d.parquet", "--series", 200, "--points", 20)
    assert gen.returncode == 0, gen.stderr
    run = batchfit_cli("run", tmp_path / "d.parquet")
    assert run.returncode == 0, run.stderr
    assert "fitted 200 series (ok 200)" in run.stderr and run.stdout == ""
    missing = batchfit_cli("run", tmp_path / "x")
    assert missing.returncode == 2
    assert missing.stderr == f"batchfit: error: input not found: {tmp_path / 'x'}\n"


@pytest.mark.parametrize("make_id", [lambda i: f"s{i:05d}", lambda i: i * 1_000_003 - 7])
def test_shuffled_string_and_sparse_ids_gather_whole_series(tmp_path, rng, make_id):
    table, series = long_table(rng, n_series=300, ids=[make_id(i) for i in range(300)])
    pq.write_table(table, tmp_path / "sorted.parquet")
    shuffled = table.take(rng.permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "shuffled.parquet", row_group_size=500)
    summary = batchfit.run_job(str(tmp_path / "shuffled.parquet"), str(tmp_path / "b.parquet"),
                               dtype="float64")
    assert not summary.grouped
    batchfit.run_job(str(tmp_path / "sorted.parquet"), str(tmp_path / "a.parquet"),
                     dtype="float64")
    assert_same_fits(pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet"))
    check_against_polyfit(tmp_path / "b.parquet", series)


def test_negative_weight(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": [1, 1, 1], "x": [0.0, 1.0, 2.0], "y": [1.0, 2.0, 3.0],
                             "weight": [1.0, -1.0, 1.0]}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "weights must be >= 0", capsys)


def test_null_ids(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": [1, None], "x": [0.0, 1.0], "y": [1.0, 2.0]}),
                   tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "has null ids", capsys)


def test_repeated_ids_in_list_format(tmp_path, capsys):
    pq.write_table(pa.table({"series_id": [1, 1], "x": [[0.0, 1.0], [2.0]], "y": [[1.0, 2.0], [3.0]]}),
                   tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "series ids repeat in list format", capsys)


def test_duplicate_column_names(tmp_path, capsys):
    table = pa.Table.from_arrays([pa.array([1]), pa.array([0.0]), pa.array([1.0]), pa.array([2.0])],
                                 names=["series_id", "x", "y", "y"])
    pq.write_table(table, tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "duplicate column names: y", capsys)


def test_gd_job_is_independent_of_batching_and_row_order(tmp_path, rng):
    """Random initial values follow a series' position, not its batch: same numbers."""
    generate(str(tmp_path / "d.parquet"), series=120, points=12, min_points=8, max_points=14)
    table = pq.read_table(tmp_path / "d.parquet")
    pq.write_table(table.take(rng.permutation(table.num_rows)), tmp_path / "s.parquet")
    common = dict(solver="gd", lr=0.05, epochs=60, compile=False)
    batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "a.parquet"),
                     history_path=str(tmp_path / "ha.parquet"), **common)
    batchfit.run_job(str(tmp_path / "s.parquet"), str(tmp_path / "b.parquet"), batch_size=17,
                     history_path=str(tmp_path / "hb.parquet"), **common)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    ha, hb = read_history(tmp_path / "ha.parquet"), read_history(tmp_path / "hb.parquet")
    tracked = [c for c in ha[0].column_names if c.startswith("loss_series_")]
    assert len(tracked) == 5 and tracked == [c for c in hb[0].column_names
                                             if c.startswith("loss_series_")]
    assert ha[0].select(["epoch", *tracked]).equals(hb[0].select(["epoch", *tracked]))
    assert ha[1]["tracked"] == hb[1]["tracked"]


def test_history_file(tmp_path):
    generate(str(tmp_path / "d.parquet"), series=300, points=20)
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet", "--solver",
                   "adam", "--lr", "0.05", "--epochs", "600", "--history", tmp_path / "h.parquet",
                   "--track-ids", "3,7,299") == 0
    table, meta = read_history(tmp_path / "h.parquet")
    assert table.column_names == ["epoch", "loss_p05", "loss_p25", "loss_median", "loss_p75",
                                  "loss_p95", "loss_series_3", "loss_series_7",
                                  "loss_series_299"]
    epochs = table["epoch"].to_numpy()
    assert epochs[0] == 0 and epochs[-1] == 600 and (np.diff(epochs) > 0).all()
    assert [t["series_id"] for t in meta["tracked"]] == [3, 7, 299]
    assert set(meta["tracked"][0]["initial"]) == {"a", "b", "c"}
    median = table["loss_median"].to_numpy()
    assert median[-1] < median[0] and meta["solver"] == "adam" and meta["sampled_series"] == 300
    q = np.stack([table[c].to_numpy() for c in ["loss_p05", "loss_p25", "loss_median",
                                                 "loss_p75", "loss_p95"]])
    assert (np.diff(q, axis=0) >= 0).all()


def test_history_needs_an_iterative_solver(tmp_path, good, capsys):
    bad(tmp_path, ["run", good, "--history", tmp_path / "h.parquet"],
        "--history needs an iterative solver", capsys)


def _tree_bytes(path):
    """Every file below ``path`` (or the file itself) with its bytes."""
    from pathlib import Path

    return {str(p): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


def test_an_output_over_the_input_is_refused_and_the_input_kept(tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=20, points=10)
    data = tmp_path / "data"
    data.mkdir()
    generate(str(data / "part-0.parquet"), series=20, points=10)
    before = _tree_bytes(tmp_path)
    for args, reason in [
        (["run", tmp_path / "d.parquet", "-o", tmp_path / "d.parquet"], "is the input"),
        (["run", tmp_path / "d.parquet", "-o", tmp_path / "." / "d.parquet"], "is the input"),
        (["run", data, "-o", data / "fits.parquet"], "inside the input directory"),
        (["run", data / "part-0.parquet", "-o", data / "part-0.parquet"], "is the input"),
        (["run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet", "--solver", "gd",
          "--epochs", "10", "--history", tmp_path / "d.parquet"], "history"),
    ]:
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1 and "Traceback" not in err
    assert _tree_bytes(tmp_path) == before  # nothing written, nothing replaced
    with pytest.raises(ValueError, match="is the input"):
        batchfit.run_job(str(tmp_path / "d.parquet"), str(tmp_path / "d.parquet"))


def test_the_output_keeps_the_id_column_name_and_says_which_weights(tmp_path, capsys, rng):
    ids = np.repeat(np.arange(30), 12)
    x = rng.uniform(0, 1, ids.size)
    weights = rng.uniform(0.5, 2, ids.size)
    y = 3 * x**2 - x + 2 + rng.normal(0, 0.1, ids.size)
    pq.write_table(pa.table({"sensor": ids, "x": x, "y": y, "w": weights}),
                   tmp_path / "d.parquet")
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o.parquet", "--id-col",
                   "sensor", "--weight-col", "w") == 0
    assert "weighted by column 'w'" in capsys.readouterr().err
    out = pq.read_table(tmp_path / "o.parquet")
    assert out.column_names[0] == "sensor" and "series_id" not in out.column_names
    want, _ = polyfit_rows(x.reshape(30, 12), y.reshape(30, 12), 2, weights.reshape(30, 12))
    assert np.allclose(np.column_stack([out["a"], out["b"], out["c"]]), want, rtol=1e-9)
    assert run_cli("plot", tmp_path / "d.parquet", tmp_path / "o.parquet", "-o",
                   tmp_path / "plots", "--id-col", "sensor") == 0  # reads it back
    assert run_cli("run", tmp_path / "d.parquet", "-o", tmp_path / "o2.parquet",
                   "--id-col", "sensor") == 0
    assert "weighted" not in capsys.readouterr().err  # (no column named weight: unweighted)
    pq.write_table(pa.table({"a": ids, "x": x, "y": y}), tmp_path / "e.parquet")
    assert run_cli("run", tmp_path / "e.parquet", "--id-col", "a") == 2
    assert "has the name of an output column" in capsys.readouterr().err


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=10, points=5)
    with pytest.raises(ValueError, match="^batch_size must be at least 1, got 0$"):
        batchfit.run_job(str(tmp_path / "d.parquet"), batch_size=0)
    with pytest.raises(ValueError, match="^history_path needs an iterative solver"):
        batchfit.run_job(str(tmp_path / "d.parquet"), history_path=str(tmp_path / "h.parquet"))
    assert run_cli("run", tmp_path / "d.parquet", "--history", tmp_path / "h.parquet") == 2
    assert "error: --history needs an iterative solver" in capsys.readouterr().err
    from batchfit.app.cli import as_flags

    assert as_flags("batch_size must be at least 1, got 0") == \
        "--batch-size must be at least 1, got 0"
    assert as_flags("series ids repeat in list format") == "series ids repeat in list format"
    assert as_flags("need 0 <= min_points <= max_points") == \
        "need 0 <= --min-points <= --max-points"


def test_timestamp_date_and_duration_x_columns_are_seconds(tmp_path, rng):
    """A temporal x column is read as float seconds (since 1970-01-01 UTC for timestamps and
    dates, as a length for durations), in long and list format; the unit is recorded."""
    ids = np.repeat(np.arange(10), 24)
    seconds = 1_700_000_000 + np.tile(np.arange(24) * 3600, 10)
    y = 2e-4 * (seconds - seconds[0]) + rng.normal(0, 0.1, ids.size) + 20
    as_ns = pa.array(seconds * 10**9).cast(pa.timestamp("ns", tz="UTC"))
    columns = {
        "number": (pa.array(seconds.astype(np.float64)), None),
        "timestamp": (as_ns, "seconds since 1970-01-01 UTC"),
        "duration": (pa.array((seconds - 1_700_000_000) * 1000).cast(pa.duration("ms")),
                     "seconds"),
        "date": (pa.array((seconds // 86400).astype(np.int32)).cast(pa.date32()),
                 "seconds since 1970-01-01 UTC"),
    }
    out = {}
    for name, (x, unit) in columns.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"series_id": ids, "x": x, "y": y}), path)
        assert run_cli("run", path, "-o", tmp_path / f"o-{name}.parquet", "--dtype",
                       "float64") == 0
        out[name] = pq.read_table(tmp_path / f"o-{name}.parquet")
        assert read_metadata(tmp_path / f"o-{name}.parquet").get("x_unit") == unit
    for name in ("a", "b", "c"):
        assert np.allclose(out["timestamp"][name], out["number"][name], rtol=1e-9)
    assert np.allclose(out["duration"]["b"], 2e-4, rtol=0.05)  # elapsed seconds
    assert set(out["date"]["status"].to_pylist()) == {"singular"}  # one day: no spread
    listed = pa.ListArray.from_arrays(pa.array(np.arange(0, ids.size + 1, 24, dtype=np.int32)),
                                      as_ns)
    pq.write_table(pa.table({"series_id": np.arange(10), "x": listed,
                             "y": pa.ListArray.from_arrays(listed.offsets, pa.array(y))}),
                   tmp_path / "list.parquet")
    assert run_cli("run", tmp_path / "list.parquet", "-o", tmp_path / "o-list.parquet",
                   "--dtype", "float64") == 0
    assert np.allclose(pq.read_table(tmp_path / "o-list.parquet")["b"], out["number"]["b"],
                       rtol=1e-9)
