"""The fuzz suite of "Nothing lost, nothing silently wrong": random tables, random byte
damage and random option mixes through ``batchfit run`` (in-process, ``batchfit.app.cli.main``,
``--no-progress --no-compile``), each case checked against the promise of README ("The
Parquet job", "Exit codes and errors", "Interrupted runs and --resume").

What is generated
  * tables: ``test_hostile.datasets()`` / ``write_case`` (reused): long or list layout; ids
    int8/int32/int64/uint16, uint64 about 2**63 and near 2**64, string/large_string and
    dictionary, widths varying between files; x/y/weight int8..int64, uint8, float16/32/64,
    decimal128, dictionary; nulls, NaN, +-inf, null lists; null ids, repeated list ids,
    negative weights; 1-3 files, rows shuffled. Each file is then kept as Parquet, or
    rewritten as Arrow IPC (file or stream, uncompressed/lz4/zstd, random batch sizes) or,
    for long layout, as CSV (values as float64, written with round-trip precision);
  * option mixes: ``--degree 0..4|auto|auto:2``, ``--loss mse|huber`` (``--f-scale`` 0.5, 30,
    100, 1e9 or the default), ``--dtype float64|float32``, ``--weight-col weight`` or not,
    ``--batch-size 1..40`` or the default, ``--history`` (new file, older file, FIFO),
    ``--resume``, ``--format`` and ``--input-format`` given (right or wrong) or not, a CSV
    copy beside Parquet parts; OUTPUT absent, an older file, the default name, a FIFO, a
    directory (the local engine writes one Parquet file: a directory is refused), a name
    ending in '/';
  * byte damage to one file of a Parquet, CSV or Arrow IPC input: a flipped byte, 1-8 bytes
    overwritten, the file truncated, or up to 500 bytes cut out, anywhere or near the end.

What every case must show
  * exit 0, or exit 2 with exactly one stderr line starting ``batchfit: error: ``; never a
    traceback (an exception escaping ``main`` fails the case), never a crash;
  * where the inputs or options are bad (known in advance from README's rules), exit 2 with
    the reason (one of the messages the case's faults give);
  * a FIFO given as ``-o`` or ``--history`` is still that FIFO; a directory given as ``-o``
    is untouched; an older output and an older history are byte-identical after a failed
    run; a failed run creates no output and no history; the input files are unchanged;
  * no temporary files (names starting with '.') in the output's or the input's directory,
    and no ``--resume`` checkpoint after a successful run;
  * exit 0: each input series exactly once (the ids compared by value), the output's
    coefficient columns as README names them, statuses among README's five, ``n_points`` the
    number of points with finite x, y, weight and weight > 0. In float64, the numbers equal
    a float64 oracle: MSE, ``numpy.polyfit(x, y, d, w=sqrt(weight))`` (rtol 1e-6 on the
    coefficients, 1e-6 of max|y| on the fitted values; degree 2 by ``test_hostile.
    check_series`` itself); ``too_few_points`` below d + 1 points, ``singular`` below d + 1
    distinct x, either verdict where the frame's design has condition > 1e5; ``--degree
    auto``: the chosen degree minimises README's BIC among the candidates (within the
    rounding of the losses), higher coefficients 0, the rest polyfit's at that degree;
    huber: an ``ok`` fit's weighted mean Huber loss is within 1e-6 (relative, the solver's
    ``--tol``) of a float64 IRLS minimum, and the ``loss`` column is that loss (with
    ``--f-scale 1e9``, Huber is least squares: polyfit, rtol 1e-6); ``not_converged`` and
    ``diverged`` are honest statuses whose numbers are not promised (only their ``loss``
    column must be their curve's), counted by whether the minimum was flat or strict. In
    float32 only the structure and statuses are checked (and ``ok`` coefficients finite).

What is honestly checkable for damaged files
  Without page checksums (pyarrow writes none by default), a changed byte in a data page is
  new data, not detectable damage: a flipped digit in a CSV, a changed id or value in a
  Parquet or IPC page. So a damaged input may succeed, and "ids a subset of the undamaged
  ids" would not be a promise. What is checked instead is differential: the damaged files
  are decoded by pyarrow's own reader (all columns batchfit reads; for IPC with full
  validation). Where that reader decodes them, exit 0 must give exactly what the undamaged
  rules give for the decoded data (each decoded series once, the same ``n_points``, and
  the float64 oracle's numbers for series whose values are sane, |v| <= 1e6), and where
  those data break a rule (a negative weight, a null id) the run must fail. Where the
  reference reader refuses the file, exit 0 is checked for structure only (a readable
  output, each id at most once, valid statuses), and counted apart. An IPC file that fails
  pyarrow's full validation must not crash either. Damaged inputs are run in a worker
  process (``Sandbox``: ``main`` in-process there, restarted after a crash), so that a
  crash is seen as one: they must exit 0 or 2, never die of a signal.

Issues found, each pinned by its own test at the end of this file, all fixed (while one is
open, ``BATCHFIT_FUZZ_TOLERATE_KNOWN=1`` counts it by its signature instead of failing, to
explore beyond it):
  * test_a_damaged_ipc_file_is_an_error_not_a_crash: damaged IPC string offsets crash
    batchfit (SIGSEGV/SIGBUS): IPC batches are read without validation;
  * test_a_damaged_parquet_footer_is_an_error_not_an_abort: one byte of a Parquet footer
    (a size-statistics list header) aborts batchfit (SIGABRT in pyarrow's metadata
    accessors, which batchfit's footer check calls; pyarrow's reader raises instead):
    now ``io/footer.py`` vets the footer's Thrift structures first;
  * test_a_footer_schema_pyarrow_cannot_read_is_an_error: a damaged ``ARROW:schema``
    entry (an int of 128 bits) escapes as ArrowNotImplementedError: traceback, exit 1;
  * test_scattered_int8_ids_on_the_points_path_keep_every_series: int8 ids, rows scattered,
    an iterative solver: series are missing from the output, exit 0;
  * test_an_empty_list_series_with_an_iterative_solver: an empty or null list with an
    iterative solver: IndexError traceback;
  * test_an_exact_huber_fit_is_not_diverged: an interpolating weighted huber fit says
    diverged (its rounding noise was above ten times a start loss of 0);
  * test_auto_degree_too_few_points_has_null_coefficients: ``--degree auto``, a series
    without points has coefficients 0.0 instead of null;
  * test_a_failed_resume_run_leaves_no_checkpoint: a ``--resume`` run that fails on bad
    data (exit 2) leaves ``.NAME.resume/`` behind.

Tiers: the fast tier runs FAST_EXAMPLES cases per test function (450 in all, about 50 s
on 2 cores); the ``slow`` variants run the same checks on ``BATCHFIT_FUZZ_EXAMPLES`` cases
per function (default SLOW_EXAMPLES; a fifth of that for damaged IPC: 1,540 cases, about
1.7 minutes), without shrinking a failure (which can take minutes; the fast tier and the
issue tests give minimal cases). At the end of the module a line gives the cases run and
how their outcomes split (also written as JSON to ``$BATCHFIT_FUZZ_REPORT`` when set).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import math
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as paipc
import pyarrow.parquet as pq
import pytest
import test_hostile as hostile  # its datasets(), write_case() and check_series()
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from test_job import bad, run_cli

HANG_SECONDS = 300
# (the fast tier's draws, kept small so that tier stays under 3 minutes; the slow twins draw
# SLOW_EXAMPLES each, and CI runs them)
FAST_EXAMPLES = {"promise": 120, "damage": 150, "damage_ipc": 100}
SLOW_EXAMPLES = 700
SLOW = int(os.environ.get("BATCHFIT_FUZZ_EXAMPLES", str(SLOW_EXAMPLES)))
STATUSES = {"ok", "too_few_points", "singular", "not_converged", "diverged", "out_of_range"}
EPS = np.finfo(np.float64).eps
HUBER_TOL = 1e-6  # the iterative solvers' --tol: relative excess loss
SANE = 1e6  # damaged values beyond this are not compared with the oracle
# The issues found (each pinned by its own test at the end of the file) fail the fuzz too;
# BATCHFIT_FUZZ_TOLERATE_KNOWN=1 counts them instead (by their signatures), to explore
# beyond them and to time the tiers while they are open.
STRICT = os.environ.get("BATCHFIT_FUZZ_TOLERATE_KNOWN", "0") != "1"

OUTCOMES: dict[str, Counter] = defaultdict(Counter)
SECONDS: Counter = Counter()


def fuzz_settings(examples: int, shrink: bool = True):
    """``shrink=False`` (the slow tier): a failure is reported as found, not minimised,
    which keeps the tier's time bounded (the fast tier and the issue tests shrink)."""
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    return settings(max_examples=examples, deadline=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def never_hang():
    """A watchdog: fires even while the main thread is stuck in C code (or on a FIFO)."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module", autouse=True)
def outcome_report(pytestconfig):
    """At the end of the module: how many cases ran, and how their outcomes split."""
    yield
    if not OUTCOMES:
        return
    report = {"groups": {name: dict(counts) for name, counts in sorted(OUTCOMES.items())},
              "seconds": {name: round(s, 1) for name, s in sorted(SECONDS.items())}}
    tests = [name for name in OUTCOMES if name in SECONDS]
    report["exit0"] = sum(OUTCOMES[name]["exit0"] for name in tests)
    report["exit2"] = sum(OUTCOMES[name]["exit2"] for name in tests)
    report["known"] = sum(OUTCOMES["known_traceback"].values())
    report["cases"] = report["exit0"] + report["exit2"] + report["known"]
    path = os.environ.get("BATCHFIT_FUZZ_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1, sort_keys=True)
    lines = [(f"test_fuzz: {report['cases']} cases: exit 0 {report['exit0']}, exit 2 "
              f"{report['exit2']}, known tracebacks {report['known']}")]
    lines += [f"  {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + (f" ({report['seconds'][name]} s)" if name in SECONDS else "")
              for name, counts in sorted(OUTCOMES.items())]
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines), file=sys.stderr)


# ---------------------------------------------------------------- running the CLI


def run_in_process(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(*args)
    return code, err.getvalue()


def run_or_known(args, data) -> tuple[int, str] | None:
    """``run_in_process``, or None for the known traceback of an empty list series (see
    test_an_empty_list_series_with_an_iterative_solver), counted where tolerated."""
    try:
        return run_in_process(args)
    except IndexError as exc:
        if STRICT or data["fmt"] != "list" or "non-zero size" not in str(exc):
            raise
        OUTCOMES["known_traceback"]["empty_list_series"] += 1
        return None


def run_in_subprocess(args, cwd) -> tuple[int, str]:
    """For inputs that may crash the process: a signal comes back as a negative code."""
    env = {**os.environ, "BATCHFIT_BACKGROUND": "0", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run([sys.executable, "-m", "batchfit", *map(str, args)], cwd=cwd, check=False,
                          env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, timeout=180)
    return done.returncode, done.stderr


WORKER = """
import contextlib, io, json, sys, traceback
from batchfit.app.cli import main
for line in sys.stdin:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(json.loads(line))
        except BaseException:
            err.write(traceback.format_exc())
            code = 1
    sys.stdout.write(json.dumps([code, err.getvalue()]) + "\\n")
    sys.stdout.flush()
"""


class Sandbox:
    """A worker process that runs ``main`` for inputs that may crash a process: a crash
    comes back as a negative code (the signal), and the next call starts a new worker."""

    def __init__(self):
        self.process = None
        self.log = None

    def run(self, args) -> tuple[int, str]:
        if self.process is None:
            self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives with the worker)
            env = {**os.environ, "BATCHFIT_BACKGROUND": "0", "PYTHONFAULTHANDLER": "1"}
            self.process = subprocess.Popen([sys.executable, "-c", WORKER], env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self.log, text=True)
        self.process.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if line:
            code, err = json.loads(line)
            return code, err
        code = self.process.wait()
        self.log.seek(0)
        err = self.log.read()
        self.close()
        return code, err

    def close(self):
        if self.process is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            self.process.wait()
            self.process.stdout.close()
            self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


SANDBOX = Sandbox()


@pytest.fixture(scope="module", autouse=True)
def sandbox():
    yield SANDBOX
    SANDBOX.close()


def command_line(args) -> str:
    return "batchfit " + " ".join(shlex.quote(str(a)) for a in args)


def one_case(tmp_path_factory, check, case, name):
    """One example: its own directory (removed when it passed) and watchdog, timed."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)  # restart: per example
    base = tmp_path_factory.mktemp(name)
    started = time.perf_counter()
    try:
        check(base, case, name)
    finally:
        SECONDS[name] += time.perf_counter() - started
    shutil.rmtree(base)


# ---------------------------------------------------------------- input files


def part_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))


