"""Everything batchfit reads and writes, and the one package that imports pyarrow.

Reading, bottom up: schema (which columns hold what, checked) and footer (a Parquet footer
vetted before pyarrow touches it); listing (a dataset path's files and their formats);
sources (a Parquet, CSV or Arrow IPC file as a stream of record batches); ordered_pool
(threads whose results come back in order); series_codes (dense codes for series ids);
chunks (whole series, back to back, in a canonical order); decode (pieces into the
kernel's flat arrays); in_memory (Arrow for tables and ids that callers hold); dataset (a
checked dataset, read as decoded batches or as whole-series chunks). Writing: write
(outputs, atomically), checkpoint (``--resume``), artefacts (readers of batchfit's own
files). Beneath them all, storage: where a path lives (this machine, or a store a URI names).
"""

from batchfit.io import storage
from batchfit.io.artefacts import (
    coefficient_table,
    read_coefficients,
    read_history,
    read_metadata,
    read_parquet,
)
from batchfit.io.checkpoint import Checkpoint
from batchfit.io.chunks import Chunk, table_chunks
from batchfit.io.dataset import Dataset, read_series
from batchfit.io.decode import Batch
from batchfit.io.in_memory import arrow_table, ids_of_type, indices, positions_in
from batchfit.io.listing import (
    EXTENSIONS,
    INPUT_FORMATS,
    check_input_format,
    dataset_files,
    file_format,
    format_by_name,
    list_files,
)
from batchfit.io.schema import FORMATS, ColumnSpec, describe, first_line
from batchfit.io.sources import BATCH_ROWS
from batchfit.io.storage import same_file, split_paths
from batchfit.io.write import (
    AtomicParquetWriter,
    check_apart,
    check_writable,
    choice_arrow,
    choice_schema,
    column_sum,
    concat_tables,
    count_statuses,
    covariance_columns,
    fit_arrow,
    frame_name,
    history_table,
    output_schema,
    result_table,
    status_counts,
    write_table_atomically,
)

__all__ = [
    "BATCH_ROWS",
    "EXTENSIONS",
    "FORMATS",
    "INPUT_FORMATS",
    "AtomicParquetWriter",
    "Batch",
    "Checkpoint",
    "Chunk",
    "ColumnSpec",
    "Dataset",
    "arrow_table",
    "check_apart",
    "check_input_format",
    "check_writable",
    "choice_arrow",
    "choice_schema",
    "coefficient_table",
    "column_sum",
    "concat_tables",
    "count_statuses",
    "covariance_columns",
    "dataset_files",
    "describe",
    "file_format",
    "first_line",
    "fit_arrow",
    "format_by_name",
    "frame_name",
    "history_table",
    "ids_of_type",
    "indices",
    "list_files",
    "output_schema",
    "positions_in",
    "read_coefficients",
    "read_history",
    "read_metadata",
    "read_parquet",
    "read_series",
    "result_table",
    "same_file",
    "split_paths",
    "status_counts",
    "storage",
    "table_chunks",
    "write_table_atomically",
]
