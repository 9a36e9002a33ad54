"""Hostile inputs (issue 7): damaged files, mixed schemas, odd types, nulls everywhere,
extreme shapes, and a fuzzed reader. Every case either fits correctly (checked against
numpy.polyfit in float64) or exits 2 with one ``batchfit: error: ...`` line, no traceback,
no output and no temporary file; none may hang."""

from __future__ import annotations

import contextlib
import decimal
import faulthandler
import io
import os
import stat
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_job import bad, check_against_polyfit, long_table, run_cli
from zoo import assert_same_fits

import batchfit

HANG_SECONDS = 300  # a test still running after this is hung: dump the stacks and exit


@pytest.fixture(autouse=True)
def never_hang():
    """A watchdog thread: it fires even while the main thread is stuck inside C code."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def fit(tmp_path, path, *args) -> pa.Table:
    """Run the CLI in float64; it must succeed. Returns the output table."""
    out = tmp_path / "fit.coeffs.parquet"
    assert run_cli("run", path, "-o", out, "--no-progress", "--no-compile", "--dtype",
                   "float64", *args) == 0
    return pq.read_table(out)


@pytest.fixture
def points(rng):
    """A long-format table of 40 series with known points (float64), rows grouped."""
    return long_table(rng, n_series=40)


# ---------------------------------------------------------------- 1, 2: damaged files


def footer_length(data: bytes) -> int:
    return struct.unpack("<i", data[-8:-4])[0]


@pytest.fixture
def parquet_bytes(tmp_path, points):
    table, _ = points
    pq.write_table(table, tmp_path / "src.parquet", row_group_size=100)
    data = (tmp_path / "src.parquet").read_bytes()
    (tmp_path / "src.parquet").unlink()
    return data


@pytest.mark.parametrize("keep", [0.6, 0.99, 8 / 9])
def test_truncated_file(tmp_path, parquet_bytes, capsys, keep):
    (tmp_path / "cut.parquet").write_bytes(parquet_bytes[:int(len(parquet_bytes) * keep)])
    bad(tmp_path, ["run", tmp_path / "cut.parquet"],
        "cannot read " + str(tmp_path / "cut.parquet") + " as Parquet: Parquet magic bytes "
        "not found in footer", capsys)


def test_truncated_file_in_a_directory_is_named(tmp_path, parquet_bytes, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.parquet").write_bytes(parquet_bytes)
    (tmp_path / "d" / "b.parquet").write_bytes(parquet_bytes[:len(parquet_bytes) // 2])
    bad(tmp_path, ["run", tmp_path / "d"], f"cannot read {tmp_path / 'd' / 'b.parquet'}",
        capsys)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:-20] + bytes(20), "Parquet magic bytes not found in footer"),
    (lambda d: d[:-4] + b"PAR0", "Parquet magic bytes not found in footer"),
    (lambda d: d[:-8] + struct.pack("<i", len(d) * 2) + b"PAR1",
     "smaller than the size reported by footer"),
    (lambda d: d[:-8] + struct.pack("<i", -1) + b"PAR1", "smaller than the size reported"),
    (lambda d: d[:-8] + struct.pack("<i", 0) + b"PAR1", "Couldn't deserialize thrift"),
    (lambda d: d[:-8] + struct.pack("<i", footer_length(d) - 9) + b"PAR1",
     "Couldn't deserialize thrift"),
    (lambda d: d[:-footer_length(d) - 8] + bytes(footer_length(d)) + d[-8:],
     "Couldn't deserialize thrift"),
    (lambda d: b"", "Parquet file size is 0 bytes"),
    (lambda d: d[:4], "smaller than the minimum file footer"),
])
def test_corrupt_footer(tmp_path, parquet_bytes, capsys, damage, message):
    (tmp_path / "bad.parquet").write_bytes(damage(parquet_bytes))
    bad(tmp_path, ["run", tmp_path / "bad.parquet"], message, capsys)


def test_random_damage_never_escapes(tmp_path, parquet_bytes, capsys):
    """Bytes overwritten in the footer or the data pages, or a stretch cut out: a clean
    error, or (the damage missed anything that matters, or changed numbers undetectably:
    pyarrow writes no page checksums by default) a complete output file."""
    rng = np.random.default_rng(7)
    start = len(parquet_bytes) - footer_length(parquet_bytes) - 8
    codes = []
    for trial in range(60):
        data = bytearray(parquet_bytes)
        where = int(rng.integers(start, len(data) - 8) if trial % 2 else rng.integers(4, start))
        if trial % 3 == 2:
            del data[where:where + int(rng.integers(1, 500))]
        else:
            size = int(rng.integers(1, 9))
            data[where:where + size] = rng.integers(0, 256, size).astype(np.uint8).tobytes()
        (tmp_path / "bad.parquet").write_bytes(bytes(data))
        out = tmp_path / "out.parquet"
        codes.append(run_cli("run", tmp_path / "bad.parquet", "-o", out, "--no-progress"))
        err = capsys.readouterr().err
        assert codes[-1] in (0, 2) and "Traceback" not in err
        if codes[-1] == 2:
            assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
            assert not out.exists()
        else:
            assert pq.read_table(out).num_rows > 0
            out.unlink()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert codes.count(2) > 20  # most damage is noticed


# ---------------------------------------------------------------- 3: mixed schemas


def write_parts(directory, tables):
    directory.mkdir()
    for i, table in enumerate(tables):
        pq.write_table(table, directory / f"part-{i}.parquet")
    return directory


def halves(table):
    return table.slice(0, table.num_rows // 2), table.slice(table.num_rows // 2)


def with_type(table, column, type_):
    return table.set_column(table.schema.get_field_index(column), column,
                            table[column].cast(type_))


def test_compatible_numeric_types_differ_between_files(tmp_path, rng):
    """int32 x in one file, float64 in the other; float32 y beside decimal y; int32 ids
    beside int64 ids: all read as one dataset (values as float64, ids as int64)."""
    table, series = long_table(rng, n_series=30)
    table = with_type(table, "x", pa.float64())
    x = np.round(table["x"].to_numpy() * 100)  # integers, exact in every type below
    y = np.round(table["y"].to_numpy() * 8) / 8  # eighths: exact in float32 and decimals
    table = table.set_column(1, "x", pa.array(x)).set_column(2, "y", pa.array(y))
    series = {s: (x[table["series_id"].to_numpy() == s], y[table["series_id"].to_numpy() == s])
              for s in series}
    first, second = halves(table)  # a series is cut across the two files
    first = with_type(with_type(first, "x", pa.int32()), "series_id", pa.int32())
    directory = write_parts(tmp_path / "d", [first, with_type(second, "y", pa.float32())])
    out = fit(tmp_path, directory)
    assert out.schema.field("series_id").type == pa.int64()
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)
    directory = write_parts(tmp_path / "e", [first, with_type(second, "y", pa.decimal128(12, 3))])
    fit(tmp_path, directory)
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)


def test_compatible_list_types_and_string_ids_differ_between_files(tmp_path, rng):
    _, series = long_table(rng, n_series=20)
    ids = list(series)
    x = [np.round(series[i][0] * 100) for i in ids]
    series = {f"s{i}": (x[i], series[i][1]) for i in ids}
    first = pa.table({"series_id": pa.array([f"s{i}" for i in ids[:10]]),
                      "x": pa.array([v.tolist() for v in x[:10]], pa.list_(pa.int16())),
                      "y": pa.array([series[f"s{i}"][1].tolist() for i in ids[:10]])})
    second = pa.table({"series_id": pa.array([f"s{i}" for i in ids[10:]], pa.large_string()),
                       "x": pa.array([v.tolist() for v in x[10:]], pa.large_list(pa.float64())),
                       "y": pa.array([series[f"s{i}"][1].tolist() for i in ids[10:]],
                                     pa.large_list(pa.float64()))})
    out = fit(tmp_path, write_parts(tmp_path / "d", [first, second]))
    assert out.schema.field("series_id").type == pa.large_string()
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.set_column(2, "y", t["y"].cast(pa.string())),
     "column 'y' must be numeric, got string (in {1})"),
    (lambda t: t.drop_columns(["y"]),
     "missing column 'y' in {1} (columns present: series_id, x)"),
    (lambda t: t.set_column(1, "x", pa.array([[v] for v in t["x"].to_pylist()]))
                .set_column(2, "y", pa.array([[v] for v in t["y"].to_pylist()])),
     "{1} does not match {0}: list format, weights False vs long format, weights False"),
    (lambda t: t.set_column(0, "series_id", t["series_id"].cast(pa.string())),
     "series ids are string in {1} but int64 in {0}"),
    (lambda t: t.append_column("weight", pa.array(np.ones(t.num_rows))),
     "{1} does not match {0}: long format, weights True vs long format, weights False"),
    (lambda t: t.set_column(1, "x", t["x"].cast(pa.int64(), safe=False).cast(pa.timestamp("s"))),
     # (a time x is read as seconds since 1970, numbers as they are: mixing them is refused)
     "column 'x' holds seconds since 1970-01-01 UTC in {1} but numbers in {0}"),
])
def test_incompatible_schemas_between_files(tmp_path, points, capsys, change, message):
    first, second = halves(points[0])
    directory = write_parts(tmp_path / "d", [first, change(second)])
    bad(tmp_path, ["run", directory], message.format(*sorted(directory.iterdir())), capsys)


# ---------------------------------------------------------------- 4: dictionaries, decimals


def test_dictionary_encoded_columns(tmp_path, points):
    table, series = points
    ids = pa.array([f"id-{i}" for i in table["series_id"].to_pylist()])
    table = pa.table({"series_id": ids.dictionary_encode(),
                      "x": table["x"].combine_chunks().dictionary_encode(),
                      "y": table["y"].combine_chunks().dictionary_encode()})
    pq.write_table(table, tmp_path / "d.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "d.parquet").field("series_id").type)
    out = fit(tmp_path, tmp_path / "d.parquet")
    assert out.schema.field("series_id").type == pa.string()  # the encoding is not kept
    check_against_polyfit(tmp_path / "fit.coeffs.parquet",
                          {f"id-{i}": value for i, value in series.items()})


def test_dictionary_ids_with_a_null_are_null_ids(tmp_path, capsys):
    ids = pa.DictionaryArray.from_arrays(pa.array([0, 0, None, 1]), pa.array(["a", "b"]))
    pq.write_table(pa.table({"series_id": ids, "x": [0.0, 1.0, 2.0, 3.0],
                             "y": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "column 'series_id' has null ids", capsys)


@pytest.mark.parametrize("x_type,y_type", [
    (pa.decimal128(12, 3), pa.decimal128(20, 6)),
    (pa.decimal256(40, 3), pa.float64()),
    (pa.float64(), pa.decimal128(38, 10)),
])
def test_decimal_columns(tmp_path, rng, x_type, y_type):
    table, _ = long_table(rng, n_series=25)
    x = np.round(table["x"].to_numpy(), 3)
    y = np.round(table["y"].to_numpy(), 6)
    ids = table["series_id"].to_numpy()
    w = np.round(rng.uniform(0.1, 2, len(x)), 2)

    def stored(values, type_):
        if pa.types.is_decimal(type_):
            return pa.array([decimal.Decimal(f"{v:.{type_.scale}f}") for v in values], type_)
        return pa.array(values)

    pq.write_table(pa.table({"series_id": ids, "x": stored(x, x_type), "y": stored(y, y_type),
                             "weight": stored(w, pa.decimal128(5, 2))}), tmp_path / "d.parquet")
    out = {row["series_id"]: row for row in fit(tmp_path, tmp_path / "d.parquet").to_pylist()}
    assert len(out) == 25
    for s, row in out.items():
        keep = ids == s
        want = np.polyfit(x[keep], y[keep], 2, w=np.sqrt(w[keep]))
        np.testing.assert_allclose([row["a"], row["b"], row["c"]], want, rtol=1e-7,
                                   atol=1e-7 * np.abs(want).max())


def test_integers_beyond_float64_precision(tmp_path):
    """int64/uint64 x beyond 2**53 round to float64 (as numpy's would), not an error."""
    x = np.arange(10, dtype=np.uint64) * 4096 + np.uint64(2**62)
    y = (x.astype(np.float64) - 2.0**62) / 4096
    pq.write_table(pa.table({"series_id": np.zeros(10, np.int64), "x": x, "y": y}),
                   tmp_path / "d.parquet")
    row = fit(tmp_path, tmp_path / "d.parquet", "--degree", "1").to_pylist()[0]
    assert row["status"] == "ok" and row["n_points"] == 10 and row["r2"] == pytest.approx(1)
    assert row["p1"] == pytest.approx(1 / 4096, rel=1e-9)  # a line: well posed even out here


def test_fixed_size_lists(tmp_path, rng):
    x, y = rng.uniform(-1, 1, (6, 8)), rng.normal(size=(6, 8))
    pq.write_table(pa.table({"series_id": np.arange(6),
                             "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
                             "y": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), 8)}),
                   tmp_path / "d.parquet")
    fit(tmp_path, tmp_path / "d.parquet")
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", dict(enumerate(zip(x, y))))