def write_ipc(table: pa.Table, path: Path, stream: bool, compression, chunk: int):
    table = table.unify_dictionaries().combine_chunks()  # (a file holds one dictionary)
    options = paipc.IpcWriteOptions(compression=compression)
    opener = paipc.new_stream if stream else paipc.new_file
    with opener(str(path), table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)


def plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return pa.chunked_array([c.dictionary_decode() for c in column.chunks],
                                column.type.value_type)
    return column


def csv_table(table: pa.Table) -> pa.Table:
    """A long-format part as CSV holds it: ids as they are (dictionaries decoded), values
    as float64 (written with round-trip precision, so read back exactly)."""
    columns = {}
    for name in table.column_names:
        column = plain(table[name])
        if name != "series_id":
            column = column.cast(pa.float64(), safe=False)
        columns[name] = column
    return pa.table(columns)


def write_input(data: dict, file_format: str, ipc_style: dict, base: Path):
    """The dataset as ``file_format`` files in ``base/input``; returns the input path, the
    files, and write_case's oracle ({id: (x, y, w)}, errors) for Parquet and IPC (their
    types are kept), or None for CSV (its oracle is derived from what the files read as)."""
    staging = base / "staging"
    staging.mkdir()
    series, errors = hostile.write_case(data, staging)
    directory = base / "input"
    directory.mkdir()
    files = []
    for i, part in enumerate(part_files(staging)):
        if file_format == "parquet":
            target = directory / part.name
            os.replace(part, target)
        elif file_format == "ipc":
            ext = [".arrow", ".feather"][i % 2] if not ipc_style["stream"] else \
                [".arrows", ".ipc"][i % 2]
            target = directory / f"part-{i}{ext}"
            write_ipc(pq.read_table(part), target, ipc_style["stream"],
                      ipc_style["compression"], ipc_style["chunk"])
        else:
            target = directory / f"part-{i}.csv"
            pacsv.write_csv(csv_table(pq.read_table(part)), str(target))
        files.append(target)
    shutil.rmtree(staging)
    path = directory if len(files) > 1 else files[0]
    return path, files, ((series, errors) if file_format != "csv" else None)


