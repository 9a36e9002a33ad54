"""Inputs in CSV and Arrow IPC (file, Feather v2, stream) besides Parquet (issue 14): the same
output as the same data in Parquet, format detection by extension and by first bytes, and
one-line errors for what cannot be read."""

import datetime
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pyarrow import feather, ipc
from test_job import bad, long_table, run_cli
from zoo import assert_same_fits

import batchfit
from batchfit import io


def write(table: pa.Table, path, kind: str, batch_rows: int | None = None):
    """``table`` as a file of ``kind``: csv, feather (IPC file, LZ4-compressed), arrow (IPC
    file, uncompressed), arrows (IPC stream) or parquet; ``batch_rows``: in record batches
    (row groups) of that many rows, else in one."""
    path = str(path)
    rows = batch_rows or max(table.num_rows, 1)
    if kind == "csv":
        pacsv.write_csv(table, path)  # (floats as their shortest round-trip text)
    elif kind == "feather":
        feather.write_feather(table, path, chunksize=rows)
    elif kind == "arrow":
        with ipc.new_file(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=rows)
    elif kind == "arrows":
        with pa.OSFile(path, "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=rows)
    else:
        pq.write_table(table, path, row_group_size=rows)
    return path


def fitted(path, tmp_path, name="out.parquet", **options) -> pa.Table:
    out = tmp_path / name
    batchfit.run_job(str(path), str(out), dtype="float64", **options)
    return pq.read_table(out).replace_schema_metadata(None)


@pytest.fixture
def points(rng):
    table, _ = long_table(rng, n_series=30)
    return table


@pytest.mark.parametrize("kind", ["csv", "feather", "arrow", "arrows"])
def test_same_output_as_parquet(tmp_path, points, kind):
    """Every column exactly (CSV's text round-trips every float), read in the same pieces."""
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    got = fitted(write(points, tmp_path / f"d.{kind}", kind), tmp_path)
    assert got.equals(want)
    meta = io.read_metadata(tmp_path / "out.parquet")
    assert meta["format"] == "long" and meta["input"] == str(tmp_path / f"d.{kind}")


@pytest.mark.parametrize("kind", ["feather", "arrow", "arrows"])
def test_many_record_batches(tmp_path, points, kind):
    """In other pieces (record batches of 37 rows), the sums of the exact solver are added
    in another grouping: the same fits to float64 rounding, as for Parquet row groups."""
    write(points, tmp_path / "d.parquet", "parquet", 37)
    got = fitted(write(points, tmp_path / f"d.{kind}", kind, 37), tmp_path)
    assert_same_fits(got, fitted(tmp_path / "d.parquet", tmp_path, "want.parquet"))
    # (exactly so when the Parquet file has no id statistics either: series codes are then
    # hashed as for CSV and IPC, and the sums are added in the very same way)
    pq.write_table(points, tmp_path / "n.parquet", row_group_size=37, write_statistics=False)
    assert got.equals(fitted(tmp_path / "n.parquet", tmp_path, "hashed.parquet"))


@pytest.mark.parametrize("kind", ["csv", "feather", "arrows"])
def test_same_output_as_parquet_whole_series_path(tmp_path, rng, kind):
    """A robust fit reads whole series (``Dataset.chunks``), here from shuffled rows: the
    rows are gathered, which needs the row count CSV and IPC streams do not record."""
    points, _ = long_table(rng, n_series=12)
    points = points.take(rng.permutation(points.num_rows))
    options = dict(loss="huber", compile=False)
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet",
                  **options)
    assert fitted(write(points, tmp_path / f"d.{kind}", kind), tmp_path, **options).equals(want)


def test_csv_string_ids_and_weights(tmp_path, points, rng):
    points = points.set_column(0, "series_id", pa.array(
        [f"s-{i:03d}" for i in points["series_id"].to_pylist()]))
    points = points.append_column("weight", pa.array(rng.uniform(0, 2, points.num_rows)))
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    got = fitted(write(points, tmp_path / "d.csv", "csv"), tmp_path)
    assert got.schema.field("series_id").type == pa.string() and got.equals(want)


