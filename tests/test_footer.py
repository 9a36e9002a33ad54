"""The Parquet footer vetting (``batchfit.io.footer``): valid footers of every column type
and writer option pass it; a damaged one is refused where pyarrow's column-chunk accessors
would abort the process (tests/test_fuzz.py's test_a_damaged_parquet_footer_is_an_error_not_an_abort
pins the fuzz's finding), and every one-byte change of a footer is either refused or safe
for every accessor batchfit reads (checked in a child process, where an abort is seen)."""

import decimal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchfit.io.footer import vet
from batchfit.io.sources import ParquetSource

N = 1000


def every_type() -> pa.Table:
    return pa.table({
        "i8": pa.array(np.arange(N) % 100, pa.int8()),
        "u64": pa.array(np.arange(N, dtype=np.uint64) + np.uint64(2**63), pa.uint64()),
        "f16": pa.array(np.ones(N, np.float16), pa.float16()),
        "f32": pa.array(np.ones(N), pa.float32()),
        "flag": pa.array(np.arange(N) % 2 == 0),
        "text": pa.array([str(i) for i in range(N)]),
        "fixed": pa.array([b"abcd"] * N, pa.binary(4)),
        "dec": pa.array([decimal.Decimal("1.25")] * N, pa.decimal128(10, 2)),
        "wide": pa.array([decimal.Decimal("1.25")] * N, pa.decimal128(30, 2)),
        "ts": pa.array(np.arange(N).astype("datetime64[s]")),
        "list": pa.array([[1.0, 2.0]] * N, pa.list_(pa.float64())),
        "nested": pa.array([[[1]]] * N, pa.list_(pa.list_(pa.int32()))),
        "struct": pa.array([{"a": 1, "b": [1.0]}] * N),
        "dict": pa.array(["x"] * N).dictionary_encode(),
        "nulls": pa.array([None] * N, pa.float64()),
    })


@pytest.mark.parametrize("options", [
    {}, {"write_page_index": True}, {"version": "1.0"}, {"write_statistics": False},
    {"store_decimal_as_integer": True}, {"use_dictionary": False, "compression": "zstd"},
    {"data_page_version": "2.0"}])
def test_valid_footers_of_every_type_pass(tmp_path, options):
    path = tmp_path / "ok.parquet"
    pq.write_table(every_type(), path, row_group_size=100, **options)
    vet(pq.ParquetFile(path).metadata, str(path))
    source = ParquetSource(str(path))
    bounds = None if options.get("write_statistics") is False else (2**63, 2**63 + N - 1)
    assert source.id_bounds("u64") == bounds
    assert source.id_bounds("text") is None  # (statistics of text are not read)


SWEEP = textwrap.dedent("""
    import collections, io, os, sys, tempfile
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    from batchfit.io.sources import ParquetSource
    stride = int(sys.argv[1])
    table = pa.table({"series_id": np.repeat(np.arange(30), 10), "x": np.arange(300.0),
                      "y": np.ones(300), "l": pa.array([[1.0]] * 300, pa.list_(pa.float64())),
                      "sid": pa.array([str(i) for i in np.repeat(np.arange(30), 10)])})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=100)
    raw = buf.getvalue()
    start = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    path = os.path.join(tempfile.mkdtemp(), "d.parquet")
    counts = collections.Counter()
    for at in range(start, len(raw) - 8, stride):
        for value in (raw[at] ^ 0x01, raw[at] ^ 0x40, 0xFF):
            data = bytearray(raw)
            data[at] = value
            with open(path, "wb") as f:
                f.write(bytes(data))
            try:
                source = ParquetSource(path)
            except ValueError:
                counts["refused"] += 1
                continue
            for column in table.column_names:  # (what batchfit reads of the chunks)
                source.id_bounds(column)
            meta = source.handle.metadata
            for group in range(meta.num_row_groups):
                for i in range(meta.num_columns):
                    meta.row_group(group).column(i).num_values
            counts["passed"] += 1
    print(counts["refused"], counts["passed"])
""")


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 7])
def test_every_one_byte_change_of_a_footer_is_refused_or_safe(stride):
    """Without the vetting, pyarrow aborts within the first few hundred changes (a level
    histogram's size, SIGABRT); a Python exception (undecodable text) fails here too."""
    done = subprocess.run([sys.executable, "-c", SWEEP, str(stride)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    refused, passed = map(int, done.stdout.split())
    assert refused > 0 and passed > 0, done.stdout  # (both kinds of change were made)
