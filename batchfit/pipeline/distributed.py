"""Ray adapter: ``batchfit run --engine ray``. No maths here: every task runs the
single-machine library (``batchfit.pipeline.job``'s statistics in parts, or ``fit_table``).

MSE polynomial fits (``Options.aggregates``) move statistics, not points, whether the input
is on this machine or in a store (``io.storage``: each task reads its share from there):
the input's batches are shared out (``job.share_out``) among one Ray task per worker slot,
each reading its share with batchfit's own reader and gathering the per-series statistics of
the single-machine job (``job.part_statistics``). Each task hash-partitions its small table
by series id; one merge task per partition merges the rows of each series from every part
(``job.merge_statistics``), solves them and writes its file. Series whose sums lost digits
(the single-machine job's refinement) get one more pass: every task gathers their residual
moments over its share (``job.residual_moments``), the driver adds them up, and their
partitions are refined (``job.refine_untrusted``) before they are written. List-format rows
are whole series: each task fits and writes its share, with no exchange at all.

Other jobs (robust losses, nonlinear models, GD/Adam) move points with Ray Data (reading
through the same filesystem as batchfit's reader): long-format rows are hash-partitioned by series id (``repartition(keys=...)``), so each
partition holds every point of its series, and each partition is fitted as one batch by
``fit_table``. Partitions are sized well under Ray's block size limit so a partition is never
split into two blocks. Both paths check at the end that every input series came back exactly
once (a split would show as a duplicate).

Outputs: a directory of Parquet files in the single-machine output schema, with the same
metadata (``metadata.job_metadata``), published by ``io.write.atomic_directory``: a local
output is written to a hidden temporary directory beside it and renamed into place only when
every task succeeded; a store's is written under a temporary prefix and moved into place at
the end, with a ``_SUCCESS`` marker last (Spark's convention), so a failed job never leaves
output that looks complete. Ray re-runs a task whose
worker or node died (its default for tasks); an error raised by the fit itself fails the job.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchfit import engine, io
from batchfit.core.options import resolve
from batchfit.io import storage
from batchfit.io.write import atomic_directory
from batchfit.pipeline.job import (
    DEFAULT_BATCH_SIZE,
    DatasetPart,
    JobSummary,
    add_covariance,
    check_x_columns,
    fit_part,
    fit_table,
    job_schema,
    merge_statistics,
    part_statistics,
    refine_untrusted,
    residual_moments,
    share_out,
    solve_statistics,
    untrusted_rows,
)
from batchfit.pipeline.metadata import job_metadata

PARTITION_BYTES = 32 << 20  # decoded input per partition: far below Ray's 128 MiB blocks


def _fit_partition(table: pa.Table, columns: io.ColumnSpec, options: dict,
                   schema: pa.Schema) -> pa.Table:
    """One Ray task: fit the whole series of a partition with the single-machine engine."""
    if table.num_rows == 0:
        return schema.empty_table()
    return fit_table(table, columns=columns, **options).cast(schema)


def run_ray(input_path: str, output_path: str, *, columns: io.ColumnSpec | None = None,
            address: str | None = None, workers: int | None = None,
            num_gpus_per_worker: float = 0, input_format: str = "auto",
            storage_options: dict[str, str] | None = None, **fit_options) -> JobSummary:
    """Fit every series of ``input_path`` on a Ray cluster (or a local Ray started here) and
    write a directory of Parquet files to ``output_path``. Same options and output schema as
    ``run_job``; raises ValueError with a one-line message for bad input. Reads Parquet and
    CSV (Ray Data has no Arrow IPC reader: an IPC input is refused). Either path may be a
    store's URI (``run_job``'s ``storage_options``); the tasks reach it alike."""
    (input_path, output_path), options = io.split_paths([input_path, output_path],
                                                        storage_options)
    with storage.using(options):
        return _run_ray(input_path, output_path, columns, address, workers,
                        num_gpus_per_worker, input_format, fit_options)


def _run_ray(input_path, output_path, columns, address, workers, num_gpus_per_worker,
             input_format, fit_options) -> JobSummary:
    kind = _input_kind(input_path, input_format)
    try:
        import ray  # (ray.data, ~1 s more to import, only where points travel: see _run)
    except ImportError:
        raise ValueError("the Ray engine needs Ray: pip install 'batchfit[ray]'") from None
    start = time.perf_counter()
    columns = columns or io.ColumnSpec()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker}")
    resolved = resolve(**fit_options)
    check_x_columns(resolved, columns)
    if kind == "ipc" and not resolved.aggregates:
        raise ValueError(f"the Ray engine moves points from Parquet and CSV, and "
                         f"{storage.shown(input_path)} is Arrow IPC: convert it to Parquet, "
                         "or use the local engine (an MSE polynomial fit of an IPC input "
                         "runs on Ray)")
    output_path = output_path.rstrip("/") or "."
    io.check_writable(output_path, directory_output=True)
    io.check_apart(output_path, input_path, directory_output=True)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        return _run(ray, input_path, output_path, columns, workers, num_gpus_per_worker,
                    fit_options, resolved, start, kind)
    finally:
        if started_here:
            ray.shutdown()


def _input_kind(input_path: str, input_format: str) -> str:
    """parquet, csv or ipc: the input's files' (``io.dataset_files``)."""
    return {kind for _, kind in io.dataset_files(input_path, input_format)}.pop()


def _run(ray, input_path, output_path, columns, workers, gpus, fit_options, resolved,
         start, kind) -> JobSummary:
    if resolved.aggregates:
        return _run_statistics(ray, input_path, output_path, columns, workers, gpus,
                               fit_options, resolved, start, kind)
    try:
        import ray.data
        from ray.data.datasource import FilenameProvider
    except ImportError:
        raise ValueError("the Ray engine needs Ray Data: pip install 'batchfit[ray]'") from None
    # The files, and the filesystem, as batchfit's reader has them (Ray's own resolution
    # of several paths reaches for fsspec's HTTP filesystem, and knows no storage options).
    filesystem = storage.locate(input_path)[0]
    files = [storage.locate(file)[1] for file, _ in io.dataset_files(input_path, kind)]
    try:
        if kind == "csv":
            # One set of column types for every file (Ray infers them per file otherwise),
            # from batchfit's own reading of the files' first blocks.
            options = {"convert_options": io.Dataset(input_path, columns, "csv")
                       .csv_convert_options()}
            dataset = ray.data.read_csv(files, filesystem=filesystem, **options)
        else:
            dataset = ray.data.read_parquet(files, filesystem=filesystem)
        layout = io.describe(_arrow_schema(dataset), columns, input_path)
    except (OSError, pa.ArrowException) as exc:
        raise storage.failure(f"cannot read {storage.shown(input_path)}", exc) from None
    dataset = dataset.select_columns(layout.columns)
    n_rows = dataset.count()
    if n_rows == 0:
        raise ValueError(f"empty input: {input_path} has no rows")
    if layout.format == "long":
        partitions = max(1, -(-n_rows * 8 * len(layout.columns) // PARTITION_BYTES))
        dataset = dataset.repartition(partitions, keys=[columns.series_id])
    metadata = job_metadata(resolved, input_path, layout, kind, columns, fit_options,
                            engine="ray")
    schema = job_schema(resolved, layout.id_type, metadata, columns.series_id)
    # device "auto" in a task means the worker's own GPU when it was given one.
    # batch_size None is a whole block per batch; GPU tasks must name a size: the whole
    # dataset's row count can never cut a bundle of whole partitions.
    fitted = dataset.map_batches(
        _fit_partition, batch_format="pyarrow", batch_size=n_rows if gpus else None,
        zero_copy_batch=True,
        fn_kwargs={"columns": columns, "options": fit_options, "schema": schema},
        num_gpus=gpus or None, concurrency=workers)
    # The files are named after this job: a remote output may hold an earlier job's too.
    job_id = uuid.uuid4().hex
    with atomic_directory(output_path) as target:
        out_filesystem, out_path = storage.locate(target)
        fitted.write_parquet(out_path, filesystem=out_filesystem,
                             filename_provider=FilenameProvider(dataset_uuid=job_id,
                                                                file_format="parquet"))
        n_series, n_points, counts = _check_and_count(target, job_id, dataset, columns)
    return JobSummary(input_path, output_path, n_series, n_points, counts,
                      time.perf_counter() - start, layout.format, True, metadata)


def _arrow_schema(dataset) -> pa.Schema:
    schema = dataset.schema()
    return schema.base_schema if hasattr(schema, "base_schema") else schema


def _check_and_count(target: str, job: str, dataset, columns):
    """Every input series exactly once in the files of job ``job`` (local or remote), or the
    job fails; the tally of those files: (series, points, series per status)."""
    filesystem, root = storage.locate(target)
    files = sorted(info.path for info in filesystem.get_file_info(pafs.FileSelector(root))
                   if info.base_name.startswith(job) and info.base_name.endswith(".parquet"))
    expected = dataset.select_columns([columns.series_id]).unique(columns.series_id)
    out = pq.read_table(files, filesystem=filesystem,
                        columns=[columns.series_id, "n_points", "status"]) if files else None
    rows = 0 if out is None else out.num_rows
    distinct = 0 if out is None else pc.count_distinct(out[columns.series_id]).as_py()
    if rows != distinct or distinct != len(expected):
        raise RuntimeError(f"{rows} output rows for {distinct} distinct ids and "
                           f"{len(expected)} input series: a series was split or lost")
    return rows, io.column_sum(out, "n_points"), io.status_counts(out)


# ---------------------------------------------------------------- MSE: statistics, not points

@dataclass(frozen=True)
class _Job:
    """What every task of a statistics job needs (shipped to each task, which gets a copy)."""

    columns: io.ColumnSpec
    input_format: str
    fit_options: dict
    weighted: bool
    double: bool  # points decode as float64
    schema: pa.Schema
    codes: object  # the dataset's SeriesCodes, fresh (each task codes its own share)
    points: int  # about how many the whole job has (every task chooses its backend alike)
    storage_options: dict  # how the tasks reach a store (``io.storage.using``)

    def backend(self):
        return engine.moment_backend(resolve(**self.fit_options))

    def part(self, pieces) -> DatasetPart:
        return DatasetPart(pieces, self.columns, self.input_format)

    def fresh_codes(self):
        return copy.deepcopy(self.codes)


def _run_statistics(ray, input_path, output_path, columns, workers, gpus, fit_options,
                    resolved, start, kind) -> JobSummary:
    """An MSE polynomial job (see the module docstring): statistics travel, points stay."""
    begun = time.perf_counter()  # (after Ray started)
    dataset = io.Dataset(input_path, columns, kind)
    layout = dataset.layout
    metadata = job_metadata(resolved, input_path, layout, dataset.file_format, columns,
                            fit_options, engine="ray")
    schema = job_schema(resolved, layout.id_type, metadata, columns.series_id)
    shares = share_out(dataset, workers or _slots(ray, gpus))
    job = _Job(columns, kind, fit_options, layout.has_weight,
               dataset.point_dtype == np.float64, schema,
               dataset.series_codes(unique_rows=layout.format == "list",
                                    degree=resolved.degree),
               dataset.points_estimate, storage.current_options())
    task = {"num_cpus": 1, "num_gpus": gpus or 0}
    refs: list = []  # every task started (waited for if the job fails)
    stages = {"start_s": begun - start, "plan_s": time.perf_counter() - begun,
              "tasks": len(shares)}
    with atomic_directory(output_path, lambda: _settle(ray, refs)) as target:
        if layout.format == "list":
            rows, written = _whole_series(ray, shares, job, target, task, refs, stages)
        else:
            rows, written = _merged_series(ray, shares, job, target, task, refs, stages)
        known = [source.num_rows for _, source in dataset.files if source.has_rows]
        if None not in known and rows != sum(known):
            raise RuntimeError(f"the tasks read {rows} rows of the {sum(known)} in "
                               f"{storage.shown(input_path)}: a share was read twice or lost (a bug)")
        checked = time.perf_counter()
        n_series, n_points, counts = _check_written(target, written, columns, layout.format)
        stages["check_s"] = time.perf_counter() - checked
    # (the stages, timed by the tasks themselves, travel with the summary, not the files)
    return JobSummary(input_path, output_path, n_series, n_points, counts,
                      time.perf_counter() - start, layout.format, False,
                      {**metadata, "stages": stages})


class _Clock:
    """A task's wall and CPU seconds, for the summary's stage timings."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def info(self, **values) -> dict:
        import ray  # (in a task: Ray is there)

        return {**values, "wall_s": time.perf_counter() - self.wall,
                "cpu_s": time.process_time() - self.cpu,
                "node": ray.get_runtime_context().get_node_id()}


