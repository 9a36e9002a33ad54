"""Writing batchfit's outputs: the coefficients table, atomically (a temporary file beside
the target, renamed into place only on success), a directory of such files likewise (the Ray
engine's output), and training histories. A target may be in a store (a URI, ``storage``),
which has no rename: a temporary object beside the target is moved into place at the end
(``move``: one copy, so that the target switches from the older object to the new whole)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchfit.core import interrupts
from batchfit.core.names import STATUS_LABELS
from batchfit.io import storage
from batchfit.io.schema import first_line

FRAME_COLUMNS = ("x_centre", "x_scale")


def frame_name(name: str) -> str:
    """The column of coefficient ``name`` in the fit's frame."""
    return f"{name}_frame"


def output_schema(id_type: pa.DataType, columns, metadata: dict, *, restarts: bool = False,
                  id_name: str = "series_id", frame: bool = False,
                  degrees: bool = False, derived=(), covariance: bool = False) -> pa.Schema:
    """The contract's output columns, in order, with the ``batchfit`` metadata entry.
    ``columns``: the model's ``(name, parameter index)`` (``models.output_columns``);
    ``id_name``: the input's id column, whose name the output keeps (first); ``frame``: a
    polynomial's fits in their frames (``x_centre``, ``x_scale``, ``<name>_frame``, see
    ``FitResult``); ``degrees``: the degree chosen per series (``degree``); ``restarts``: a
    multi-start fit, which adds ``converged_starts``; ``derived``: the model's derived
    columns (``Model.derived_names``: hill4's ``ic50``, ``ic50_low``, ``ic50_high``), after
    the standard errors; ``covariance``: each series' parameter covariance, its upper
    triangle as ``cov_<name_i>_<name_j>`` (``covariance_columns``), after those."""
    names = [name for name, _ in columns]
    metadata = {**metadata, "coefficient_columns": [list(pair) for pair in columns],
                "id_column": id_name}
    if derived:
        metadata["derived_columns"] = list(derived)
    fields = [pa.field(id_name, id_type)]
    fields += [pa.field(name, pa.float64()) for name in names]
    fields += [pa.field(f"{name}_stderr", pa.float64()) for name in names]
    fields += [pa.field(name, pa.float64()) for name in derived]
    if covariance:
        metadata["covariance"] = True
        fields += [pa.field(name, pa.float64()) for name, _, _ in covariance_columns(columns)]
    if frame:
        fields += [pa.field(name, pa.float64()) for name in FRAME_COLUMNS]
        fields += [pa.field(frame_name(name), pa.float64()) for name in names]
    fields += [pa.field("n_points", pa.int64()), pa.field("loss", pa.float64()),
               pa.field("rmse", pa.float64()), pa.field("r2", pa.float64()),
               pa.field("iterations", pa.int64()), pa.field("status", pa.string())]
    if degrees:
        fields.append(pa.field("degree", pa.int64()))
    if restarts:
        fields.append(pa.field("converged_starts", pa.int64()))
    if id_name in [field.name for field in fields[1:]]:
        raise ValueError(f"the id column {id_name!r} has the name of an output column; "
                         "rename it in the input")
    return pa.schema(fields, metadata={"batchfit": json.dumps(metadata, sort_keys=True,
                                                                 default=str)})


COVARIANCE_PREFIX = "cov_"


def covariance_columns(columns) -> list[tuple[str, int, int]]:
    """(column, parameter index i, index j) of the covariance's upper triangle: for the
    coefficient columns ``columns`` (``(name, index)``, in output order), every pair
    ``cov_<name_i>_<name_j>`` with i <= j in that order."""
    columns = list(columns)
    return [(f"{COVARIANCE_PREFIX}{a}_{b}", i, j) for at, (a, i) in enumerate(columns)
            for b, j in columns[at:]]


def count_statuses(codes: np.ndarray) -> dict[str, int]:
    """Series per status label, from Status codes."""
    counts = np.bincount(np.asarray(codes, np.int64), minlength=len(STATUS_LABELS))
    return {label: int(n) for label, n in zip(STATUS_LABELS, counts) if n}


