"""Guards inside batchfit that no output shows until they fail: the parallel reader's threads
stop with their consumer, the native kernel's wrappers check what they hand to C (and keep
a table the kernel refused to replace), and dense series codes are sized for the job."""

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchfit
from batchfit import io
from batchfit.io import dataset as dataset_module
from batchfit.io.series_codes import DenseCodes, HashedCodes, dense_row_bytes
from batchfit.moments import layout, native


def test_ordered_streams_do_not_keep_a_consumer_that_stops_waiting():
    """Workers whose queues are full when the consumer stops (closes the generator, or
    raises) still hand over nothing more: the pool's shutdown returns. In a subprocess, so
    that a regression fails (faulthandler ends it) instead of hanging the suite."""
    code = textwrap.dedent("""
        import faulthandler, time
        faulthandler.dump_traceback_later(30, exit=True)
        from batchfit.io.ordered_pool import ordered_streams

        def stream(task):  # task: (items, raise after them)
            yield from range(task[0])
            if task[1]:
                raise ValueError("a bad piece")

        def consume(items, fail):
            for _ in items:
                time.sleep(0.3)  # (meanwhile the workers fill their queues of 2)
                if fail:
                    raise RuntimeError("the consumer failed")
                break

        for tasks in ([(2, False)] * 7, [(2, True)] * 7, [(200, False)] * 7):
            for fail in (False, True):
                items = ordered_streams(tasks, stream, workers=3, depth=2)
                try:
                    consume(items, fail)
                except RuntimeError:
                    pass
                items.close()
        print("returned")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "returned"), done.stderr[-3000:]


@pytest.fixture
def kernel():
    if native.library() is None:
        pytest.skip("no native kernel on this machine (no C compiler)")


def test_reserve_keeps_the_old_table_when_the_kernel_refuses_a_new_one(kernel, monkeypatch):
    agg = native.Aggregator(2, False, True, rows=4)
    agg.add(np.array([0, 1, 1]), [0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    table, seen = agg.table, agg.seen
    monkeypatch.setattr(agg.lib, "bf_set_table", lambda *args: -2)  # (out of memory)
    with pytest.raises(MemoryError, match="reserve: out of memory"):
        agg.reserve(1000)
    assert agg.rows == 4 and agg.table is table and agg.seen is seen
    monkeypatch.undo()
    agg.add(np.array([2, 3, 3]), [0.0, 1.0, 2.0], [5.0, 6.0, 7.0])  # into the old table
    assert agg.finish()[:, layout.NPTS].tolist() == [1, 2, 1, 2]
    agg.reserve(1000)  # and it still grows when the kernel agrees
    assert agg.rows == 1000 and agg.finish(4)[:, layout.NPTS].tolist() == [1, 2, 1, 2]


def test_the_kernel_wrappers_refuse_arrays_that_c_would_misread(kernel):
    rows, k = 8, 3  # degree 2, weighted: out has 2 (k + 1) columns
    agg = native.Aggregator(2, True, True, rows=rows)
    codes, x, y, w = np.arange(4), np.linspace(0, 1, 4), np.ones(4), np.ones(4)
    agg.add(codes, x, y, w)
    agg.finish()
    good = {"flagged": np.ones(rows, np.uint8), "q": np.zeros((rows, k)),
            "out": np.zeros((rows, 2 * (k + 1)))}
    agg.residual(codes, x, y, w, **good)
    read_only = np.zeros((rows, 2 * (k + 1)))
    read_only.flags.writeable = False
    bad = [("flagged", np.ones(rows, bool)), ("flagged", np.ones((rows, 1), np.uint8)),
           ("flagged", np.ones(rows + 1, np.uint8)),  # more rows than the table
           ("q", np.zeros((rows, k), np.float32)), ("q", np.zeros((rows, k + 1))),
           ("q", np.zeros((rows - 1, k))), ("q", np.zeros((k, rows)).T),
           ("out", np.zeros((rows, k + 1))), ("out", np.zeros((rows, 4 * (k + 1)))[:, ::2]),
           ("out", read_only)]
    for name, value in bad:
        with pytest.raises(ValueError, match=r"residual: .*\(a bug in batchfit\)"):
            agg.residual(codes, x, y, w, **{**good, name: value})
    with pytest.raises(ValueError, match=r"not one value per point \(a bug in batchfit\)"):
        agg.residual(codes, x[:3], y, w, **good)
    with pytest.raises(ValueError, match=r"not one value per point \(a bug in batchfit\)"):
        agg.add(codes, x, y, w[:2])

    with pytest.raises(ValueError, match=r"finish: 9 rows asked of a table of 8 \(a bug"):
        agg.finish(rows + 1)
    with pytest.raises(ValueError, match=r"finish: -1 rows"):
        agg.finish(-1)

    table = layout.new_table(5, 2, True)
    native.merge(table, table.copy(), 2, True)
    for dst, src in [(table, layout.new_table(4, 2, True)),  # rows
                     (layout.new_table(5, 2, False), layout.new_table(5, 2, False)),  # width
                     (table, table.astype(np.float32)), (table.astype(np.float32), table),
                     (np.asfortranarray(table), table), (table, np.asfortranarray(table)),
                     (table[:, 0], table[:, 0].copy())]:
        with pytest.raises(ValueError, match=r"merge: .*\(a bug in batchfit\)"):
            native.merge(dst, src, 2, True)


def test_dense_codes_are_sized_for_the_jobs_degree_and_weights(tmp_path, monkeypatch):
    """Dense codes take a row of statistics per id in the ids' range: degree 10 weighted
    needs more than 584 bytes a row (its statistics alone), degree 2 far less."""
    span = 1000
    x = np.tile(np.linspace(0, 1, 12), span)
    table = pa.table({"series_id": np.repeat(np.arange(span), 12), "x": x, "y": x**2,
                      "weight": np.ones(len(x))})
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path)
    small, big = dense_row_bytes(2, True), dense_row_bytes(10, True)
    assert big > layout.width(10, True) * 8 > small
    # memory that holds a quarter's worth of degree-2 rows, not of degree-10 ones
    monkeypatch.setattr(dataset_module, "_available_memory", lambda: 4 * span * (small + big) // 2)
    dataset = io.Dataset(path, io.ColumnSpec())
    assert isinstance(dataset.series_codes(degree=2), DenseCodes)
    assert isinstance(dataset.series_codes(degree=10), HashedCodes)

    kinds, series_codes = [], io.Dataset.series_codes

    def spy(self, *args, **kwargs):
        codes = series_codes(self, *args, **kwargs)
        kinds.append(type(codes).__name__)
        return codes

    monkeypatch.setattr(io.Dataset, "series_codes", spy)
    for degree in (10, 2):
        batchfit.run_job(path, str(tmp_path / f"o{degree}.parquet"), degree=degree)
    assert kinds == ["HashedCodes", "DenseCodes"]


def test_the_kernel_refusing_a_table_for_want_of_memory_keeps_its_old_one(kernel, tmp_path):
    """The real ``bf_set_table`` under an address-space limit that its bucket region (about
    256 MB of reserved pages) exceeds: it must refuse, keep its old buffers and table, go on
    summing scattered points into them, and free cleanly (before, it had released the old
    region and kept pointers to it)."""
    script = """
import resource, sys
import numpy as np
from batchfit.moments import layout
from batchfit.moments import native
agg = native.Aggregator(2, False, True, rows=4)
codes = np.array([3, 0, 2, 1, 0, 3]); x = np.arange(6.0); y = x**2
agg.add(codes, x, y)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), hard))
try:
    agg.reserve(1 << 17)  # an 18 MB table (allowed), then the region (refused)
except MemoryError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
agg.add(codes, x, y)  # scattered: through the buckets of the old region
print(agg.rows, agg.finish()[:, layout.NPTS].tolist())
del agg
print("freed")
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: reserve: out of memory"), done.stdout
    assert lines[1:] == ["4 [4.0, 2.0, 2.0, 4.0]", "freed"]


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    from batchfit.app.cli import main
    from batchfit.app.generate import generate

    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    (tmp_path / "o.parquet").write_bytes(b"an older output")

    def refuse(self, rows):
        raise MemoryError("Unable to allocate 144. MiB for an array")

    monkeypatch.setattr(native.Aggregator, "reserve", refuse)
    assert main(["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert err == "batchfit: error: out of memory: Unable to allocate 144. MiB for an array\n"
    assert (tmp_path / "o.parquet").read_bytes() == b"an older output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "d.truth.parquet",
                                                          "o.parquet"]