def _stage(infos: list, submitted: float) -> dict:
    """A stage's tasks: how many, the longest one's wall seconds, their CPU seconds (and
    those of writing), and the driver's wait from submitting the job's tasks to their end."""
    return {"tasks": len(infos), "wall_s": max((i["wall_s"] for i in infos), default=0.0),
            "cpu_s": sum(i["cpu_s"] for i in infos),
            "write_s": sum(i.get("write_s", 0.0) for i in infos),
            "nodes": len({i["node"] for i in infos}),
            "done_after_s": time.perf_counter() - submitted}


def _slots(ray, gpus: float) -> int:
    """Tasks the cluster runs at once: one per CPU (per ``gpus`` GPUs for GPU tasks)."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1))
    if gpus:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    return max(1, slots)


def _get(ray, refs):
    """``ray.get``, a task's own ValueError (bad input) raised as itself: one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError):
            raise ValueError(str(exc.cause)) from None
        raise


def _settle(ray, refs: list):
    """Wait for the tasks of a failed job to end (none may write afterwards). They are not
    cancelled: in Ray 2.60, cancelling a task whose reply is arriving crashes the driver
    ("Tried to complete task that was not pending"), and the tasks are short; those that
    need a failed task's result fail at once."""
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _whole_series(ray, shares, job, target, task, refs, stages):
    """List format: each task fits the whole series of its share and writes them."""
    remote = ray.remote(_whole_series_task).options(**task)
    refs += [remote.remote(index, pieces, job, target) for index, pieces in enumerate(shares)]
    submitted = time.perf_counter()
    infos = _get(ray, refs)
    stages["fit"] = _stage(infos, submitted)
    rows = sum(info["rows"] for info in infos)
    if sum(info["series"] for info in infos) != rows:
        raise RuntimeError(f"{sum(info['series'] for info in infos)} series fitted of the "
                           f"{rows} rows read: a series was lost (a bug)")
    return rows, infos