def test_csv_integer_then_fractional_values(tmp_path):
    """Types are inferred from the first MiB: an x of integers there and a fraction later is
    still a number (integer value columns are read as float64), in one file or several."""
    n = 200_000  # (more than a MiB of text)
    ids = np.arange(n) // 10
    lines = ["series_id,x,y"] + [f"{i},{j % 10},{2 * (j % 10) ** 2 + 1}"
                                 for j, i in enumerate(ids)]
    lines += [f"{n},0.5,1.5", f"{n},1.5,5.5", f"{n},2.5,13.5"]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    out = fitted(tmp_path / "d.csv", tmp_path)
    assert out.num_rows == n // 10 + 1 and set(out["status"].to_pylist()) == {"ok"}
    np.testing.assert_allclose(out["a"].to_numpy(), 2.0, rtol=1e-9)


@pytest.mark.parametrize("kind", ["feather", "arrows"])
def test_ipc_list_format(tmp_path, rng, kind):
    lengths = rng.integers(1, 30, 40)
    x = [rng.uniform(-1, 2, n) for n in lengths]
    table = pa.table({"series_id": np.arange(40) * 7,
                      "x": pa.array([v.tolist() for v in x], pa.list_(pa.float64())),
                      "y": pa.array([(3 * v ** 2 - v + rng.normal(0, .1, len(v))).tolist()
                                     for v in x], pa.list_(pa.float64()))})
    want = fitted(write(table, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    got = fitted(write(table, tmp_path / f"d.{kind}", kind), tmp_path)
    assert got.equals(want)
    assert io.read_metadata(tmp_path / "out.parquet")["format"] == "list"


def test_directory_of_csv_files(tmp_path, points, rng):
    """Series spread over the files (each file a random share of the rows); a header-only
    file holds no series and is skipped; files of other formats are not read when
    input_format picks CSV."""
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    (tmp_path / "dir").mkdir()
    shuffled = points.take(rng.permutation(points.num_rows))
    for i, start in enumerate(range(0, shuffled.num_rows, 150)):
        write(shuffled.slice(start, 150), tmp_path / "dir" / f"part-{i}.csv", "csv")
    (tmp_path / "dir" / "empty.csv").write_text("series_id,x,y\n")
    assert_same_fits(fitted(tmp_path / "dir", tmp_path), want)  # (other pieces: rounding)
    assert fitted(tmp_path / "dir", tmp_path, loss="huber", compile=False).equals(
        fitted(tmp_path / "d.parquet", tmp_path, "want2.parquet", loss="huber", compile=False))
    write(points, tmp_path / "dir" / "copy.parquet", "parquet")  # a mixed directory:
    with pytest.raises(ValueError, match="more than one format .*set input_format"):
        batchfit.run_job(str(tmp_path / "dir"), str(tmp_path / "o.parquet"))
    assert_same_fits(fitted(tmp_path / "dir", tmp_path, input_format="csv"), want)


def test_compressed_csv(tmp_path, points):
    import gzip

    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    write(points, tmp_path / "d.csv", "csv")
    with open(tmp_path / "d.csv", "rb") as f, gzip.open(tmp_path / "d.csv.gz", "wb") as g:
        g.write(f.read())
    assert fitted(tmp_path / "d.csv.gz", tmp_path).equals(want)


def test_detected_by_first_bytes(tmp_path, points):
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    for name, kind in [("parquet.dat", "parquet"), ("file.bin", "arrow"), ("stream", "arrows")]:
        write(points, tmp_path / name, kind)
        assert io.file_format(str(tmp_path / name)) == ("ipc" if "arrow" in kind else kind)
        assert fitted(tmp_path / name, tmp_path).equals(want)
    write(points, tmp_path / "text.dat", "csv")  # CSV has no first bytes of its own
    with pytest.raises(ValueError, match="cannot tell the format of .*text.dat.*input_format"):
        batchfit.run_job(str(tmp_path / "text.dat"), str(tmp_path / "o.parquet"))
    assert fitted(tmp_path / "text.dat", tmp_path, input_format="csv").equals(want)
    with pytest.raises(ValueError, match="input_format must be one of auto, parquet, csv"):
        batchfit.run_job(str(tmp_path / "text.dat"), str(tmp_path / "o.parquet"),
                         input_format="tsv")


def test_undecidable_and_mismatched_formats_cli(tmp_path, points, capsys):
    write(points, tmp_path / "text.dat", "csv")
    bad(tmp_path, ["run", tmp_path / "text.dat"],
        "from its name or its first bytes: set --input-format to parquet, csv or ipc", capsys)
    write(points, tmp_path / "d.parquet", "parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet", "--input-format", "csv"],
        f"{tmp_path / 'd.parquet'} is a Parquet file (by its first bytes), not CSV as "
        "--input-format says", capsys)
    write(points, tmp_path / "parquet.csv", "parquet")
    bad(tmp_path, ["run", tmp_path / "parquet.csv"], "not CSV as its name says", capsys)
    write(points, tmp_path / "d.csv", "csv")
    bad(tmp_path, ["run", tmp_path / "d.csv", "--input-format", "parquet"],
        f"cannot read {tmp_path / 'd.csv'} as Parquet", capsys)
    write(points, tmp_path / "d.arrow", "csv")
    bad(tmp_path, ["run", tmp_path / "d.arrow"], f"cannot read {tmp_path / 'd.arrow'} as "
        "Arrow IPC", capsys)
    (tmp_path / "v1.feather").write_bytes(b"FEA1" + bytes(60))  # (pyarrow warns on writing)
    bad(tmp_path, ["run", tmp_path / "v1.feather"], "Feather version 1 file", capsys)
    (tmp_path / "none").mkdir()
    bad(tmp_path, ["run", tmp_path / "none"], "no Parquet files (nor CSV or Arrow IPC files",
        capsys)


@pytest.mark.parametrize("text,message", [
    ("series_id,x,y\n" + "1,0.5,1\n" * 50_000 + "1,2\n", "CSV parse error: Expected 3 columns"),
    ("series_id,x,y\n" + "1,0.5,1\n" * 150_000 + "abc,1,2\n",
     "CSV conversion error to int64: invalid value 'abc'"),
    ("series_id,x,y\n1,abc,2\n", "column 'x' must be numeric, got string"),
    ("", "Empty CSV file"),
    ('series_id,x,y\n1,"[1.0, 2.0]","[3.0, 4.0]"\n', "holds lists as text; CSV holds long"),
])
def test_malformed_csv(tmp_path, capsys, text, message):
    (tmp_path / "bad.csv").write_text(text)
    bad(tmp_path, ["run", tmp_path / "bad.csv"], message, capsys)
    bad(tmp_path, ["run", tmp_path / "bad.csv", "--loss", "huber", "--no-compile"], message,
        capsys)


def test_malformed_csv_names_the_file(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("series_id,x,y\n" + "1,0.5,1\n" * 50_000 + "1,2\n")
    bad(tmp_path, ["run", tmp_path / "bad.csv"], f"cannot read {tmp_path / 'bad.csv'} as CSV: ",
        capsys)


def test_csv_list_format_refused(tmp_path, points, capsys):
    write(points, tmp_path / "d.csv", "csv")
    bad(tmp_path, ["run", tmp_path / "d.csv", "--format", "list"],
        "is CSV, which holds long format only (a row per point): list format needs Parquet "
        "or Arrow IPC", capsys)


@pytest.mark.parametrize("x_type", [pa.timestamp("s"), pa.timestamp("ms", "UTC"), pa.date32()])
def test_csv_timestamps(tmp_path, rng, x_type, capsys):
    start = datetime.datetime(2024, 1, 1)
    rows = []
    for sid in range(5):
        days = np.sort(rng.choice(365, 20, replace=False))
        rows += [(sid, start + datetime.timedelta(days=int(d), seconds=int(rng.integers(99))),
                  float(d) ** 2 * 1e-3 + sid) for d in days]
    sid, when, y = zip(*rows)
    table = pa.table({"series_id": list(sid), "x": pa.array(list(when)).cast(x_type),
                      "y": list(y)})
    want = fitted(write(table, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    write(table, tmp_path / "d.csv", "csv")
    assert run_cli("run", tmp_path / "d.csv", "-o", tmp_path / "o.parquet", "--dtype",
                   "float64", "--no-progress") == 0
    meta = io.read_metadata(tmp_path / "o.parquet")
    assert meta["x_unit"] == "seconds since 1970-01-01 UTC"
    got = pq.read_table(tmp_path / "o.parquet").replace_schema_metadata(None)
    assert set(got["status"].to_pylist()) == {"ok"} and got.equals(want)


def test_batches_resume_counts_pieces_of_unknown_length(tmp_path, points):
    """``Dataset.batches(start=k)`` is the tail of the whole stream from piece k on, also
    where the pieces of a file cannot be counted before reading it (CSV, IPC)."""
    (tmp_path / "csv").mkdir()
    (tmp_path / "arrow").mkdir()
    for i, begin in enumerate(range(0, points.num_rows, 200)):
        write(points.slice(begin, 200), tmp_path / "csv" / f"{i}.csv", "csv")
        write(points.slice(begin, 200), tmp_path / "arrow" / f"{i}.arrow", "arrow")
    write(points, tmp_path / "d.parquet", "parquet")
    for path in ("csv", "arrow", "d.parquet"):
        dataset = io.Dataset(str(tmp_path / path), io.ColumnSpec())
        whole = list(dataset.batches(dataset.series_codes(), rows=64, workers=2))
        assert [b.index for b in whole] == list(range(len(whole))) and len(whole) > 8
        assert np.array_equal(np.concatenate([b.x for b in whole]), points["x"].to_numpy())
        for start in (1, 5, len(whole) - 1):
            tail = list(dataset.batches(dataset.series_codes(), rows=64, start=start))
            assert [b.index for b in tail] == list(range(start, len(whole)))
            assert np.array_equal(np.concatenate([b.x for b in tail]),
                                  np.concatenate([b.x for b in whole[start:]]))


@pytest.mark.parametrize("kind", ["csv", "feather"])
def test_resume_same_output(tmp_path, points, kind):
    path = write(points, tmp_path / f"d.{kind}", kind)
    want = fitted(path, tmp_path, "want.parquet")
    assert fitted(path, tmp_path, resume=True).equals(want)


def test_read_series_for_plots(tmp_path, points):
    write(points, tmp_path / "d.parquet", "parquet")
    want = io.read_series(str(tmp_path / "d.parquet"), [3, 7, 999], io.ColumnSpec())
    assert sorted(want) == [3, 7]
    for kind in ("csv", "feather", "arrows"):
        got = io.read_series(write(points, tmp_path / f"d.{kind}", kind), [3, 7, 999],
                             io.ColumnSpec())
        assert sorted(got) == [3, 7]
        for sid in (3, 7):
            assert all(np.array_equal(a, b) for a, b in zip(got[sid], want[sid]))


def test_plot_reads_csv(tmp_path, points):
    write(points, tmp_path / "d.dat", "csv")
    assert run_cli("run", tmp_path / "d.dat", "--input-format", "csv", "-o",
                   tmp_path / "c.parquet", "--no-progress") == 0
    assert run_cli("plot", tmp_path / "d.dat", tmp_path / "c.parquet", "--input-format", "csv",
                   "--series", "3,4", "-o", tmp_path / "plots") == 0
    assert (tmp_path / "plots" / "fits.png").stat().st_size > 5000


def test_cli_as_a_subprocess(tmp_path, points):
    def batchfit_cli(*args):
        return subprocess.run([sys.executable, "-m", "batchfit", *map(str, args)],
                              capture_output=True, text=True, check=False)

    write(points, tmp_path / "d.csv", "csv")
    write(points, tmp_path / "d.feather", "feather")
    for name in ("d.csv", "d.feather"):
        run = batchfit_cli("run", tmp_path / name, "-o", tmp_path / f"{name}.out.parquet",
                           "--dtype", "float64")
        assert run.returncode == 0, run.stderr
        assert "fitted 30 series (ok 30)" in run.stderr and run.stdout == ""
    a, b = (pq.read_table(tmp_path / f"{name}.out.parquet").replace_schema_metadata(None)
            for name in ("d.csv", "d.feather"))
    assert a.equals(b)
    (tmp_path / "bad.csv").write_text("series_id,x,y\n1,2,3\n1,2\n")
    run = batchfit_cli("run", tmp_path / "bad.csv", "-o", tmp_path / "bad.out.parquet")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"batchfit: error: cannot read {tmp_path / 'bad.csv'} as CSV")
    assert not os.path.exists(tmp_path / "bad.out.parquet")
    run = batchfit_cli("run", tmp_path / "d.feather", "--input-format", "csv", "-o",
                       tmp_path / "x.parquet")
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "is an Arrow IPC file (by its first bytes), not CSV as --input-format says" in \
        run.stderr


def test_ray_refuses_ipc_where_points_travel_before_starting(tmp_path, points):
    from batchfit.pipeline.distributed import run_ray

    write(points, tmp_path / "d.feather", "feather")
    with pytest.raises(ValueError, match="the Ray engine moves points from Parquet and CSV, "
                                         "and .* is Arrow IPC"):
        run_ray(str(tmp_path / "d.feather"), str(tmp_path / "ray"), loss="huber")


@pytest.mark.slow
def test_ray_fits_ipc_by_its_statistics(tmp_path, points, monkeypatch):
    pytest.importorskip("ray")
    from batchfit.pipeline.distributed import run_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    summary = run_ray(write(points, tmp_path / "d.feather", "feather"), str(tmp_path / "ray"),
                      dtype="float64")
    assert summary.n_series == 30
    got = pq.read_table(tmp_path / "ray").sort_by("series_id").replace_schema_metadata(None)
    assert_same_fits(got, want.sort_by("series_id"))


@pytest.mark.slow
def test_ray_reads_csv(tmp_path, points, rng, monkeypatch):
    pytest.importorskip("ray")
    from batchfit.pipeline.distributed import run_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    want = fitted(write(points, tmp_path / "d.parquet", "parquet"), tmp_path, "want.parquet")
    (tmp_path / "dir").mkdir()
    shuffled = points.take(rng.permutation(points.num_rows))
    for i, begin in enumerate(range(0, shuffled.num_rows, 300)):
        write(shuffled.slice(begin, 300), tmp_path / "dir" / f"{i}.csv", "csv")
    summary = run_ray(str(tmp_path / "dir"), str(tmp_path / "ray"), dtype="float64")
    assert summary.n_series == 30
    got = pq.read_table(tmp_path / "ray").sort_by("series_id").replace_schema_metadata(None)
    assert_same_fits(got, want)


@pytest.mark.parametrize("kind, name", [("csv", "d.csv"), ("feather", "d.feather")])
def test_default_output_name_and_recorded_format(tmp_path, points, kind, name):
    data = write(points, tmp_path / name, kind)
    summary = batchfit.run_job(data)
    assert summary.output == str(tmp_path / "d.coeffs.parquet")
    assert io.read_metadata(summary.output)["input_format"] == (
        "ipc" if kind == "feather" else kind)