# ---------------------------------------------------------------- 5: nulls


def all_too_few(out: pa.Table, n_series: int):
    assert out.num_rows == n_series and len(out["series_id"].unique()) == n_series
    assert set(out["status"].to_pylist()) == {"too_few_points"}
    assert set(out["n_points"].to_pylist()) == {0}
    for column in ["a", "b", "c", "a_stderr", "loss", "rmse", "r2"]:
        assert out[column].null_count == n_series


@pytest.mark.parametrize("column,values", [
    ("y", lambda n: pa.nulls(n, pa.float64())),
    ("x", lambda n: pa.nulls(n, pa.int32())),
    ("y", lambda n: pa.nulls(n)),  # null type: as pandas writes an all-None column
    ("weight", lambda n: pa.nulls(n, pa.float32())),
    ("x", lambda n: pa.array(np.full(n, np.nan))),
])
def test_all_null_column(tmp_path, points, column, values):
    table = points[0]
    table = table.drop_columns([column]) if column in table.column_names else table
    table = table.append_column(column, values(table.num_rows))
    pq.write_table(table, tmp_path / "d.parquet")
    all_too_few(fit(tmp_path, tmp_path / "d.parquet"), 40)


def test_series_whose_points_are_all_null(tmp_path, points):
    table, series = points
    ids = table["series_id"].to_numpy()
    y = table["y"].to_numpy().copy()
    y[ids == 3] = np.nan
    ys = pa.array(y, from_pandas=True)  # NaN -> null
    ys = pa.array([None if i == 5 else v for i, v in zip(ids, ys.to_pylist())], pa.float64())
    x = table["x"].to_pylist()
    x = pa.array([None if i == 7 else v for i, v in zip(ids, x)], pa.float64())
    table = pa.table({"series_id": ids, "x": x, "y": ys})
    pq.write_table(table, tmp_path / "d.parquet")
    out = {row["series_id"]: row for row in fit(tmp_path, tmp_path / "d.parquet").to_pylist()}
    assert len(out) == 40
    for s in (3, 5, 7):
        assert out[s]["status"] == "too_few_points" and out[s]["n_points"] == 0
        assert out[s]["a"] is None and out[s]["c"] is None
    for s in set(series) - {3, 5, 7}:
        np.testing.assert_allclose([out[s]["a"], out[s]["b"], out[s]["c"]],
                                   np.polyfit(*series[s], 2), rtol=1e-7)