def _merged_series(ray, shares, job, target, task, refs, stages):
    """Long format: partial statistics per share, hash-partitioned by id; each partition
    merged, solved and written; then the refinement pass, if any series needs one."""
    parts = len(shares)
    partial = ray.remote(_partial_task).options(num_returns=parts + 1, **task)
    merge = ray.remote(_merge_task).options(num_returns=2, **task)
    partials = [partial.remote(pieces, job, parts) for pieces in shares]
    merged = [merge.remote(p, job, target, *[out[1 + p] for out in partials])
              for p in range(parts)]
    refs += [out[0] for out in partials] + [m[0] for m in merged]
    submitted = time.perf_counter()
    gathered = _get(ray, [out[0] for out in partials])
    stages["partial"] = _stage(gathered, submitted)
    stages["partial"]["table_rows"] = sum(info["series"] for info in gathered)
    infos = _get(ray, [m[0] for m in merged])
    stages["merge"] = _stage(infos, submitted)
    flagged = [p for p, info in enumerate(infos) if "flagged" in info]
    if flagged:
        ids = pa.concat_arrays([infos[p]["flagged"]["ids"] for p in flagged])
        table = np.concatenate([infos[p]["flagged"]["table"] for p in flagged])
        q = np.concatenate([infos[p]["flagged"]["q"] for p in flagged])
        shared = ray.put((ids, table, q))
        residual = ray.remote(_residual_task).options(**task)
        pending = [residual.remote(pieces, job, shared) for pieces in shares]
        refs += pending
        submitted = time.perf_counter()
        residuals = _get(ray, pending)
        stages["residual"] = _stage([info for _, info in residuals], submitted)
        moments = sum(m for m, _ in residuals)  # (in share order)
        refine = ray.remote(_refine_task).options(**task)
        done, first = [], 0
        for p in flagged:
            count = len(infos[p]["flagged"]["ids"])
            done.append(refine.remote(p, job, target, merged[p][1],
                                      moments[first:first + count]))
            first += count
        refs += done
        for p, info in zip(flagged, _get(ray, done)):
            infos[p] = info
        stages["refine"] = _stage([infos[p] for p in flagged], submitted)
    points = sum(info["points"] for info in gathered)
    if sum(info["points"] for info in infos) != points:
        raise RuntimeError(f"{sum(info['points'] for info in infos)} points fitted of the "
                           f"{points} read: a series was split or lost (a bug)")
    return sum(info["rows"] for info in gathered), infos