# ---------------------------------------------------------------- the reference oracle


def floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)


def kind_of(type_: pa.DataType) -> str:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if pa.types.is_integer(type_):
        return "int"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "str"
    return "null" if pa.types.is_null(type_) else "other"


def is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or \
        pa.types.is_fixed_size_list(type_)


def is_number(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or \
        pa.types.is_decimal(type_) or pa.types.is_null(type_)


def reference_oracle(tables: list[pa.Table], weight_named: bool):
    """README's rules applied to decoded tables (one per file): ({id: (x, y, w)}, errors).
    ``errors`` lists the messages a run may stop with (any one of them)."""
    tables = [t for t in tables if t.num_rows]  # zero-row files are skipped
    if not tables:
        return {}, ["empty input"]
    errors = []
    for t in tables:
        for column in ("series_id", "x", "y"):
            if column not in t.column_names:
                errors.append(f"missing column '{column}'")
    if errors:
        return {}, errors
    has_w = ["weight" in t.column_names for t in tables]
    if weight_named and not all(has_w):
        errors.append("missing column 'weight'")
    if len(set(has_w)) > 1:
        errors.append("does not match")
    layouts = {is_list(t.schema.field("x").type) for t in tables}
    if len(layouts) > 1:
        errors.append("does not match")
    kinds = {kind_of(t.schema.field("series_id").type) for t in tables}
    if kinds & {"null", "other"}:
        errors += ["must hold integers or strings", "has null ids"]
    elif len(kinds) > 1:
        errors.append("series ids are")
    for t in tables:
        for column in ("x", "y", "weight"):
            if column in t.column_names:
                type_ = t.schema.field(column).type
                inner = type_.value_type if is_list(type_) else type_
                if not is_number(inner) or (is_list(type_) != is_list(t.schema.field("x").type)):
                    errors += ["must be numeric", "must be a list of numbers", "does not match"]
    if errors:
        return {}, errors
    weighted = has_w[0]
    listed = layouts.pop()
    series: dict = {}
    negative = False
    for t in tables:
        ids = t["series_id"].to_pylist()
        if None in ids:
            errors.append("has null ids")
        if not listed:
            x, y = floats(t["x"].to_pylist()), floats(t["y"].to_pylist())
            w = floats(t["weight"].to_pylist()) if weighted else np.ones(len(x))
            negative |= bool(np.any((w < 0) & np.isfinite(w)))
            for sid in set(ids):
                keep = np.array([i == sid for i in ids])
                old = series.get(sid, (np.zeros(0),) * 3)
                series[sid] = tuple(np.concatenate([o, v[keep]])
                                    for o, v in zip(old, (x, y, w)))
            continue
        xs, ys = t["x"].to_pylist(), t["y"].to_pylist()
        ws = t["weight"].to_pylist() if weighted else [None if v is None else [1.0] * len(v)
                                                        for v in xs]
        for sid, xv, yv, wv in zip(ids, xs, ys, ws):
            if sid in series:
                errors.append("series ids repeat in list format")
            if xv is None or yv is None or (weighted and wv is None):
                series[sid] = (np.zeros(0),) * 3
                continue
            if not (len(xv) == len(yv) == len(wv)):
                errors.append("values but")
                continue
            w = floats(wv)
            negative |= bool(np.any((w < 0) & np.isfinite(w)))
            series[sid] = (floats(xv), floats(yv), w)
    if negative:
        errors.append("weights must be >= 0")
    return series, errors


def decode_reference(files: list[Path], file_format: str) -> list[pa.Table] | None:
    """The files as pyarrow's own readers decode them (IPC fully validated), or None."""
    tables = []
    try:
        for file in files:
            table = pq.read_table(file) if file_format == "parquet" else \
                pacsv.read_csv(str(file)) if file_format == "csv" else read_ipc(file)
            table.validate(full=True)  # (strings that are not UTF-8, offsets)
            tables.append(table)
    except (pa.ArrowException, OSError, ValueError):
        return None
    return tables


def read_ipc(file: Path) -> pa.Table:
    """An IPC file or stream, read whole (not validated beyond what the reader does)."""
    with open(file, "rb") as handle:
        source = pa.BufferReader(handle.read())
    if source.read(6) == b"ARROW1":
        source.seek(0)
        reader = paipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    else:
        source.seek(0)
        reader = paipc.open_stream(source)
        batches = list(reader)
    return pa.Table.from_batches(batches, reader.schema)


def ipc_state(files: list[Path]) -> str:
    """valid; unreadable (pyarrow's reader itself refuses it, as batchfit's will); or
    invalid: read, but pyarrow's full validation fails (offsets out of bounds...): a
    reader that trusts such batches may read outside them."""
    for file in files:
        try:
            table = read_ipc(file)
        except (pa.ArrowException, OSError, ValueError):
            return "unreadable"
        try:
            table.validate(full=True)
        except (pa.ArrowException, ValueError):
            return "invalid"
    return "valid"


def ipc_valid(files: list[Path]) -> bool:
    return ipc_state(files) == "valid"


def same_points(a, b) -> bool:
    def used(x, y, w):
        keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (w > 0)
        return sorted(zip(x[keep].tolist(), y[keep].tolist(), w[keep].tolist()))
    return used(*a) == used(*b)


# ---------------------------------------------------------------- the numeric oracle


def used_points(x, y, w):
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (w > 0)
    return x[keep], y[keep], w[keep]


def verdict(x, w, d) -> str:
    """What a degree-d fit of these (used) points must say: too_few, singular, ambiguous
    (the frame's design has condition > 1e5: ok or singular) or ok."""
    if len(x) < d + 1:
        return "too_few"
    if len(np.unique(x)) < d + 1:
        return "singular"
    if d == 0:
        return "ok"
    t = (x - (x.max() + x.min()) / 2) / ((x.max() - x.min()) / 2)
    design = np.vander(t, d + 1) * np.sqrt(w)[:, None]
    return "ambiguous" if np.linalg.cond(design) > 1e5 else "ok"


def close_to_polyfit(got, x, y, w, d, rtol=1e-6):
    want = np.polyfit(x, y, d, w=np.sqrt(w))
    got = np.asarray(got, np.float64)
    scale = np.abs(y).max() + 1
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1))
    np.testing.assert_allclose(np.polyval(got, x), np.polyval(want, x), rtol=0,
                               atol=rtol * scale)