def test_null_lists_are_series_without_points(tmp_path):
    x = pa.array([[0.0, 1.0, 2.0], None, [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0], []],
                 pa.list_(pa.float64()))
    y = pa.array([[1.0, 2.0, 5.0], [1.0, 2.0], None, [None, 2.0, 5.0], []],
                 pa.list_(pa.float64()))
    pq.write_table(pa.table({"series_id": ["a", "b", "c", "d", "e"], "x": x, "y": y}),
                   tmp_path / "d.parquet")
    out = fit(tmp_path, tmp_path / "d.parquet").to_pylist()
    assert [r["status"] for r in out] == ["ok"] + ["too_few_points"] * 4
    assert [r["n_points"] for r in out] == [3, 0, 0, 2, 0]
    np.testing.assert_allclose([out[0]["a"], out[0]["b"], out[0]["c"]], [1, 0, 1], atol=1e-12)


@pytest.mark.parametrize("where", ["first", "later"])
def test_null_ids(tmp_path, points, capsys, where):
    table = points[0]
    ids = table["series_id"].to_pylist()
    ids[0 if where == "first" else -1] = None
    pq.write_table(table.set_column(0, "series_id", pa.array(ids, pa.int64())),
                   tmp_path / "d.parquet", row_group_size=50)
    bad(tmp_path, ["run", tmp_path / "d.parquet"], "column 'series_id' has null ids", capsys)


# ---------------------------------------------------------------- 6, 7: extreme shapes


def test_many_one_point_series(tmp_path):
    n = 300_000
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 7 - 1000)
    pq.write_table(pa.table({"series_id": ids, "x": rng.normal(size=n),
                             "y": rng.normal(size=n)}), tmp_path / "d.parquet")
    out = fit(tmp_path, tmp_path / "d.parquet")  # (its speed is benchmarks' business)
    assert out.num_rows == n and np.array_equal(np.sort(out["series_id"].to_numpy()),
                                                np.sort(ids))
    assert out["status"].unique().to_pylist() == ["too_few_points"]
    assert out["n_points"].unique().to_pylist() == [1] and out["a"].null_count == n


def test_one_series_with_millions_of_points(tmp_path):
    n = 2_000_000
    rng = np.random.default_rng(4)
    x = rng.uniform(-3, 5, n)
    y = 2 * x**2 - x + 4 + rng.normal(size=n)
    pq.write_table(pa.table({"series_id": np.full(n, 42, np.int64), "x": x, "y": y}),
                   tmp_path / "d.parquet", row_group_size=300_000)
    row = fit(tmp_path, tmp_path / "d.parquet").to_pylist()
    assert len(row) == 1 and row[0]["n_points"] == n and row[0]["status"] == "ok"
    np.testing.assert_allclose([row[0]["a"], row[0]["b"], row[0]["c"]], np.polyfit(x, y, 2),
                               rtol=1e-9)


# ---------------------------------------------------------------- 8: duplicate names


@pytest.mark.parametrize("names,message", [
    (["series_id", "x", "y", "y"], "duplicate column names: y"),
    (["series_id", "x", "x", "y"], "duplicate column names: x"),
    (["series_id", "series_id", "x", "y"], "duplicate column names: series_id"),
    (["series_id", "x", "y", "weight", "weight"], "duplicate column names: weight"),
])
def test_duplicate_column_names(tmp_path, capsys, names, message):
    arrays = [pa.array([1, 1, 1])] + [pa.array([0.0, 1.0, 2.0])] * (len(names) - 1)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp_path / "d.parquet")
    bad(tmp_path, ["run", tmp_path / "d.parquet"], message, capsys)


def test_duplicate_names_of_other_columns_do_not_matter(tmp_path, points):
    table, series = points
    extra = pa.array(np.zeros(table.num_rows))
    table = pa.Table.from_arrays([*table.columns, extra, extra],
                                 names=[*table.column_names, "note", "note"])
    pq.write_table(table, tmp_path / "d.parquet")
    fit(tmp_path, tmp_path / "d.parquet")
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)


# ---------------------------------------------------------------- 9: empty files


def test_zero_row_files_change_nothing(tmp_path, points):
    table, series = points
    first, second = halves(table)
    plain = write_parts(tmp_path / "plain", [first, second])
    empty_pandas_like = pa.table({"series_id": pa.nulls(0), "x": pa.nulls(0)})  # no y at all
    padded = write_parts(tmp_path / "padded", [first.slice(0, 0), first, second.slice(0, 0),
                                               second, empty_pandas_like])
    want = fit(tmp_path, plain)
    assert fit(tmp_path, padded).equals(want)
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)