def status_counts(table: pa.Table) -> dict[str, int]:
    """Series per status in an output table, in the order of ``Status``."""
    counts = {entry["values"]: entry["counts"]
              for entry in pc.value_counts(table["status"]).to_pylist()}
    return {label: counts[label] for label in STATUS_LABELS if label in counts}


def result_table(ids: pa.Array, record: dict, schema: pa.Schema) -> pa.Table:
    """One output row per series of a record of numpy arrays (``FitResult.record()``,
    ``native.solve``): params, stderr, loss, rmse, r2, n_points, iterations, status. The
    coefficient columns are the schema's (see ``output_schema``); undefined numbers (NaN)
    become nulls."""
    if b"candidates" in schema.metadata.get(b"batchfit", b""):  # (a model choice's)
        return choice_table(ids, record, schema)
    params, stderr = record["params"], record["stderr"]

    def floats(values):
        return pa.array(np.asarray(values, dtype=np.float64), from_pandas=True)

    columns = {schema.names[0]: ids}
    framed = FRAME_COLUMNS[0] in schema.names
    for name, index in coefficient_columns(schema):
        columns[name] = floats(params[:, index])
        columns[f"{name}_stderr"] = floats(stderr[:, index])
        if framed:
            columns[frame_name(name)] = floats(record["frame_params"][:, index])
    meta = json.loads(schema.metadata[b"batchfit"])
    for name in meta.get("derived_columns", ()):
        columns[name] = floats(record[name])
    if meta.get("covariance"):
        columns.update({name: floats(record["covariance"][:, i, j]) for name, i, j in
                        covariance_columns(coefficient_columns(schema))})
    if framed:
        columns.update({name: floats(record[name]) for name in FRAME_COLUMNS})
    if "degree" in schema.names:
        columns["degree"] = pa.array(np.asarray(record["degrees"], np.int64))
    columns.update(n_points=pa.array(np.asarray(record["n_points"], np.int64)),
                   loss=floats(record["loss"]), rmse=floats(record["rmse"]),
                   r2=floats(record["r2"]),
                   iterations=pa.array(np.asarray(record["iterations"], np.int64)),
                   status=pa.array(np.asarray(STATUS_LABELS)[record["status"]], pa.string()))
    if "converged_starts" in record:
        columns["converged_starts"] = pa.array(np.asarray(record["converged_starts"], np.int64))
    return pa.table([columns[field.name] for field in schema], schema=schema)


def _id_array(ids, n: int) -> pa.Array:
    """``ids`` (any sequence or Arrow array, None for 0 .. n-1) as an Arrow array of n."""
    if ids is None:
        ids = pa.array(np.arange(n, dtype=np.int64))
    elif isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    elif not isinstance(ids, pa.Array):
        try:
            ids = pa.array(np.asarray(ids) if np.ndim(ids) else [ids])
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ValueError(f"ids cannot be an id column: {first_line(exc)}") from None
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} series")
    return ids


def fit_arrow(record: dict, columns, ids, metadata: dict, *, derived=()) -> pa.Table:
    """A FitResult's record as the output table (``FitResult.to_arrow``): ``ids`` any
    sequence or Arrow array of one id per series, or None for 0 .. B-1; ``derived``: the
    names of the record's derived columns (``output_schema``)."""
    ids = _id_array(ids, len(record["status"]))
    return result_table(ids, record, output_schema(
        ids.type, columns, metadata, restarts="converged_starts" in record,
        frame="frame_params" in record, degrees="degrees" in record, derived=derived,
        covariance="covariance" in record))


DIAGNOSTIC_FIELDS = (("n_points", pa.int64()), ("loss", pa.float64()),
                     ("rmse", pa.float64()), ("r2", pa.float64()),
                     ("iterations", pa.int64()), ("status", pa.string()))