def check_status(row, coefs, v):
    if v == "too_few":
        assert row["status"] == "too_few_points" and all(c is None for c in coefs), row
        return False
    if v == "singular":
        assert row["status"] == "singular" and all(c is None for c in coefs), row
        return False
    if v == "ambiguous":
        assert row["status"] in ("ok", "singular"), row
        return False
    assert row["status"] == "ok", row
    return True


def check_poly(row, names, x, y, w, d):
    if d == 2 and names == ["a", "b", "c"]:
        return hostile.check_series(row, x, y, w)
    x, y, w = used_points(x, y, w)
    assert row["n_points"] == len(x)
    coefs = [row[name] for name in names]
    if check_status(row, coefs, verdict(x, w, d)):
        close_to_polyfit(coefs, x, y, w, d)


def huber(r, f):
    a = np.abs(r)
    return np.where(a <= f, r * r, f * (2 * a - f))


def huber_minimum(x, y, w, d, f) -> float:
    """The weighted mean Huber loss at its minimum (float64 IRLS, in the series' frame)."""
    half = (x.max() - x.min()) / 2 or 1.0
    t = (x - (x.max() + x.min()) / 2) / half
    design = np.vander(t, d + 1)

    def solve(omega):
        root = np.sqrt(omega)
        return np.linalg.lstsq(design * root[:, None], y * root, rcond=None)[0]

    def value(p):
        return float(np.sum(w * huber(y - design @ p, f)) / np.sum(w))

    p = solve(w)
    best, at = value(p), p
    for _ in range(300):
        r = np.abs(y - design @ p)
        p = solve(w * np.where(r <= f, 1.0, f / np.maximum(r, 1e-300)))
        new = value(p)
        if new < best:
            best, at = new, p
        if new >= best * (1 - 1e-14):
            break
    inside = np.abs(y - design @ at) < f * (1 - 1e-9)
    return best, len(np.unique(x[inside])) >= d + 1


def check_huber(row, names, x, y, w, d, f):
    """Huber (convex): an ``ok`` fit's loss is the minimum. A fit may instead say
    not_converged or diverged (honest statuses: its numbers are not promised, only its loss
    column is the loss of its curve); counted, split by whether the minimum is flat (fewer
    than d + 1 distinct x inside f there: Newton's Hessian singular) or strict. A
    ``diverged`` fit that is at the minimum is a wrong status (see
    test_an_exact_huber_fit_is_not_diverged), counted apart."""
    x, y, w = used_points(x, y, w)
    assert row["n_points"] == len(x)
    coefs = [row[name] for name in names]
    v = verdict(x, w, d)
    if v == "ok" and row["status"] in ("not_converged", "diverged"):
        best, strict = huber_minimum(x, y, w, d, f)
        status = row["status"]
        OUTCOMES["notes"][f"huber_{status}_{'strict' if strict else 'flat'}"] += 1
        if all(c is not None and math.isfinite(c) for c in coefs):
            got = float(np.sum(w * huber(y - np.polyval(coefs, x), f)) / np.sum(w))
            floor = 1e-9 * float(np.mean(y * y))
            if row["loss"] is not None and math.isfinite(row["loss"]):
                assert abs(row["loss"] - got) <= 1e-6 * got + floor, row
            if status == "diverged" and got <= best * (1 + HUBER_TOL) + floor:
                assert not STRICT, ("diverged at the minimum", row)  # see test_an_exact_...
                OUTCOMES["known_tolerated"]["huber_diverged_at_the_minimum"] += 1
        return
    if not check_status(row, coefs, v):
        return

    if f >= 1e8:  # no residual reaches the scale: least squares
        return close_to_polyfit(coefs, x, y, w, d)
    if d == 0:
        fitted = np.full(len(x), coefs[0])
    else:
        frame = [row[f"{name}_frame"] for name in names]
        fitted = np.polyval(frame, (x - row["x_centre"]) / row["x_scale"])
        scale = np.abs(y).max() + 1
        np.testing.assert_allclose(np.polyval(coefs, x), fitted, rtol=0, atol=1e-6 * scale)
    got = float(np.sum(w * huber(y - fitted, f)) / np.sum(w))
    floor = 1e-12 * float(np.sum(w * y * y) / np.sum(w))
    best = huber_minimum(x, y, w, d, f)[0]
    assert got <= best * (1 + HUBER_TOL) + floor, (got, best)
    assert abs(row["loss"] - got) <= 1e-7 * got + floor, (row["loss"], got)


def check_auto(row, names, x, y, w, top):
    """--degree auto[:top]: README's BIC, n log(loss) + (d + 1) log n, with the loss floored
    at float64 rounding of y, over the degrees whose fit is ok and leaves a residual."""
    x, y, w = used_points(x, y, w)
    n = len(x)
    assert row["n_points"] == n
    coefs = [row[name] for name in names]
    if n == 0:
        assert row["status"] == "too_few_points" and coefs[-1] is None, row
        if not STRICT and coefs[:-1] == [0.0] * top:  # see test_auto_degree_too_few_...
            OUTCOMES["known_tolerated"]["auto_too_few_zeros"] += 1
            return
        assert all(c is None for c in coefs), row
        return
    chosen = row["degree"]
    assert row["status"] == "ok" and 0 <= chosen <= top, row
    assert coefs[:top - chosen] == [0.0] * (top - chosen), row
    assert all(row[f"{name}_stderr"] is None for name in names[:top - chosen]), row
    msy = float(np.sum(w * y * y) / np.sum(w))
    floor = 256 * EPS * msy + 1e-300
    bic, slack, sure = {}, {}, set()
    for d in range(top + 1):
        v = verdict(x, w, d)
        if v in ("ok", "ambiguous") and (n > d + 1 or d == 0):
            p = np.polyfit(x, y, d, w=np.sqrt(w))
            loss = float(np.sum(w * (y - np.polyval(p, x)) ** 2) / np.sum(w))
            bic[d] = n * math.log(max(loss, floor)) + (d + 1) * math.log(n)
            slack[d] = n * math.log1p(1e4 * EPS * msy / max(loss, floor)) + 1e-9 * abs(bic[d])
            if v == "ok":
                sure.add(d)
    assert chosen in bic, (row, bic)
    if sure:
        best = min(sure, key=bic.get)
        assert bic[chosen] <= bic[best] + slack[chosen] + slack[best] + 1e-9, (row, bic)
    if chosen in sure:
        close_to_polyfit(coefs[top - chosen:], x, y, w, chosen)