def test_only_zero_row_files(tmp_path, points, capsys):
    directory = write_parts(tmp_path / "d", [points[0].slice(0, 0)] * 3)
    bad(tmp_path, ["run", directory], f"empty input: {directory} has no rows", capsys)


# ---------------------------------------------------------------- grouped, ids not ascending


@pytest.mark.parametrize("make_id", [lambda i: f"id-{i}", lambda i: 1000 - 7 * i])
def test_grouped_series_whose_ids_do_not_ascend(tmp_path, rng, make_id):
    """Rows grouped by series, ids not in ascending order ("id-10" sorts before "id-2"),
    points not sorted by x: each series keeps its own points (found by the fuzz: sorting
    the points by (id, x, y) used to cut the reordered rows at the old series bounds)."""
    table, series = long_table(rng, n_series=40, ids=[make_id(i) for i in range(40)])
    pq.write_table(table, tmp_path / "d.parquet")
    fit(tmp_path, tmp_path / "d.parquet")
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series)
    in_memory = batchfit.fit_table(table, dtype="float64")
    assert_same_fits(in_memory, pq.read_table(tmp_path / "fit.coeffs.parquet"))


# ---------------------------------------------------------------- 10: the fuzzed reader

FUZZ_EXAMPLES = int(os.environ.get("BATCHFIT_FUZZ_EXAMPLES", "40"))
ID_TYPES = {"int8": pa.int8(), "int32": pa.int32(), "int64": pa.int64(),
            "uint16": pa.uint16(), "uint64": pa.uint64(), "string": pa.string(), "large_string": pa.large_string(),
            "dictionary": pa.dictionary(pa.int32(), pa.string())}
VALUE_TYPES = {"int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(),
               "int64": pa.int64(), "uint8": pa.uint8(), "float16": pa.float16(),
               "float32": pa.float32(), "float64": pa.float64(),
               "decimal": pa.decimal128(12, 3), "dictionary": pa.dictionary(pa.int16(),
                                                                            pa.float64())}
ID_FAMILIES = [("int8", "int32", "int64"), ("uint16", "int32", "int64"), ("uint64",),
               ("string", "large_string", "dictionary")]
INT_RANGES = {"int8": (-128, 127), "int16": (-2**15, 2**15 - 1), "int32": (-2**31, 2**31 - 1),
              "int64": (-2**63, 2**63 - 1), "uint8": (0, 255)}
SPECIALS = [None, np.nan, np.inf, -np.inf]


def stored_values(raw: np.ndarray, special: np.ndarray, kind: str):
    """``raw`` float64 values, with ``special[i] >= 0`` marking SPECIALS[special[i]], as an
    Arrow array of type ``kind`` and the float64 values it holds (NaN for null)."""
    values = raw.astype(np.float64)
    if kind in INT_RANGES:
        values = np.clip(np.round(values), *INT_RANGES[kind])
    elif kind == "float16":
        values = values.astype(np.float16).astype(np.float64)
    elif kind == "float32":
        values = values.astype(np.float32).astype(np.float64)
    elif kind == "decimal":
        values = np.round(values, 3)
    is_float = kind in ("float16", "float32", "float64", "dictionary")
    null = np.zeros(len(values), bool)
    for code, value in enumerate(SPECIALS):
        hit = special == code
        if code == 0 or not is_float:
            null |= hit  # types without NaN/inf hold a null there
        else:
            values = np.where(hit, value, values)
    if kind == "decimal":
        objects = [None if n else decimal.Decimal(f"{v:.3f}") for v, n in zip(values, null)]
        array = pa.array(objects, VALUE_TYPES[kind])
    else:
        numpy_type = {"float16": np.float16, "dictionary": np.float64}.get(kind, kind)
        array = pa.array(values.astype(numpy_type), mask=null)
        if kind == "dictionary":
            array = array.dictionary_encode()
    return array, np.where(null, np.nan, values)


@st.composite
def datasets(draw):
    fmt = draw(st.sampled_from(["long", "list"]))
    id_kind = draw(st.sampled_from(sorted(ID_TYPES)))
    n_series = draw(st.integers(1, 30))
    lengths = draw(st.lists(st.integers(0, 20), min_size=n_series, max_size=n_series))
    n_files = draw(st.integers(1, 3))
    same_types = draw(st.booleans())
    kinds = {column: draw(st.lists(st.sampled_from(sorted(VALUE_TYPES)), min_size=n_files,
                                   max_size=n_files))
             for column in ("x", "y", "weight")}
    # ids of one family may differ in width or encoding between files
    family = next(f for f in ID_FAMILIES if id_kind in f)
    kinds["series_id"] = [id_kind] + draw(st.lists(st.sampled_from(family), min_size=n_files - 1,
                                                   max_size=n_files - 1))
    if same_types:
        kinds = {column: [types[0]] * n_files for column, types in kinds.items()}
    return dict(fmt=fmt, id_kind=id_kind, lengths=lengths, n_files=n_files, kinds=kinds,
                weights=draw(st.booleans()), special_rate=draw(st.sampled_from([0, .05, .3])),
                unsigned=draw(st.booleans()), shuffle=draw(st.booleans()),
                null_id=draw(st.integers(0, 9)) == 0, negative_weight=draw(st.integers(0, 9)) == 0,
                repeat_id=draw(st.integers(0, 9)) == 0, seed=draw(st.integers(0, 2**32 - 1)))


def make_ids(case, rng) -> list:
    n = len(case["lengths"])
    if case["id_kind"] in ("int8", "int32", "int64", "uint16"):
        low = 0 if case["id_kind"] == "uint16" else -100
        return [int(v) for v in rng.choice(np.arange(low, 120), n, replace=False)]
    if case["id_kind"] == "uint64":  # about 2**63 and below 2**64: beyond int64
        top = 2**63 + 60 if rng.random() < 0.5 else 2**64 - 1
        return [top - int(v) for v in rng.choice(120, n, replace=False)]
    prefixes = ["", "s-", "é", "a\x00", " "]
    return [prefixes[int(rng.integers(len(prefixes)))] + str(v)
            for v in rng.choice(1000, n, replace=False)]


def id_array(ids: list, kind: str) -> pa.Array:
    if kind == "dictionary":
        return pa.array(ids, pa.string()).dictionary_encode()
    return pa.array(ids, ID_TYPES[kind])