def choice_schema(id_type: pa.DataType, candidates: dict, metadata: dict, *,
                  id_name: str = "series_id") -> pa.Schema:
    """The output of a model choice (``--model auto:A,B``): the id, ``model`` (the chosen
    candidate), each candidate's parameters ``<candidate>_<param>`` and then their
    ``_stderr`` (null where not chosen), ``aicc_<candidate>`` for every candidate, the
    chosen fit's diagnostics. ``candidates``: name -> parameter names; the metadata maps
    each candidate to its columns (``candidate_columns``), so ``predict`` evaluates every
    row with its own model."""
    columns = {name: [f"{name}_{param}" for param in params]
               for name, params in candidates.items()}
    metadata = {**metadata, "model": "auto", "candidates": list(candidates),
                "candidate_columns": columns, "id_column": id_name}
    fields = [pa.field(id_name, id_type), pa.field("model", pa.string())]
    for names in columns.values():
        fields += [pa.field(name, pa.float64()) for name in names]
        fields += [pa.field(f"{name}_stderr", pa.float64()) for name in names]
    fields += [pa.field(f"aicc_{name}", pa.float64()) for name in candidates]
    fields += [pa.field(name, kind) for name, kind in DIAGNOSTIC_FIELDS]
    if id_name in [field.name for field in fields[1:]]:
        raise ValueError(f"the id column {id_name!r} has the name of an output column; "
                         "rename it in the input")
    return pa.schema(fields, metadata={"batchfit": json.dumps(metadata, sort_keys=True,
                                                                 default=str)})


def choice_table(ids: pa.Array, record: dict, schema: pa.Schema) -> pa.Table:
    """One output row per series of a model choice's record (``ChoiceResult.record()``)."""
    meta = json.loads(schema.metadata[b"batchfit"])

    def floats(values):
        return pa.array(np.asarray(values, dtype=np.float64), from_pandas=True)

    candidates = meta["candidates"]
    columns = {schema.names[0]: ids,
               "model": pa.array(np.asarray(candidates)[record["model"]], pa.string())}
    for c, name in enumerate(candidates):
        fit = record["candidates"][name]
        for i, column in enumerate(meta["candidate_columns"][name]):
            columns[column] = floats(fit["params"][:, i])
            columns[f"{column}_stderr"] = floats(fit["stderr"][:, i])
        columns[f"aicc_{name}"] = floats(record["aicc"][:, c])
    for name, kind in DIAGNOSTIC_FIELDS[:-1]:
        columns[name] = pa.array(np.asarray(record[name], kind.to_pandas_dtype()),
                                 from_pandas=True)
    columns["status"] = pa.array(np.asarray(STATUS_LABELS)[record["status"]], pa.string())
    return pa.table([columns[field.name] for field in schema], schema=schema)


def choice_arrow(record: dict, candidates: dict, ids, metadata: dict) -> pa.Table:
    """A ChoiceResult's record as its output table (``ids`` as in ``fit_arrow``)."""
    ids = _id_array(ids, len(record["status"]))
    return choice_table(ids, record, choice_schema(ids.type, candidates, metadata))


def coefficient_columns(schema: pa.Schema) -> list[tuple[str, int]]:
    """(column, parameter index) of an output schema, from its metadata."""
    meta = json.loads(schema.metadata[b"batchfit"])
    return [tuple(pair) for pair in meta["coefficient_columns"]]


TEMP_EXTRA_BYTES = 40  # (what ``temp_beside`` adds to a name: dots, PID, random part)


def check_writable(path: str, directory_output: bool = False, what: str = "output"):
    """Fail before any work if ``path`` (a file, or with ``directory_output`` a directory of
    files that will replace any existing one) cannot be written: it must name a regular file
    or nothing (a FIFO or device would be replaced by a file), and a name the system allows."""
    if storage.is_remote(path):
        return _check_remote_writable(path, directory_output, what)
    path = storage.local_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not directory_output:
        raise ValueError(f"{what} {path} is a directory; give a file name")
    if not directory_output and path.endswith((os.sep, "/")):
        raise ValueError(f"{what} {path} ends in '/'; give a file name")
    if not directory_output and os.path.exists(path) and \
            not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{what} {path} is not a regular file (batchfit writes a new file "
                         "and renames it into place); give a file name")
    name_max = _name_max(directory)
    if len(os.fsencode(os.path.basename(path))) > name_max:
        raise ValueError(f"{what} {path}: the file name is longer than this file system "
                         f"allows ({name_max} bytes)")
    if not os.path.isdir(directory):
        raise ValueError(f"{what} directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{what} directory is not writable: {directory}")