def expected_names(degree: str) -> list[str]:
    top = 3 if degree == "auto" else int(degree.split(":")[-1])
    return ["a", "b", "c"] if top == 2 else [f"p{k}" for k in range(top, -1, -1)]


def check_output(out: Path, series: dict, opts: dict, numeric: bool, sane_only=False,
                 int8_ids=False):
    """Exit 0: every series exactly once, README's columns and statuses, and (numeric)
    the float64 oracle's numbers."""
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"batchfit"])
    names = [name for name, _ in sorted(meta["coefficient_columns"], key=lambda p: p[1])]
    assert names == expected_names(opts["degree"]), names
    rows = table.to_pylist()
    got, want = sorted(repr(r["series_id"]) for r in rows), sorted(map(repr, series))
    if got != want and not STRICT and int8_ids and opts["loss"] == "huber" and \
            set(got) < set(want):  # see test_scattered_int8_ids_on_the_points_path_...
        OUTCOMES["known_tolerated"]["int8_ids_series_lost"] += 1
        want = got
    assert got == want
    assert {r["status"] for r in rows} <= STATUSES
    auto = opts["degree"].startswith("auto")
    for row in rows:
        x, y, w = series[row["series_id"]]
        if not numeric or (sane_only and np.any(np.abs(np.concatenate([x, y, w])) > SANE)):
            OUTCOMES["series"]["structure_checked"] += 1
            assert row["n_points"] == len(used_points(x, y, w)[0]), row
            if row["status"] == "ok":
                assert all(math.isfinite(row[name]) for name in names), row
            elif row["status"] == "too_few_points":
                coefs = [row[name] for name in names]
                if auto and not STRICT and coefs[-1] is None and \
                        coefs[:-1] == [0.0] * (len(names) - 1):
                    OUTCOMES["known_tolerated"]["auto_too_few_zeros"] += 1
                    continue
                assert all(c is None for c in coefs), row
            continue
        kind = "auto" if auto else opts["loss"]
        OUTCOMES["series"][f"{kind}_{row['status']}_numbers_checked"] += 1
        if auto:
            check_auto(row, names, x, y, w, len(names) - 1)
        elif opts["loss"] == "huber":
            check_huber(row, names, x, y, w, int(opts["degree"]),
                        float(opts["f_scale"] or 1.0))
        else:
            check_poly(row, names, x, y, w, int(opts["degree"]))


def check_structure(out: Path):
    table = pq.read_table(out)
    ids = [repr(v) for v in table.column(0).to_pylist()]
    assert len(ids) == len(set(ids)), "a series twice"
    assert set(table["status"].to_pylist()) <= STATUSES
    assert min(table["n_points"].to_pylist(), default=0) >= 0


# ---------------------------------------------------------------- option mixes, paths


OUTPUTS = ["new", "new", "new", "older", "older", "older", "default", "fifo", "directory",
           "slash"]
HISTORIES = [None] * 6 + ["new", "older", "fifo"]


@st.composite
def option_mixes(draw, damage=False, weights=True):
    """An option mix; a third of them (``faulty``) may also give bad paths or options."""
    faulty = not damage and draw(st.integers(0, 2)) == 0
    loss = draw(st.sampled_from(["mse", "mse", "huber"]))
    degrees = ["1", "2", "3", "auto"] if damage or (loss == "huber" and not faulty) else \
        ["0", "1", "2", "2", "3", "4", "auto", "auto:2"]
    degree = draw(st.sampled_from(degrees))
    if loss == "huber" and degree.startswith("auto") and not faulty:
        degree = "2"
    opts = dict(
        loss=loss, degree=degree,
        f_scale=draw(st.sampled_from([None, "0.5", "30", "100", "1e9"])) if loss == "huber"
        else None,  # (y's noise is about 50)
        dtype="float64" if damage else draw(st.sampled_from(["float64", "float64",
                                                            "float32"])),
        weight_col=not damage and (faulty or weights) and draw(st.booleans()),
        batch_size=draw(st.one_of(st.none(), st.integers(1, 40))),
        history=None, resume=False, output="new", input_format="auto",
        format_flag=not damage and draw(st.booleans()),
        csv_copy=not damage and draw(st.integers(0, 3)) == 0)
    if damage:
        opts["output"] = draw(st.sampled_from(["new", "older"]))
        return opts
    if faulty:
        opts.update(history=draw(st.sampled_from(HISTORIES)),
                    resume=draw(st.integers(0, 2)) == 0,
                    output=draw(st.sampled_from(OUTPUTS)),
                    input_format=draw(st.sampled_from(["auto", "named", "wrong"])))
        return opts
    iterative = loss == "huber"
    opts.update(history=draw(st.sampled_from([None, None, "new", "older"])) if iterative
                else None,
                output=draw(st.sampled_from(["new", "older", "older", "default"])),
                input_format=draw(st.sampled_from(["auto", "auto", "named"])))
    opts["resume"] = opts["history"] is None and draw(st.integers(0, 3)) == 0
    return opts


def default_output(path: Path) -> Path:
    """README: the input's name with .coeffs.parquet; for a directory, beside it."""
    name = path.name
    for end in (".parquet", ".csv", ".arrows", ".arrow", ".feather", ".ipc"):
        if path.is_file() and name.endswith(end):
            name = name[: -len(end)]
            break
    return path.parent / f"{name}.coeffs.parquet"


def prepare_paths(base: Path, opts: dict, input_path: Path):
    """Create what OUTPUT and --history name before the run; return (out, out argument,
    history, what each held)."""
    out = default_output(input_path) if opts["output"] == "default" else base / "out.parquet"
    argument = None if opts["output"] == "default" else \
        str(out) + ("/" if opts["output"] == "slash" else "")
    if opts["output"] in ("older", "slash"):
        out.write_bytes(b"an older output")
    elif opts["output"] == "fifo":
        os.mkfifo(out)
    elif opts["output"] == "directory":
        out.mkdir()
        (out / "kept").write_bytes(b"kept")
    history = base / "history.parquet" if opts["history"] else None
    if opts["history"] == "older":
        history.write_bytes(b"an older history")
    elif opts["history"] == "fifo":
        os.mkfifo(history)
    return out, argument, history


def usage_errors(opts: dict) -> list[str]:
    """Faults of the command line, found before any data is read."""
    errors = []
    if opts["output"] == "fifo":
        errors.append("is not a regular file")
    if opts["output"] == "directory":
        errors.append("is a directory")
    if opts["output"] == "slash":
        errors.append("ends in '/'")
    if opts["loss"] == "huber" and opts["degree"].startswith("auto"):
        errors.append("chooses among least-squares")
    if opts["history"]:
        if opts["loss"] == "mse":
            errors.append("needs an iterative solver")
        if opts["history"] == "fifo":
            errors.append("is not a regular file")
        if opts["resume"]:
            errors.append("cannot be combined with --history")
    return errors