def write_case(case, directory):
    """Write the dataset; return {id: (x, y, w)} as stored (float64, NaN for null), and the
    error expected, if any."""
    rng = np.random.default_rng(case["seed"])
    ids = make_ids(case, rng)
    lengths = np.array(case["lengths"])
    total = int(lengths.sum())
    low = 0 if case["unsigned"] else -100
    raw = {"x": rng.uniform(low, 100, total), "y": rng.normal(0, 50, total),
           "weight": rng.uniform(0, 3, total) * (rng.random(total) > 0.1)}
    if case["negative_weight"] and total:
        raw["weight"][rng.integers(total)] = -1.0
    special = {column: np.where(rng.random(total) < case["special_rate"],
                                rng.integers(0, len(SPECIALS), total), -1)
               for column in raw}
    row_ids = np.repeat(np.arange(len(ids)), lengths)  # point -> series position
    columns = ["x", "y"] + (["weight"] if case["weights"] else [])

    if case["fmt"] == "long":
        rows = rng.permutation(total) if case["shuffle"] else np.arange(total)
        cuts = np.sort(rng.integers(0, total + 1, case["n_files"] - 1))
        parts = np.split(rows, cuts)
        series_of_part = [row_ids[part] for part in parts]
    else:
        order = rng.permutation(len(ids)) if case["shuffle"] else np.arange(len(ids))
        cuts = np.sort(rng.integers(0, len(ids) + 1, case["n_files"] - 1))
        series_of_part = np.split(order, cuts)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        parts = [np.concatenate([np.arange(starts[s], starts[s + 1]) for s in group]
                                + [np.zeros(0, np.int64)]).astype(np.int64)
                 for group in series_of_part]
    file_ids = [[ids[s] for s in group] for group in series_of_part]
    if case["null_id"] and total:
        nonempty = [i for i, group in enumerate(file_ids) if group]
        if nonempty:
            part = nonempty[int(rng.integers(len(nonempty)))]
            file_ids[part][int(rng.integers(len(file_ids[part])))] = None
    repeated = False
    if case["repeat_id"] and case["fmt"] == "list" and len(ids) > 1:
        group = max(range(len(file_ids)), key=lambda i: len(file_ids[i]))
        if len(file_ids[group]) > 1:
            file_ids[group][0] = file_ids[group][1]
            repeated = True

    stored = {column: np.full(total, np.nan) for column in columns}
    null_lists = {}
    for i, part in enumerate(parts):
        table = {"series_id": id_array(file_ids[i], case["kinds"]["series_id"][i])}
        for column in columns:
            kind = case["kinds"][column][i]
            array, values = stored_values(raw[column][part], special[column][part], kind)
            stored[column][part] = values
            if case["fmt"] == "list":
                group = series_of_part[i]
                offsets = np.concatenate([[0], np.cumsum(lengths[group])]).astype(np.int32)
                nulls = rng.random(len(group)) < case["special_rate"] / 3
                for s in np.asarray(group)[nulls]:
                    null_lists[s] = True
                if pa.types.is_dictionary(array.type):
                    array = array.dictionary_decode()
                array = pa.ListArray.from_arrays(offsets, array,
                                                 mask=pa.array(nulls, pa.bool_()))
            table[column] = array
        pq.write_table(pa.table(table), directory / f"part-{i}.parquet",
                       row_group_size=int(rng.integers(1, 60)))

    # the values of a null list's row are never read (that series has no points)
    in_null_list = np.isin(row_ids, list(null_lists))
    series = {}
    for s, sid in enumerate(ids):
        keep = row_ids == s
        if case["fmt"] == "long" and not keep.any():
            continue  # a series without rows does not exist in long format
        x, y = stored["x"][keep], stored["y"][keep]
        w = stored["weight"][keep] if case["weights"] else np.ones(len(x))
        if null_lists.get(s):
            x = np.full(len(x), np.nan)
        series[sid] = (x, y, w)
    all_ids = [i for group in file_ids for i in group]
    if case["fmt"] == "list" and repeated:  # the overwritten series is gone
        series = {sid: series[sid] for sid in set(all_ids) if sid in series}
    # Every error the input has: a run stops at the first it reads (the input is read once,
    # in order, so which one comes first depends on where they are).
    if (case["fmt"] == "long" and total == 0) or not all_ids:
        return series, ["empty input"]
    errors = []
    if None in all_ids:
        errors.append("has null ids")
    if repeated:
        errors.append("series ids repeat in list format")
    weights = stored["weight"][~in_null_list] if case["weights"] else np.zeros(0)
    if np.any((weights < 0) & np.isfinite(weights)):  # (-inf, like inf: a skipped point)
        errors.append("weights must be >= 0")
    return series, errors


def check_series(row, x, y, w):
    used = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (w > 0)
    x, y, w = x[used], y[used], w[used]
    assert row["n_points"] == len(x)
    if len(x) < 3:
        assert row["status"] == "too_few_points" and row["a"] is None
        return
    if len(np.unique(x)) < 3:
        assert row["status"] == "singular" and row["a"] is None
        return
    t = (x - (x.max() + x.min()) / 2) / ((x.max() - x.min()) / 2)
    design = np.vander(t, 3) * np.sqrt(w)[:, None]
    if np.linalg.cond(design) > 1e5:  # near-singular: either verdict is fine
        assert row["status"] in ("ok", "singular")
        return
    assert row["status"] == "ok"
    want = np.polyfit(x, y, 2, w=np.sqrt(w))
    got = np.array([row["a"], row["b"], row["c"]])
    scale = np.abs(y).max() + 1
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(np.abs(want).max(), 1))
    np.testing.assert_allclose(np.polyval(got, x), np.polyval(want, x), rtol=0,
                               atol=1e-6 * scale)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(case=datasets())
def test_fuzzed_reader(tmp_path_factory, case):
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)  # restart: per example
    base = tmp_path_factory.mktemp("fuzz")
    directory = base / "input"
    directory.mkdir()
    series, errors = write_case(case, directory)
    path = directory if case["n_files"] > 1 else directory / "part-0.parquet"
    out = base / "out.parquet"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli("run", path, "-o", out, "--no-progress", "--no-compile",
                       "--dtype", "float64")
    err = err.getvalue()
    assert "Traceback" not in err
    assert not [p for p in base.iterdir() if p.name.startswith(".")]
    if errors:
        assert code == 2, (errors, err)
        assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
        assert any(error in err for error in errors), err
        assert not out.exists()
        return
    assert code == 0, err
    rows = pq.read_table(out).to_pylist()
    assert sorted(map(repr, (r["series_id"] for r in rows))) == sorted(map(repr, series))
    for row in rows:
        check_series(row, *series[row["series_id"]])


def test_damaged_page_is_caught_by_its_checksum(tmp_path, capsys):
    """A flipped byte inside a data page of a file written with page checksums (Spark's
    default, and batchfit's own outputs) is an error, not a silently different number."""
    table, _ = long_table(np.random.default_rng(5), n_series=200, ragged=False)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, write_page_checksum=True, compression="none")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    bad(tmp_path, ["run", str(path)], "CRC checksum verification failed", capsys)