def _in_store(task):
    """A task that reaches the job's store with the job's storage options."""
    @functools.wraps(task)
    def run(*args):
        job = next(arg for arg in args if isinstance(arg, _Job))
        with storage.using(job.storage_options):
            return task(*args)
    return run


@_in_store
def _partial_task(pieces, job: _Job, parts: int):
    """A Ray task: the statistics of the series in a share, one table per merge partition."""
    clock = _Clock()
    codes = job.fresh_codes()
    present, table, rows, points = part_statistics(job.part(pieces), codes, job.backend(),
                                                   job.weighted, job.double)
    ids = codes.ids(present)
    bucket = _buckets(ids, parts)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(parts + 1))
    ids, table = ids.take(pa.array(order)), table[present[order]]
    return (clock.info(rows=rows, series=len(ids), points=points),
            *[(ids.slice(lo, hi - lo), table[lo:hi]) for lo, hi in itertools.pairwise(bounds)])


def _buckets(ids: pa.Array, parts: int) -> np.ndarray:
    """Each id's merge partition, the same in every task and process (a hash of the id)."""
    if parts == 1:
        return np.zeros(len(ids), np.int64)
    if pa.types.is_integer(ids.type):
        keys = ids.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    else:
        keys = np.fromiter((zlib.crc32(value.encode()) for value in ids.to_pylist()),
                           np.uint64, len(ids))
    mixed = keys * np.uint64(0x9E3779B97F4A7C15)  # (Fibonacci hashing: wraps modulo 2**64)
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