def build_args(input_path, out_argument, history, opts, data_fmt, file_format):
    args = ["run", input_path]
    if out_argument is not None:
        args += ["-o", out_argument]
    args += ["--no-progress", "--no-compile", "--degree", opts["degree"], "--loss",
             opts["loss"], "--dtype", opts["dtype"]]
    if opts["f_scale"]:
        args += ["--f-scale", opts["f_scale"]]
    if opts["weight_col"]:
        args += ["--weight-col", "weight"]
    if opts["batch_size"]:
        args += ["--batch-size", opts["batch_size"]]
    if history is not None:
        args += ["--history", history]
    if opts["resume"]:
        args += ["--resume"]
    if opts["format_flag"]:
        args += ["--format", data_fmt]
    if opts["input_format"] == "named":
        args += ["--input-format", file_format]
    elif opts["input_format"] == "wrong":
        args += ["--input-format", {"parquet": "csv", "csv": "ipc", "ipc": "parquet"}[
            file_format]]
    return args


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def check_common(name, code, err, args):
    """Exit 0 or 2; 2 with exactly one ``batchfit: error:`` line; never a traceback."""
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
    else:
        assert all(line.startswith("batchfit: ") and "error" not in line
                   for line in err.splitlines()), err
    OUTCOMES[name][f"exit{code}"] += 1


# ---------------------------------------------------------------- 1: the promise


@st.composite
def promise_cases(draw):
    data = draw(hostile.datasets())
    if draw(st.integers(0, 2)):  # two thirds without the data's faults
        data = {**data, "null_id": False, "negative_weight": False, "repeat_id": False}
    formats = ["parquet", "ipc", "csv"] if data["fmt"] == "long" else ["parquet", "ipc"]
    return dict(data=data, file_format=draw(st.sampled_from(formats)),
                ipc=dict(stream=draw(st.booleans()),
                         compression=draw(st.sampled_from([None, "lz4", "zstd"])),
                         chunk=draw(st.integers(1, 64))),
                opts=draw(option_mixes(weights=data["weights"])))


def check_promise(base: Path, case: dict, name: str):
    data, file_format, opts = case["data"], case["file_format"], case["opts"]
    input_path, files, known = write_input(data, file_format, case["ipc"], base)
    if known is not None:
        series, errors = known
        if file_format == "parquet" and not errors:  # (the reference oracle agrees)
            mine, mine_errors = reference_oracle(decode_reference(files, "parquet"), False)
            assert not mine_errors and sorted(map(repr, mine)) == sorted(map(repr, series))
            assert all(same_points(mine[k], series[k]) for k in series)
    else:
        series, errors = reference_oracle(decode_reference(files, "csv"), False)
    if opts["weight_col"] and not data["weights"]:
        errors = [*errors, "missing column 'weight'"]
    reading = []
    copy = None
    if opts["csv_copy"] and file_format == "parquet" and data["fmt"] == "long" and \
            len(files) > 1 and opts["input_format"] != "wrong":
        copy = input_path / "copy.csv"
        pacsv.write_csv(csv_table(pq.read_table(files[0])), str(copy))
        if opts["input_format"] == "auto":
            reading.append("holds files of more than one format")
    if opts["input_format"] == "wrong":
        reading = ["as --input-format says", "cannot read", "in directory"]
    expected = usage_errors(opts) or reading or errors
    out, out_argument, history = prepare_paths(base, opts, input_path)
    args = build_args(input_path, out_argument, history, opts, data["fmt"], file_format)
    note(command_line(args))
    input_dir = input_path if input_path.is_dir() else input_path.parent
    before = snapshot(input_dir)
    older_out = out.read_bytes() if out.is_file() else None
    older_history = history.read_bytes() if history is not None and history.is_file() else None

    done = run_or_known(args, data)
    if done is None:
        return
    code, err = done
    check_common(name, code, err, args)
    if expected:
        assert code == 2, (expected, err)
        assert any(e in err for e in expected), (expected, err)
    # the paths: special files kept, older files untouched on failure, nothing hidden left
    if opts["output"] == "fifo":
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    if opts["output"] == "directory":
        assert out.is_dir() and sorted(os.listdir(out)) == ["kept"]
    if opts["history"] == "fifo":
        assert stat.S_ISFIFO(os.lstat(history).st_mode)
    after = snapshot(input_dir)
    if out.parent == input_dir:  # (the default output of a one-file input lies beside it)
        after.pop(out.name, None)
        before.pop(out.name, None)
    assert after == before, "the input changed"
    checkpoint = f".{out.name}.resume"
    for directory in {base, out.parent, input_dir}:
        left = hidden(directory)
        if code == 2 and opts["resume"] and checkpoint in left and directory == out.parent \
                and not STRICT:
            OUTCOMES["known_tolerated"]["failed_resume_checkpoint"] += 1
            left.remove(checkpoint)
        assert left == [], left
    if code == 2:
        if older_out is not None:
            assert out.read_bytes() == older_out, "an older output was changed"
        elif opts["output"] in ("new", "default"):
            assert not out.exists(), "a failed run left an output"
        if older_history is not None:
            assert history.read_bytes() == older_history, "an older history was changed"
        elif opts["history"] == "new":
            assert not history.exists(), "a failed run left a history"
        return
    assert out.is_file() and out.read_bytes() != older_out
    if history is not None:
        assert "loss_median" in pq.read_schema(history).names
    check_output(out, series, opts, numeric=opts["dtype"] == "float64",
                 int8_ids=file_format != "csv" and "int8" in data["kinds"]["series_id"])


@fuzz_settings(FAST_EXAMPLES["promise"])
@given(case=promise_cases())
def test_promise(tmp_path_factory, case):
    one_case(tmp_path_factory, check_promise, case, "promise")


@pytest.mark.slow
@fuzz_settings(SLOW, shrink=False)
@given(case=promise_cases())
def test_promise_slow(tmp_path_factory, case):
    one_case(tmp_path_factory, check_promise, case, "promise_slow")


# ---------------------------------------------------------------- 2: damaged bytes


@st.composite
def damaged_cases(draw, formats):
    data = draw(hostile.datasets())
    data = {**data, "null_id": False, "negative_weight": False, "repeat_id": False}
    formats = [f for f in formats if f != "csv" or data["fmt"] == "long"]
    file_format = draw(st.sampled_from(formats))
    if file_format == "ipc" and draw(st.booleans()):
        # Half of the IPC cases: 40 series of string ids, so that most bytes of the file
        # are data buffers (offsets, values) rather than metadata.
        lengths = np.random.default_rng(data["seed"]).integers(1, 15, 40).tolist()
        id_kind = draw(st.sampled_from(["string", "dictionary"]))
        data = {**data, "lengths": lengths, "id_kind": id_kind,
                "kinds": {**data["kinds"], "series_id": [id_kind] * data["n_files"]}}
    opts = draw(option_mixes(damage=True))
    if file_format == "ipc":  # (run in a subprocess when invalid: keep it torch-free)
        opts = {**opts, "loss": "mse", "f_scale": None}
    return dict(data=data, file_format=file_format, opts=opts,
                ipc=dict(stream=draw(st.booleans()),
                         compression=draw(st.sampled_from([None, "lz4", "zstd"])),
                         chunk=draw(st.integers(1, 64))),
                damage=dict(kind=draw(st.sampled_from(["flip", "overwrite", "truncate",
                                                       "cut"])),
                            file=draw(st.integers(0, 2)), where=draw(st.integers(0, 2**31)),
                            tail=draw(st.booleans()), size=draw(st.integers(1, 500)),
                            seed=draw(st.integers(0, 2**31))))