def test_load_run_reconciles(tmp_path, monkeypatch):
    """The load run of benchmarks/bench_load.py (1e7 series there), scaled down and streamed
    in many read batches: every input series comes back exactly once, statuses counted."""
    from zoo import load_benchmark

    from batchfit import io as bio
    from batchfit.app.generate import generate

    load = load_benchmark("bench_load")
    data, out = str(tmp_path / "load.parquet"), str(tmp_path / "fits.parquet")
    generate(data, series=200_000, points=10, seed=7)
    monkeypatch.setattr(bio.Dataset.chunks, "__defaults__", (1 << 16,))  # many read batches
    assert run_cli("run", data, "-o", out, "--batch-size", "30000") == 0
    report = load.reconcile(data, out)
    assert report == {"series_in": 200_000, "rows_out": 200_000, "duplicates_out": 0,
                      "same_ids": True, "statuses": {"ok": 200_000}}


@pytest.mark.parametrize("solver", ["exact", "newton"])
def test_no_internal_status_code_reaches_a_result(solver):
    """PRECISION_LIMITED (-1) marks float32 fits limited by rounding, to be refitted in
    float64; it must never leave the engine, in a result or a record."""
    from batchfit.core.names import Status
    from batchfit.fitting.diagnostics import PRECISION_LIMITED

    x = np.tile(np.arange(21.0), (6, 1))
    y = sum(x**k for k in range(6))  # NIST Wampler1: exact data, rounding-limited in float32
    y[3] = 1e6 + 0.5 * np.sin(x[3])  # a signal float32 barely holds
    fit = batchfit.fit(x, y, degree=5, solver=solver, dtype="float32", compile=False)
    codes = set(fit.status.tolist()) | set(fit.record()["status"].tolist())
    assert PRECISION_LIMITED not in codes and codes <= {int(s) for s in Status}
    assert fit.status_labels().tolist() == ["ok"] * 6


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "nan", "--lr must be finite"),
    ("--tol", "nan", "--tol must be finite"),
    ("--f-scale", "inf", "--f-scale must be finite"),
    ("--epochs", str(10**20), "--epochs must be below 2**63"),
])
def test_numeric_options_that_are_not_finite_or_too_large(tmp_path, points, capsys, option,
                                                           value, message):
    """Once accepted (every series then flagged) or an overflow: now one line, exit 2."""
    path = tmp_path / "data.parquet"
    pq.write_table(points[0], path)
    bad(tmp_path, ["run", str(path), "--solver", "gd", option, value], message, capsys)


def test_infinite_weights_of_either_sign_are_skipped_points(tmp_path, points):
    """README: a point whose weight is infinite is skipped. -inf was refused as negative."""
    table, _ = points
    weight = np.ones(table.num_rows)
    weight[[3, 50]] = [-np.inf, np.inf]
    path = tmp_path / "data.parquet"
    pq.write_table(table.append_column("weight", pa.array(weight)), path)
    kept = pq.read_table(path).filter(pa.array(np.isfinite(weight)))
    expected = tmp_path / "kept.parquet"
    pq.write_table(kept, expected)
    assert_same_fits(fit(tmp_path, path), fit(tmp_path, expected))
    x, y = (np.array([1.0, 2, 3, 4]), np.array([[1.0, 4, 9, 17]]))
    weights = np.array([[1.0, -np.inf, 1, 1]])
    both = batchfit.fit(x, y, weights=weights, degree=1, dtype="float64")
    np.testing.assert_allclose(both.params[0], np.polyfit(x[[0, 2, 3]], y[0, [0, 2, 3]], 1))


# ---------------------------------------------------------------- output paths (issue 20)


def refused(capsys, *args, message):
    """Exit 2 with one line naming the problem, before any work."""
    assert run_cli("run", *args, "--no-progress", "--no-compile") == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_a_special_file_as_output_is_refused_and_kept(tmp_path, points, capsys):
    """-o FIFO (or a device: here a link to /dev/null) once exited 0 with a regular file in
    its place; as root, -o /dev/null replaced /dev/null."""
    path = tmp_path / "data.parquet"
    pq.write_table(points[0], path)
    fifo, device = tmp_path / "fifo", tmp_path / "null"
    os.mkfifo(fifo)
    os.symlink(os.devnull, device)
    for special in (fifo, device):
        refused(capsys, str(path), "-o", str(special), message="is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet", "fifo", "null"]


def test_history_and_output_of_one_name_are_refused(tmp_path, points, capsys):
    path = tmp_path / "data.parquet"
    pq.write_table(points[0], path)
    same = str(tmp_path / "same.parquet")
    refused(capsys, str(path), "-o", same, "--solver", "gd", "--history", same,
            message="is also the output")
    assert not os.path.exists(same)


@pytest.mark.parametrize("name", ["newdir/", "existing.parquet/"])
def test_an_output_ending_in_a_slash_fails_before_the_fit(tmp_path, points, capsys, name):
    """It once failed only after the whole fit, with the history already replaced and a
    complete temporary file left behind."""
    path = tmp_path / "data.parquet"
    pq.write_table(points[0], path)
    (tmp_path / "existing.parquet").write_bytes(b"older output")
    history = tmp_path / "history.parquet"
    history.write_bytes(b"older history")
    refused(capsys, str(path), "-o", f"{tmp_path}/{name}", "--solver", "gd", "--history",
            str(history), message="ends in '/'")
    assert history.read_bytes() == b"older history"
    assert (tmp_path / "existing.parquet").read_bytes() == b"older output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_an_output_name_near_the_limit_is_written(tmp_path, points):
    """Names of 243-255 bytes were refused: the temporary name beside them was too long."""
    path = tmp_path / "data.parquet"
    pq.write_table(points[0], path)
    out = tmp_path / ("o" * (255 - len(".parquet")) + ".parquet")
    assert run_cli("run", str(path), "-o", str(out), "--no-progress") == 0
    assert pq.read_table(out).num_rows == len(points[1])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    too_long = str(tmp_path / ("o" * 256))
    assert run_cli("run", str(path), "-o", too_long, "--no-progress") == 2


def test_two_links_to_one_file_in_a_directory_are_refused(tmp_path, points, capsys):
    """A duplicate symlink to one file once counted its rows twice, exit 0."""
    directory = tmp_path / "parts"
    directory.mkdir()
    pq.write_table(points[0], directory / "a.parquet")
    os.symlink(directory / "a.parquet", directory / "b.parquet")
    bad(tmp_path, ["run", str(directory)], "holds one file twice: a.parquet and b.parquet",
        capsys)


