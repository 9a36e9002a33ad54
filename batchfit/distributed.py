"""Ray Data adapter: ``batchfit run --engine ray``. No maths here: every task runs
``batchfit.fit_table`` (the single-machine engine) on whole series.

How series stay whole: list-format rows are series, so batches map directly. Long-format rows
are hash-partitioned by series id (``repartition(keys=...)``), so each partition holds every
point of its series, and each partition is fitted as one batch. Partitions are sized well under
Ray's block size limit so a partition is never split into two blocks, and the job checks at the
end that every input series came back exactly once (a split would show as a duplicate).

Outputs: a directory of Parquet files in the single-machine output schema. A local output is
written to a hidden temporary directory beside it and renamed into place only when every
task succeeded; a remote one (``s3://...``) gets a ``_SUCCESS`` marker last (Spark's
convention), so a failed job never leaves output that looks complete. Ray re-runs a task whose
worker or node died (its default for tasks); an error raised by the fit itself fails the job.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import __version__, io
from .job import JobSummary, fit_table, job_columns
from .options import resolve

PARTITION_BYTES = 32 << 20  # decoded input per partition: far below Ray's 128 MiB blocks


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _fit_partition(table: pa.Table, columns: io.ColumnSpec, options: dict,
                   schema: pa.Schema) -> pa.Table:
    """One Ray task: fit the whole series of a partition with the single-machine engine."""
    if table.num_rows == 0:
        return schema.empty_table()
    return fit_table(table, columns=columns, **options).cast(schema)


def run_ray(input_path: str, output_path: str, *, columns: io.ColumnSpec | None = None,
            address: str | None = None, workers: int | None = None,
            num_gpus_per_worker: float = 0, **fit_options) -> JobSummary:
    """Fit every series of ``input_path`` on a Ray cluster (or a local Ray started here) and
    write a directory of Parquet files to ``output_path``. Same options and output schema as
    ``run_job``; raises ValueError with a one-line message for bad input."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("the Ray engine needs Ray: pip install 'batchfit[ray]'") from None
    start = time.perf_counter()
    columns = columns or io.ColumnSpec()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker}")
    resolved = resolve(**fit_options)
    local_output = _is_local(output_path)
    if local_output:
        io.check_writable(output_path.rstrip("/") or ".", directory_output=True)
        if _is_local(input_path):
            io.check_apart(output_path.rstrip("/") or ".", input_path, directory_output=True)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        return _run(ray, input_path, output_path, columns, workers, num_gpus_per_worker,
                    fit_options, resolved, local_output, start)
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, input_path, output_path, columns, workers, gpus, fit_options, resolved,
         local_output, start) -> JobSummary:
    local = _is_local(input_path)
    files = io.list_files(input_path) if local else input_path
    try:
        # A local path gets the local filesystem explicitly: Ray's own resolution of several
        # paths reaches for fsspec's HTTP filesystem (which needs aiohttp) on the way.
        dataset = ray.data.read_parquet(files, filesystem=pafs.LocalFileSystem() if local
                                        else None)
        layout = io.describe(_arrow_schema(dataset), columns, input_path)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"cannot read {input_path}: {io.first_line(exc)}") from None
    dataset = dataset.select_columns(layout.columns)
    n_rows = dataset.count()
    if n_rows == 0:
        raise ValueError(f"empty input: {input_path} has no rows")
    if layout.format == "long":
        partitions = max(1, -(-n_rows * 8 * len(layout.columns) // PARTITION_BYTES))
        dataset = dataset.repartition(partitions, keys=[columns.series_id])
    metadata = {"version": __version__, **resolved.describe(), "input": input_path,
                "format": layout.format, "engine": "ray",
                "columns": {"series_id": columns.series_id, "x": columns.x, "y": columns.y,
                            "weight": columns.weight if layout.has_weight else None},
                "options": {k: v for k, v in fit_options.items() if not callable(v)}}
    schema = io.output_schema(layout.id_type, job_columns(resolved), metadata,
                              restarts=bool(resolved.restarts), id_name=columns.series_id)
    # device "auto" in a task means the worker's own GPU when it was given one.
    # batch_size None is a whole block per batch; GPU tasks must name a size: the whole
    # dataset's row count can never cut a bundle of whole partitions.
    fitted = dataset.map_batches(
        _fit_partition, batch_format="pyarrow", batch_size=n_rows if gpus else None,
        zero_copy_batch=True,
        fn_kwargs={"columns": columns, "options": fit_options, "schema": schema},
        num_gpus=gpus or None, concurrency=workers)
    target = output_path
    if local_output:
        parent = os.path.dirname(os.path.abspath(output_path))
        target = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_path)}.")
    try:
        fitted.write_parquet(target)
        summary = _check_and_count(target, input_path, dataset, layout, columns)
    except BaseException:
        if local_output:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if local_output:
        _replace_directory(target, output_path)
    else:
        _write_success_marker(output_path)
    n_series, n_points, counts = summary
    return JobSummary(input_path, output_path, n_series, n_points, counts,
                      time.perf_counter() - start, layout.format, True, metadata)


def _arrow_schema(dataset) -> pa.Schema:
    schema = dataset.schema()
    return schema.base_schema if hasattr(schema, "base_schema") else schema


def _check_and_count(output_dir: str, input_path: str, dataset, layout, columns):
    """Every input series exactly once in the output, or the job fails."""
    out = pq.read_table(output_dir, columns=[columns.series_id, "n_points", "status"]) \
        if _is_local(output_dir) else None
    expected = dataset.select_columns([columns.series_id]).unique(columns.series_id)
    if out is None:  # remote output: trust the row count
        return len(expected), 0, {}
    ids = out[columns.series_id]
    distinct = pc.count_distinct(ids).as_py()
    if out.num_rows != distinct or distinct != len(expected):
        raise RuntimeError(f"{out.num_rows} output rows for {distinct} distinct ids and "
                           f"{len(expected)} input series: a series was split or lost")
    counts = Counter(out["status"].to_pylist())
    return out.num_rows, int(pc.sum(out["n_points"]).as_py() or 0), dict(counts)


def _replace_directory(temporary: str, final: str):
    """Move the finished output into place; an older output is removed only afterwards."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(temporary, final)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


def _write_success_marker(output_path: str):
    filesystem, path = pafs.FileSystem.from_uri(output_path)
    with filesystem.open_output_stream(f"{path.rstrip('/')}/_SUCCESS") as stream:
        stream.write(b"")