def damage_file(path: Path, damage: dict) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "empty file"
    where = len(data) - 1 - damage["where"] % min(len(data), 256) if damage["tail"] else \
        damage["where"] % len(data)
    rng = np.random.default_rng(damage["seed"])
    kind = damage["kind"]
    if kind == "flip":
        data[where] ^= int(rng.integers(1, 256))
    elif kind == "overwrite":
        size = 1 + damage["size"] % 8
        data[where:where + size] = rng.integers(0, 256, size).astype(np.uint8).tobytes()
    elif kind == "truncate":
        del data[where:]
    else:
        del data[where:where + damage["size"]]
    path.write_bytes(bytes(data))
    return f"{kind} at {where} of {path.name}"


def check_damage(base: Path, case: dict, name: str):
    data, file_format, opts = case["data"], case["file_format"], case["opts"]
    input_path, files, _ = write_input(data, file_format, case["ipc"], base)
    sized = [f for f in files if f.stat().st_size] or files
    note(damage_file(sized[case["damage"]["file"] % len(sized)], case["damage"]))
    out, out_argument, _ = prepare_paths(base, opts, input_path)
    args = build_args(input_path, out_argument, None, opts, data["fmt"], file_format)
    note(command_line(args))
    older_out = out.read_bytes() if out.is_file() else None
    before = snapshot(input_path if input_path.is_dir() else input_path.parent)
    tables = decode_reference(files, file_format)
    if file_format == "ipc" and ipc_state(files) == "invalid":
        OUTCOMES[name]["invalid_ipc"] += 1
    # Damaged files run in the sandbox worker: some crash the process that reads them
    # (see test_a_damaged_ipc_file_is_an_error_not_a_crash, test_a_damaged_parquet_...).
    code, err = SANDBOX.run(args)
    if code < 0 and not STRICT:
        OUTCOMES["known_tolerated"][f"{file_format}_crash"] += 1
        OUTCOMES[name][f"crash_signal_{-code}"] += 1
        return
    assert code >= 0, f"batchfit died of signal {-code}: {err[-2000:]}"
    if code == 1 and not STRICT and data["fmt"] == "list" and "non-zero size" in err:
        OUTCOMES["known_traceback"]["empty_list_series"] += 1  # (see run_or_known)
        return
    if code == 1 and not STRICT and "ArrowNotImplementedError" in err:  # see test_a_...
        OUTCOMES["known_traceback"]["arrow_not_implemented"] += 1  # _not_implemented_...
        return
    check_common(name, code, err, args)
    assert snapshot(input_path if input_path.is_dir() else input_path.parent) == before
    for directory in {base, input_path.parent, files[0].parent}:
        assert hidden(directory) == []
    if code == 2:
        if older_out is not None:
            assert out.read_bytes() == older_out
        else:
            assert not out.exists()
        return
    if tables is None:
        OUTCOMES[name]["exit0_unverifiable"] += 1  # the reference reader refused the file
        check_structure(out)
        return
    series, errors = reference_oracle(tables, False)
    assert not errors, f"exit 0, but the decoded data break a rule: {errors}"
    OUTCOMES[name]["exit0_checked"] += 1
    check_output(out, series, opts, numeric=True, sane_only=True,
                 int8_ids=file_format != "csv" and "int8" in data["kinds"]["series_id"])


@fuzz_settings(FAST_EXAMPLES["damage"])
@given(case=damaged_cases(["parquet", "parquet", "csv"]))
def test_damaged_bytes(tmp_path_factory, case):
    one_case(tmp_path_factory, check_damage, case, "damage")


@fuzz_settings(FAST_EXAMPLES["damage_ipc"])
@given(case=damaged_cases(["ipc"]))
def test_damaged_ipc_bytes(tmp_path_factory, case):
    one_case(tmp_path_factory, check_damage, case, "damage_ipc")


@pytest.mark.slow
@fuzz_settings(SLOW, shrink=False)
@given(case=damaged_cases(["parquet", "parquet", "csv"]))
def test_damaged_bytes_slow(tmp_path_factory, case):
    one_case(tmp_path_factory, check_damage, case, "damage_slow")