def _check_remote_writable(path: str, directory_output: bool, what: str):
    """A store's target: not a "directory" where a file is asked for, in a bucket (or
    container) that exists."""
    shown = storage.shown(path)
    if not directory_output and path.endswith("/"):
        raise ValueError(f"{what} {shown} ends in '/'; give a file name")
    if not directory_output and storage.is_dir(path):
        raise ValueError(f"{what} {shown} is a directory; give a file name")
    bucket = storage.missing_bucket(path)
    if bucket:
        raise ValueError(f"{what} bucket does not exist: {bucket}")


def _name_max(directory: str) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_apart(path: str, input_path: str, what: str = "output",
                directory_output: bool = False):
    """Refuse to write ``path`` over the input: the input file itself, a file inside an
    input directory (the next run would read it as data), or, for a directory output that
    replaces what is there, a directory holding the input."""
    if storage.is_remote(path) or storage.is_remote(input_path):
        if storage.scheme(path) == storage.scheme(input_path) and storage.exists(input_path):
            _check_apart(storage.identity(path)[1], storage.identity(input_path)[1], "/",
                         storage.is_dir(input_path), path, input_path, what, directory_output)
        return
    path, input_path = storage.local_path(path), storage.local_path(input_path)
    if not os.path.exists(input_path):
        return  # (the reader says so)
    source = os.path.realpath(input_path)
    _check_apart(os.path.realpath(path), source, os.sep, os.path.isdir(source), path,
                 input_path, what, directory_output)


def _check_apart(target: str, source: str, sep: str, source_is_dir: bool, path: str,
                 input_path: str, what: str, directory_output: bool):
    path, input_path = storage.shown(path), storage.shown(input_path)
    if target == source:
        raise ValueError(f"{what} {path} is the input; writing it would destroy the data")
    if source_is_dir and target.startswith(source + sep):
        raise ValueError(f"{what} {path} lies inside the input directory {input_path}; "
                         "the next run would read it as input")
    if directory_output and source.startswith(target + sep):
        raise ValueError(f"{what} {path} holds the input {input_path}; replacing it would "
                         "destroy the data")


def _default_permissions(directory: bool = False) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def hidden_beside(path: str, suffix: str, room: int = TEMP_EXTRA_BYTES) -> str:
    """``.NAME`` + ``suffix`` beside ``path``. A name too near the system's limit to take
    ``room`` more bytes is cut, with a digest of the whole name so that cut names differ.
    (In a store: no limit is known, the name is kept whole.)"""
    if storage.is_remote(path):
        return storage.join(storage.parent(path), f".{storage.basename(path)}{suffix}")
    directory, name = os.path.split(os.path.abspath(path))
    encoded = os.fsencode(name)
    if len(encoded) + room > _name_max(directory):
        digest = hashlib.sha256(encoded).hexdigest()[:12]
        cut = encoded[:_name_max(directory) - room - len(digest) - 1].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return os.path.join(directory, f".{name}{suffix}")


def temp_beside(path: str, directory: bool = False) -> str:
    """A new hidden temporary file (or ``directory``) ``.NAME.PID.XXXX.tmp`` beside ``path``,
    after removing the ones a killed run (a PID no longer alive on this machine) left
    behind."""
    parent = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(hidden_beside(path, "."))
    for entry in os.listdir(parent):
        pid = entry[len(prefix):].split(".")[0]
        if entry.startswith(prefix) and entry.endswith(".tmp") and pid.isdigit() \
                and not _alive(int(pid)):
            _remove(os.path.join(parent, entry))
    name = {"dir": parent, "prefix": f"{prefix}{os.getpid()}.", "suffix": ".tmp"}
    if directory:
        return tempfile.mkdtemp(**name)
    fd, temp = tempfile.mkstemp(**name)
    os.close(fd)
    return temp