@pytest.mark.parametrize("ids", [[2**64 - 1], [2**63 - 1, 2**63], [2**64 - 3, 2**64 - 1, 0]])
@pytest.mark.parametrize("layout", ["grouped", "scattered", "list"])
@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_uint64_ids_beyond_int64(tmp_path, rng, ids, layout, loss):
    """Unsigned ids from 2**63 up cannot be int64 codes: they are fitted and written as the
    uint64 ids they are, in every layout and on both paths (sums and chunks)."""
    positions, series = long_table(rng, ids=list(range(len(ids))))
    series = {ids[i]: points for i, points in series.items()}
    table = positions.set_column(0, "series_id", pa.array(
        np.array(ids, np.uint64)[positions.column(0).to_numpy()]))
    if layout == "scattered":
        table = table.take(rng.permutation(table.num_rows))
    elif layout == "list":
        table = pa.table({"series_id": pa.array(ids, pa.uint64()),
                          "x": [list(series[i][0]) for i in ids],
                          "y": [list(series[i][1]) for i in ids]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = fit(tmp_path, tmp_path / "d.parquet", "--loss", loss, *(
        ["--f-scale", "1e9"] if loss == "huber" else []))  # huber, but no point down-weighted
    assert out.schema.field("series_id").type == pa.uint64()
    check_against_polyfit(tmp_path / "fit.coeffs.parquet", series, rtol=1e-6)


# ---------------------------------------------------------------- footers that lie


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def patched_footer(path, old: bytes, new: bytes, last_only=False):
    """Replace ``old`` by ``new`` (same length) in the file's Thrift footer."""
    raw = bytearray(path.read_bytes())
    start = len(raw) - 8 - footer_length(raw)
    footer = bytes(raw[start:-8])
    assert len(old) == len(new) and old in footer
    if last_only:
        at = start + footer.rindex(old)
        raw[at:at + len(old)] = new
    else:
        raw[start:-8] = footer.replace(old, new)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_a_row_group_whose_footer_says_zero_rows_is_refused(tmp_path, capsys, loss):
    """The row group's count (a zigzag varint after Thrift's i64 field header 0x16) says 0,
    written as an over-long varint of the same length; the file's total and the column
    chunks still say 12,345. pyarrow would read the group as empty."""
    table, _ = long_table(np.random.default_rng(2), n_series=500, ragged=False)
    table = table.slice(0, 12_345)
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    count = varint(2 * 12_345)
    patched_footer(path, b"\x16" + count, b"\x16" + b"\x80" * (len(count) - 1) + b"\x00",
                   last_only=True)
    assert pq.ParquetFile(path).metadata.row_group(0).num_rows == 0  # (the patch took)
    (tmp_path / "out.parquet").write_bytes(b"an older output")
    code = run_cli("run", path, "-o", tmp_path / "out.parquet", "--loss", loss)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot read {path} as Parquet: its footer contradicts itself (row group 0 has 0 " \
           "rows but its column 'series_id' 12345 values)" in err
    assert (tmp_path / "out.parquet").read_bytes() == b"an older output"


@pytest.mark.parametrize("fmt", ["long", "list"])
def test_id_statistics_that_lie_are_named_as_the_files_fault(tmp_path, capsys, fmt):
    table, series = long_table(np.random.default_rng(3), ids=list(range(1000, 1100)))
    if fmt == "list":
        table = pa.table({"series_id": list(series), "x": [list(v[0]) for v in series.values()],
                          "y": [list(v[1]) for v in series.values()]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    patched_footer(path, struct.pack("<q", 1099), struct.pack("<q", 1050))
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).statistics.max == 1050
    bad(tmp_path, ["run", path], f"series ids in {path} lie outside the range that its "
        "footer's statistics give (1000 to 1050): the file's metadata is wrong", capsys)



def text_ids(n: int, bad_at: int | None = None) -> pa.Array:
    """String ids id-0, id-1, ...; the one at ``bad_at`` holds a byte that is not UTF-8
    (pyarrow builds such an array from raw buffers without checking them)."""
    texts = [f"id-{i}".encode() for i in range(n)]
    if bad_at is not None:
        texts[bad_at] = b"id-\xf6"
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()),
                                                  pa.py_buffer(b"".join(texts))])


def text_id_table(fmt: str, ids: pa.Array) -> pa.Table:
    n = len(ids)
    x = np.tile(np.linspace(0.0, 1.0, 6), n)
    if fmt == "long":
        return pa.table({"series_id": ids.take(pa.array(np.repeat(np.arange(n), 6))),
                         "x": x, "y": 2 * x})
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * 6)
    return pa.table({"series_id": ids, "x": pa.ListArray.from_arrays(offsets, x),
                     "y": pa.ListArray.from_arrays(offsets, 2 * x)})


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("encoding", ["plain", "dictionary", "damaged page"])
@pytest.mark.parametrize("fmt", ["long", "list"])
def test_string_ids_that_are_not_utf8_are_named_as_the_files_fault(tmp_path, capsys, fmt,
                                                                   encoding, loss):
    """pyarrow's Parquet reader does not check that text is UTF-8: ids whose bytes are not
    were a UnicodeDecodeError naming no file where they became Python strings (MSE), or
    reached the output as they were (the whole-series path). The fuzz found them in a
    damaged dictionary page; here they are written so, or the page is damaged likewise."""
    path = tmp_path / "d.parquet"
    if encoding == "damaged page":  # the high bit of a dictionary entry's first byte
        pq.write_table(text_id_table(fmt, text_ids(20).dictionary_encode()), path,
                       compression="none")
        raw = bytearray(path.read_bytes())
        start = pq.ParquetFile(path).metadata.row_group(0).column(0).dictionary_page_offset
        raw[raw.index(b"id-7", start)] ^= 0x80
        path.write_bytes(bytes(raw))
    else:
        ids = text_ids(20, bad_at=7)
        pq.write_table(text_id_table(fmt, ids.dictionary_encode() if encoding == "dictionary"
                                     else ids), path)
    with pytest.raises(pa.ArrowInvalid, match="UTF8"):
        pq.read_table(path).validate(full=True)  # (the file holds what the test says)
    message = f"cannot read {path}: column 'series_id' holds text that is not valid UTF-8"
    bad(tmp_path, ["run", path, "--loss", loss, "--no-compile"], message, capsys)
    with pytest.raises(ValueError, match=message):
        batchfit.run_job(str(path), str(tmp_path / "out.parquet"), loss=loss, compile=False)


# ---------------------------------------------------------------- extreme magnitudes

MAGNITUDES = {  # name: (x scale, y scale, weight), powers of two so that an oracle is exact
    "y x 2^665 (~1e200)": (1.0, 2.0**665, 1.0),
    "y x 2^-565 (~1e-170)": (1.0, 2.0**-565, 1.0),
    "y x 2^1000 (~1e301)": (1.0, 2.0**1000, 1.0),
    "weights 2^-664 (~1e-200)": (1.0, 1.0, 2.0**-664),
    "weights 5e-324": (1.0, 1.0, 5e-324),
    "weights 2^996 (~1e300)": (1.0, 1.0, 2.0**996),
    "x x 2^332 (~1e100)": (2.0**332, 1.0, 1.0),
    "x x 2^-266 (~1e-80)": (2.0**-266, 1.0, 1.0),
}