@pytest.mark.slow
@fuzz_settings(max(SLOW // 5, 1), shrink=False)
@given(case=damaged_cases(["ipc"]))
def test_damaged_ipc_bytes_slow(tmp_path_factory, case):
    one_case(tmp_path_factory, check_damage, case, "damage_ipc_slow")


# ---------------------------------------------------------------- the issues found


def test_a_failed_resume_run_leaves_no_checkpoint(tmp_path):
    """Exit 2 is "no output": a --resume run stopped by bad data (a negative weight in the
    last series, after several checkpointed chunks) must not leave ``.NAME.resume/`` behind,
    where the next run on the corrected input would refuse it as another job's."""
    ids = np.repeat(np.arange(20), 10)
    x = np.tile(np.linspace(0, 1, 10), 20)
    weight = np.ones(len(ids))
    weight[-1] = -1.0
    pq.write_table(pa.table({"series_id": ids, "x": x, "y": x * x, "weight": weight}),
                   tmp_path / "data.parquet", row_group_size=30)
    out = tmp_path / "out.parquet"
    code, err = run_in_process(["run", tmp_path / "data.parquet", "-o", out, "--no-progress",
                                "--no-compile", "--loss", "huber", "--batch-size", "2",
                                "--resume"])
    assert code == 2 and "weights must be >= 0" in err, err
    assert hidden(tmp_path) == []


def string_offsets_damaged(path: Path):
    """A valid long-format IPC file of string ids with one offset of the ids' offsets
    buffer overwritten (as a flipped byte can do): pyarrow's full validation refuses it."""
    n = 40
    table = pa.table({"series_id": pa.array([f"s{i:02d}" for i in range(n) for _ in range(3)]),
                      "x": [0.0, 1.0, 2.0] * n, "y": [1.0, 2.0, 5.0] * n})
    sink = pa.BufferOutputStream()
    with paipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = bytearray(sink.getvalue().to_pybytes())
    offsets = struct.pack(f"<{3 * n + 1}i", *range(0, 9 * n + 1, 3))
    at = data.index(offsets) + 4 * (3 * n // 2)
    data[at:at + 4] = struct.pack("<i", 1 << 20)
    path.write_bytes(bytes(data))
    assert not ipc_valid([path])


def test_a_damaged_ipc_file_is_an_error_not_a_crash(tmp_path):
    """Found by test_damaged_ipc_bytes: batchfit reads IPC batches without validating them,
    and a damaged offset sends it reading outside the file (SIGSEGV or SIGBUS)."""
    string_offsets_damaged(tmp_path / "d.arrow")
    code, err = run_in_subprocess(["run", "d.arrow", "-o", "out.parquet", "--no-progress"],
                                  tmp_path)
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err


def test_auto_degree_too_few_points_has_null_coefficients(tmp_path):
    """README: the coefficients of a too_few_points series are null. With --degree auto a
    series without points said p3 = p2 = p1 = 0.0 (p0 null, x_scale 0.0): the padding of
    the degree-0 record, as if those terms had been fitted to be 0."""
    pq.write_table(pa.table({"series_id": [1, 1, 1, 2, 2], "x": [0.0, 1, 2, None, None],
                             "y": [1.0, 2, 5, 1, 1]}), tmp_path / "d.parquet")
    out = tmp_path / "out.parquet"
    code, err = run_in_process(["run", tmp_path / "d.parquet", "-o", out, "--degree", "auto",
                                "--no-progress", "--no-compile"])
    assert code == 0, err
    row = pq.read_table(out).to_pylist()[1]
    assert row["status"] == "too_few_points" and row["n_points"] == 0
    assert [row[name] for name in ("p3", "p2", "p1", "p0")] == [None] * 4, row


@pytest.mark.parametrize("x", [[], None], ids=["empty list", "null list"])
def test_an_empty_list_series_with_an_iterative_solver(tmp_path, x):
    """README: a null list is a series without points (too_few_points), and one bad series
    among many is not an error. With an iterative solver (huber, gd), a series of list
    format whose list is empty or null raised IndexError (amax() of a zero-length group)
    out of main: a traceback, exit 1."""
    pq.write_table(pa.table({"series_id": ["a", "b"],
                             "x": pa.array([x, [0.0, 1, 2]], pa.list_(pa.float64())),
                             "y": pa.array([[], [1.0, 2, 5]], pa.list_(pa.float64()))}),
                   tmp_path / "d.parquet")
    out = tmp_path / "out.parquet"
    code, err = run_in_process(["run", tmp_path / "d.parquet", "-o", out, "--loss", "huber",
                                "--no-progress", "--no-compile"])
    assert code == 0, err
    assert pq.read_table(out)["status"].to_pylist() == ["too_few_points", "ok"]


def test_scattered_int8_ids_on_the_points_path_keep_every_series(tmp_path):
    """Found by test_damaged_bytes_slow (on an undamaged part of the file): int8 ids
    spanning more than 127, rows not grouped by series, an iterative solver (the points
    path): the series of the largest ids were missing from the output, exit 0 ("fitted 12
    series" of 20: 32, 43, ..., 109 lost). int16/int64 ids, grouped rows, or the MSE job keep them all."""
    ids = np.array([-100 + 11 * k for k in range(20)], np.int8)[
        np.random.default_rng(0).permutation(20)]
    ids = np.append(ids, ids[0])  # (one series of two rows, apart: the rows are scattered)
    pq.write_table(pa.table({"series_id": ids, "x": np.arange(21.0), "y": np.ones(21)}),
                   tmp_path / "d.parquet")
    out = tmp_path / "out.parquet"
    code, err = run_in_process(["run", tmp_path / "d.parquet", "-o", out, "--loss", "huber",
                                "--no-progress", "--no-compile"])
    assert code == 0, err
    assert sorted(pq.read_table(out)["series_id"].to_pylist()) == sorted(set(ids.tolist()))


def test_an_exact_huber_fit_is_not_diverged(tmp_path):
    """Found by test_promise_slow: three weighted points, degree 2, huber: the start (the
    least-squares fit) interpolates them (loss 3e-29), yet the status said diverged, with
    0 iterations. Unweighted, or with soft_l1, the same points are ok."""
    pq.write_table(pa.table({"series_id": [32, 32, 32],
                             "x": [92.99088287353516, 67.08487701416016, 31.19801902770996],
                             "y": [-45.251, 24.782, -18.55], "weight": [2.402, 0.952, 0.409]}),
                   tmp_path / "d.parquet")
    out = tmp_path / "out.parquet"
    code, err = run_in_process(["run", tmp_path / "d.parquet", "-o", out, "--loss", "huber",
                                "--dtype", "float64", "--no-progress", "--no-compile"])
    assert code == 0, err
    row = pq.read_table(out).to_pylist()[0]
    assert row["loss"] < 1e-20 and row["status"] == "ok", row


def test_a_damaged_parquet_footer_is_an_error_not_an_abort(tmp_path):
    """Found by test_damaged_bytes_slow: a column chunk's size statistics in the footer
    (its repetition-level histogram, an empty list<i64>: Thrift bytes 0x29 0x06) said to
    hold 4 lists (0x49). ``pq.read_table`` raises OSError ("Repetition level histogram size
    mismatch"); batchfit's footer check (``ParquetSource._check_counts``, through
    ``RowGroupMetaData.column``) dies of SIGABRT (an uncaught C++ ParquetException)."""
    table = pa.table({"series_id": np.repeat(np.arange(30), 10), "x": np.arange(300.0),
                      "y": np.ones(300)})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=40)
    raw = bytearray(path.read_bytes())
    start = len(raw) - 8 - hostile.footer_length(raw)
    at = raw.index(b"\x29\x06", start)
    raw[at + 1] = 0x49
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="histogram size mismatch"):
        pq.read_table(path)
    code, err = run_in_subprocess(["run", "d.parquet", "-o", "out.parquet", "--no-progress"],
                                  tmp_path)
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err


def test_a_footer_schema_pyarrow_cannot_read_is_an_error(tmp_path, capsys):
    """Found by test_damaged_bytes_slow: a flipped byte in the footer's ``ARROW:schema``
    entry (here an int64 column's bit width made 128) makes pyarrow raise
    ArrowNotImplementedError ("Integers with more than 64 bits not implemented"), which
    ``open_parquet`` does not catch (only ArrowInvalid and OSError): a traceback, exit 1."""
    import base64

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"series_id": np.repeat(np.arange(5), 3), "x": np.arange(15.0),
                             "y": np.ones(15)}), path)
    entry = pq.ParquetFile(path).metadata.metadata[b"ARROW:schema"]
    schema = bytearray(base64.b64decode(entry))
    schema[schema.index(b"\x40\x00\x00\x00")] = 0x80  # Int.bitWidth 64 -> 128
    path.write_bytes(path.read_bytes().replace(entry, base64.b64encode(bytes(schema))))
    with pytest.raises(pa.ArrowNotImplementedError):
        pq.read_table(path)
    bad(tmp_path, ["run", path], f"cannot read {path}", capsys)