@_in_store
def _merge_task(index: int, job: _Job, target: str, *parts):
    """A Ray task: one partition's series, their rows from every share merged and solved;
    written unless some need refining (then the solved state is returned for that)."""
    clock = _Clock()
    parts = [(ids, table) for ids, table in parts if len(ids)]
    if not parts:
        return clock.info(series=0, points=0, statuses={}), None
    backend = job.backend()
    encoded = pa.concat_arrays([ids for ids, _ in parts]).dictionary_encode()
    series = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ids = encoded.dictionary
    bounds = np.cumsum([0] + [len(part_ids) for part_ids, _ in parts])
    table = merge_statistics([series[lo:hi] for lo, hi in itertools.pairwise(bounds)],
                             [part for _, part in parts], len(ids), backend, job.weighted)
    order = pc.sort_indices(ids).to_numpy().astype(np.int64)
    chunks, records = solve_statistics(backend, table, order, job.weighted,
                                       DEFAULT_BATCH_SIZE)
    untrusted = untrusted_rows(chunks, records)
    if untrusted:
        return clock.info(flagged={"ids": ids.take(pa.array(untrusted.picked)),
                                   "table": table[untrusted.picked], "q": untrusted.q}), \
            (ids, table, chunks, records)
    add_covariance(backend, table, chunks, records)
    return clock.info(**_write_records(index, ids, chunks, records, job, target)), None