def magnitude_series(sx, sy, sw):
    x0 = np.linspace(-1, 2, 15)
    y0 = 1 + 0.5 * x0 + x0**2 + np.random.default_rng(1).normal(0, 0.3, 15)
    return x0 * sx, y0 * sy, np.full(15, sw), (x0, y0)


def scaled_oracle(x0, y0, sx, sy):
    """numpy.polyfit on the unscaled points (uniform weights change nothing), mapped to the
    scaled ones exactly: a = a0 sy / sx^2, b = b0 sy / sx, c = c0 sy."""
    coef, cov = np.polyfit(x0, y0, 2, cov=True)
    powers = np.array([sy / sx**2, sy / sx, sy])
    residual = y0 - np.polyval(coef, x0)
    loss0 = np.mean(residual**2)
    with np.errstate(over="ignore"):  # (beyond float64 it rounds to inf)
        loss = np.ldexp(loss0, 2 * int(np.log2(sy)))
    return {"params": coef * powers, "stderr": np.sqrt(np.diag(cov)) * powers,
            "rmse": np.sqrt(loss0) * sy, "loss": loss,
            "r2": 1 - np.sum(residual**2) / np.sum((y0 - y0.mean())**2)}


@pytest.mark.parametrize("torch_twin", [False, True], ids=["native", "torch twin"])
@pytest.mark.parametrize("name", MAGNITUDES)
def test_extreme_magnitudes_are_fitted_in_a_scaled_frame(tmp_path, monkeypatch, name,
                                                         torch_twin):
    """The MSE job scales each series' y and weights by powers of two (as it maps x onto
    its frame): every number right, against numpy on the unscaled points. A loss beyond
    float64 is inf (|y| ~ 1e200: the true loss is ~1e398), one below its smallest number 0."""
    if torch_twin:
        monkeypatch.setattr(batchfit.moments.native, "library", lambda points=0: None)
    sx, sy, sw = MAGNITUDES[name]
    x, y, w, (x0, y0) = magnitude_series(sx, sy, sw)
    pq.write_table(pa.table({"series_id": np.zeros(15, np.int64), "x": x, "y": y,
                             "weight": w}), tmp_path / "d.parquet")
    row = fit(tmp_path, tmp_path / "d.parquet", "--weight-col", "weight").to_pylist()[0]
    want = scaled_oracle(x0, y0, sx, sy)
    assert row["status"] == "ok" and row["n_points"] == 15
    np.testing.assert_allclose([row["a"], row["b"], row["c"]], want["params"], rtol=1e-9)
    np.testing.assert_allclose([row["a_stderr"], row["b_stderr"], row["c_stderr"]],
                               want["stderr"], rtol=1e-9)
    np.testing.assert_allclose([row["rmse"], row["r2"]], [want["rmse"], want["r2"]],
                               rtol=1e-9)
    if np.isfinite(want["loss"]) and want["loss"] > 1e-300:
        np.testing.assert_allclose(row["loss"], want["loss"], rtol=1e-9)
    else:
        assert row["loss"] == want["loss"]


@pytest.mark.parametrize("name", MAGNITUDES)
def test_extreme_magnitudes_on_the_iterative_path(tmp_path, name):
    """The iterative solvers scale each series' weights (no fit depends on their scale) and
    fit x in its frame; y they take as it is, so a series whose |y| lies beyond 2^+-250 gets
    the status out_of_range and no numbers, never `ok` with wrong ones."""
    sx, sy, sw = MAGNITUDES[name]
    x, y, w, (x0, y0) = magnitude_series(sx, sy, sw)
    pq.write_table(pa.table({"series_id": np.zeros(15, np.int64), "x": x, "y": y,
                             "weight": w}), tmp_path / "d.parquet")
    row = fit(tmp_path, tmp_path / "d.parquet", "--weight-col", "weight", "--loss", "huber",
              "--f-scale", "1e9").to_pylist()[0]  # (no point beyond f_scale: MSE's fit)
    if sy != 1:
        assert row["status"] == "out_of_range" and row["a"] is None and row["rmse"] is None
        return
    want = scaled_oracle(x0, y0, sx, sy)
    assert row["status"] == "ok"
    np.testing.assert_allclose([row["a"], row["b"], row["c"]], want["params"], rtol=1e-7)
    np.testing.assert_allclose([row["a_stderr"], row["b_stderr"], row["c_stderr"]],
                               want["stderr"], rtol=1e-6)
    np.testing.assert_allclose([row["rmse"], row["r2"]], [want["rmse"], want["r2"]],
                               rtol=1e-7)


@pytest.mark.parametrize("name", ["y x 2^665 (~1e200)", "y x 2^-565 (~1e-170)"])
def test_extreme_magnitudes_choose_their_degree(tmp_path, name):
    """--degree auto compares each series' losses in its own scale of y: at |y| ~ 1e200 the
    true losses are all inf, their ratios are not."""
    sx, sy, sw = MAGNITUDES[name]
    x, y, _, (x0, y0) = magnitude_series(sx, sy, sw)
    pq.write_table(pa.table({"series_id": np.zeros(15, np.int64), "x": x, "y": y}),
                   tmp_path / "d.parquet")
    row = fit(tmp_path, tmp_path / "d.parquet", "--degree", "auto").to_pylist()[0]
    assert row["degree"] == 2 and row["status"] == "ok"
    np.testing.assert_allclose(row["p2"], scaled_oracle(x0, y0, sx, sy)["params"][0],
                               rtol=1e-9)


@pytest.mark.parametrize("torch_twin", [False, True], ids=["native", "torch twin"])
def test_extreme_magnitudes_in_python(monkeypatch, torch_twin):
    """``batchfit.fit`` on arrays (the dense path) scales as the job does."""
    if torch_twin:
        monkeypatch.setattr(batchfit.moments.native, "library", lambda points=0: None)
    rows = [magnitude_series(*MAGNITUDES[name]) for name in MAGNITUDES]
    result = batchfit.fit(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                          weights=np.stack([r[2] for r in rows]), dtype="float64")
    for i, name in enumerate(MAGNITUDES):
        sx, sy, _ = MAGNITUDES[name]
        want = scaled_oracle(*rows[i][3], sx, sy)
        assert result.status_labels()[i] == "ok"
        np.testing.assert_allclose(result.params[i].numpy(), want["params"], rtol=1e-9)
        np.testing.assert_allclose(result.stderr[i].numpy(), want["stderr"], rtol=1e-9)