def _remote_temp(path: str) -> str:
    """A hidden temporary name ``.NAME.PID.XXXXXXXX.tmp`` beside a store's ``path`` (of a
    file or a prefix). What a killed run leaves there is not removed by the next: a PID
    tells nothing about another machine's runs."""
    return hidden_beside(path, f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def move(source: str, target: str):
    """Move a store's object ``source`` to ``target`` (same store), replacing what is there."""
    filesystem, inner = storage.locate(source)
    try:
        filesystem.move(inner, storage.locate(target)[1])
    except (OSError, pa.ArrowException) as exc:
        raise storage.failure(f"cannot write {storage.shown(target)}", exc) from None


def _remove(path: str):
    """Remove a file or a directory tree, if it is there and ours to remove."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:  # gone already, or not ours to remove
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class AtomicParquetWriter:
    """Write a Parquet file table by table; it appears at ``path`` only on ``commit``.

    The data goes to a hidden temporary file in the target directory (so the final rename is
    atomic); on any failure, or if never committed, the temporary file is removed and an older
    file at ``path`` is left untouched. Small tables are buffered into row groups of about
    ``ROW_GROUP`` rows (a row group per small write would make writing, and later reading,
    slow). Use as a context manager. ``final``: renaming this file into place finishes the
    command (``batchfit.core.interrupts.finish``: a signal after it no longer interrupts).
    """

    ROW_GROUP = 1 << 17

    def __init__(self, path: str, schema: pa.Schema, use_dictionary=True,
                 background: bool = False, final: bool = False):
        check_writable(path)
        self.path, self.final = path, final
        self.remote = storage.is_remote(path)
        with interrupts.deferred():  # (made and recorded at once: an interrupt removes it)
            self.temp = _remote_temp(path) if self.remote else temp_beside(path)
            interrupts.remove_on_interrupt(self.temp, storage.unlink)
        try:
            filesystem, where = storage.locate(self.temp) if self.remote else (None, self.temp)
            self.writer = pq.ParquetWriter(where, schema, filesystem=filesystem,
                                           use_dictionary=use_dictionary,
                                           write_page_checksum=True)
        except BaseException:
            self._remove_temp()
            raise
        self.rows = 0
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        # background: row groups are encoded and written by a thread of their own (pyarrow
        # releases the GIL), while the caller prepares the next ones; one at a time, in order.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batchfit-write") \
            if background else None
        self.inflight = None

    def write(self, table: pa.Table):
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.ROW_GROUP:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_rows = [], 0
        if self.pool is None:
            self._write(table)
            return
        self._wait()
        self.inflight = self.pool.submit(self._write, table)

    def _write(self, table: pa.Table):
        self.writer.write_table(table, row_group_size=1 << 20)

    def _wait(self):
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            inflight.result()

    def commit(self):
        try:
            self._flush()
            self._wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        self.writer.close()
        if not self.remote:
            os.chmod(self.temp, _default_permissions())
        if self.final:
            interrupts.finish()
        if self.remote:
            move(self.temp, self.path)
        else:
            os.replace(self.temp, self.path)
        interrupts.forget(self.temp)

    def abort(self):
        try:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.writer.close()
        finally:
            self._remove_temp()

    def _remove_temp(self):
        if self.remote:
            storage.remove(self.temp)
        elif os.path.exists(self.temp):
            os.unlink(self.temp)
        interrupts.forget(self.temp)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            try:
                self.commit()
            except BaseException:  # (an interrupt, or a full disk, before the rename)
                self.abort()
                raise
        else:
            self.abort()
        return False


def write_table_atomically(path: str, table: pa.Table):
    with AtomicParquetWriter(path, table.schema) as writer:
        writer.write(table)


def is_local(path: str) -> bool:
    """Whether ``path`` is on this machine's file system (a plain path or a ``file://`` URI)
    rather than a store's URI such as ``s3://bucket/key``."""
    return not storage.is_remote(path)


SUCCESS_MARKER = "_SUCCESS"


@contextlib.contextmanager
def atomic_directory(path: str, on_failure=None):
    """A directory of files that appears complete at ``path`` only when the block succeeds;
    the block is given the directory to write its files in. A local ``path``: a hidden
    temporary directory beside it (named as ``AtomicParquetWriter``'s temporary files, so
    that a killed run's is removed by the next), renamed into place at the end, an older
    output removed only afterwards; if the block fails, ``on_failure()`` is called (to stop
    writers elsewhere) and the temporary directory removed, an older output untouched. A
    store's ``path`` has no rename: the block writes under a hidden temporary prefix beside
    it, and on success an older output's objects are removed, the new ones moved in, and a
    ``_SUCCESS`` object written last (Spark's convention) marks the output complete; on
    failure, the temporary prefix is removed and an older output is untouched."""
    if not is_local(path):
        yield from _remote_directory(path, on_failure)
        return
    temp = None
    try:
        with interrupts.deferred():  # (made and held at once: a failure below removes it)
            temp = temp_beside(path, directory=True)
        yield temp
        _replace_directory(temp, path)
    except BaseException:
        try:
            if on_failure is not None:
                on_failure()
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        raise


def _replace_directory(temporary: str, final: str):
    """Move the finished directory into place; an older output (a directory or a file) is
    removed only afterwards."""
    os.chmod(temporary, _default_permissions(directory=True))  # (mkdtemp's is private: 0700)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(temporary, final)
    if old:
        _remove(old)


def _remote_directory(path: str, on_failure):
    temp = _remote_temp(path.rstrip("/"))
    try:
        filesystem, inner = storage.locate(temp)
        filesystem.create_dir(inner, recursive=True)  # (a real one under local://)
        yield temp
        _publish_directory(temp, path)
    except BaseException:
        try:
            if on_failure is not None:
                on_failure()
        finally:
            storage.remove(temp)
        raise


def _publish_directory(temporary: str, final: str):
    """A store's finished directory into place: an older output's objects removed, the new
    ones moved in, ``_SUCCESS`` last; the temporary prefix removed."""
    filesystem, source = storage.locate(temporary)
    target = storage.locate(final)[1].rstrip("/")
    try:
        storage.remove(final)
        filesystem.create_dir(target, recursive=True)
        for entry in filesystem.get_file_info(pafs.FileSelector(source, recursive=True)):
            if entry.type == pafs.FileType.File:
                filesystem.move(entry.path, target + entry.path[len(source):])
        with filesystem.open_output_stream(f"{target}/{SUCCESS_MARKER}") as stream:
            stream.write(b"")
    except (OSError, pa.ArrowException) as exc:
        raise storage.failure(f"cannot write {storage.shown(final)}", exc) from None
    storage.remove(temporary)


# ---------------------------------------------------------------- training history

HISTORY_QUANTILE_COLUMNS = ["loss_p05", "loss_p25", "loss_median", "loss_p75", "loss_p95"]


def history_table(history, tracked_ids: list, coefficients: list[tuple[str, int]],
                  metadata: dict) -> pa.Table:
    """A history as one wide table: ``epoch``, the batch's loss quantiles, and a
    ``loss_series_<id>`` column per tracked series; tracked series' initial parameters and
    the run's options go in the ``batchfit_history`` metadata entry."""
    quantiles = history.loss_quantiles.numpy()
    columns = {"epoch": pa.array(history.epochs.numpy(), pa.int64())}
    for j, name in enumerate(HISTORY_QUANTILE_COLUMNS):
        columns[name] = pa.array(quantiles[:, j], from_pandas=True)
    tracked = []
    initial = history.tracked_initial_params.numpy()
    for j, series_id in enumerate(tracked_ids):
        column = f"loss_series_{series_id}"
        columns[column] = pa.array(history.tracked_loss[:, j].numpy().astype(np.float64),
                                   from_pandas=True)
        tracked.append({"series_id": series_id, "column": column,
                        "initial": {name: float(initial[j, index])
                                    for name, index in coefficients}})
    entry = {**metadata, "tracked": tracked, "sampled_series": int(history.sample_loss.shape[1])}
    schema = pa.table(columns).schema.with_metadata(
        {"batchfit_history": json.dumps(entry, sort_keys=True, default=str)})
    return pa.table(columns, schema=schema)


def column_sum(table: pa.Table, name: str) -> int:
    return int(pc.sum(table[name]).as_py() or 0)


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables)