@_in_store
def _residual_task(pieces, job: _Job, flagged):
    """A Ray task: the residual moments of the flagged series over a share."""
    clock = _Clock()
    ids, table, q = flagged
    codes = job.fresh_codes()
    codes.unique_rows = False
    return residual_moments(job.part(pieces), codes, job.backend(), ids, table, q,
                            job.weighted, job.double), clock.info()


@_in_store
def _refine_task(index: int, job: _Job, target: str, state, moments):
    """A Ray task: a partition's flagged series refined with their residual moments (in the
    order of their flagged ids), then the partition written."""
    clock = _Clock()
    ids, table, chunks, records = state
    records = [{name: np.array(values) for name, values in record.items()}
               for record in records]  # (writable copies)
    refine_untrusted(job.backend(), table, chunks, records, untrusted_rows(chunks, records),
                     moments, job.weighted)
    add_covariance(job.backend(), table, chunks, records)
    return clock.info(**_write_records(index, ids, chunks, records, job, target))


@_in_store
def _whole_series_task(index: int, pieces, job: _Job, target: str):
    """A Ray task (list format): fit and write the whole series of a share."""
    clock = _Clock()
    codes = job.fresh_codes()
    chunks, records, rows = fit_part(job.part(pieces), codes, job.backend(), job.weighted,
                                     job.double, DEFAULT_BATCH_SIZE)
    tables = [io.result_table(codes.ids(chunk), record, job.schema)
              for chunk, record in zip(chunks, records)]
    return clock.info(rows=rows, **_write_part(index, tables, job, target))


def _write_records(index: int, ids: pa.Array, chunks, records, job: _Job, target: str):
    tables = [io.result_table(ids.take(pa.array(chunk)), record, job.schema)
              for chunk, record in zip(chunks, records)]
    return _write_part(index, tables, job, target)


def _write_part(index: int, tables: list, job: _Job, target: str) -> dict:
    """Write one part file of the output (none for no series), with io's writer (the
    target is a temporary directory, or prefix, of ``atomic_directory``)."""
    if not tables:
        return {"series": 0, "points": 0, "statuses": {}, "write_s": 0.0}
    begun = time.perf_counter()
    table = io.concat_tables(tables)
    name = f"part-{index:05d}.parquet"
    # (dictionary-encode only the status, as run_job: on floats it costs write time)
    with io.AtomicParquetWriter(storage.join(target, name), job.schema,
                                use_dictionary=["status"]) as writer:
        writer.write(table)
    return {"series": table.num_rows, "points": io.column_sum(table, "n_points"),
            "statuses": io.status_counts(table), "write_s": time.perf_counter() - begun}


def _check_written(target: str, written: list, columns: io.ColumnSpec, fmt: str):
    """Every series exactly once in the output, or the job fails; the tally. Long format:
    a partition's ids are distinct (one merged row each) and the partitions' ids disjoint
    (a hash of the id), so the files' row counts are checked against the tasks' (from the
    footers); list format: ids of different tasks may repeat (as input rows can), so the
    output's ids are read back."""
    n_series = sum(info["series"] for info in written)
    files = [pq.ParquetFile(storage.open_input_file(storage.join(target, name)))
             for name in sorted(storage.names(target))
             if name.endswith(".parquet") and name[0] not in "._"]
    rows = sum(file.metadata.num_rows for file in files)
    distinct = rows
    if fmt == "list" and files:
        ids = pa.chunked_array([file.read(columns=[columns.series_id])[0]
                                for file in files])
        distinct = pc.count_distinct(ids).as_py()
    if distinct < rows:
        raise ValueError(f"series ids repeat in list format ({rows - distinct} "
                         "duplicates): each row must be its own series")
    if rows != n_series:
        raise RuntimeError(f"{rows} output rows for {n_series} series fitted: a part "
                           "file is missing or extra (a bug)")
    counts = Counter()
    for info in written:
        counts.update({str(status): int(n) for status, n in info["statuses"].items()})
    return n_series, sum(info["points"] for info in written), dict(counts)
