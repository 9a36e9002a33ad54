"""Everything batchfit reads and writes, and the one package that imports pyarrow.

schema: which columns hold what, checked; read: datasets (Parquet, CSV or Arrow IPC) as
streams of decoded batches or of whole-series chunks; write: outputs, atomically; checkpoint: ``--resume``; artefacts: readers
of batchfit's own files.
"""

from batchfit.io.artefacts import (
    coefficient_table,
    read_coefficients,
    read_history,
    read_metadata,
    read_parquet,
)
from batchfit.io.checkpoint import Checkpoint
from batchfit.io.read import (
    BATCH_ROWS,
    EXTENSIONS,
    INPUT_FORMATS,
    Batch,
    Chunk,
    Dataset,
    arrow_table,
    check_input_format,
    dataset_files,
    file_format,
    format_by_name,
    ids_of_type,
    indices,
    list_files,
    positions_in,
    read_series,
    table_chunks,
)
from batchfit.io.schema import FORMATS, ColumnSpec, describe, first_line
from batchfit.io.write import (
    AtomicParquetWriter,
    check_apart,
    check_writable,
    column_sum,
    concat_tables,
    count_statuses,
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
    "coefficient_table",
    "column_sum",
    "concat_tables",
    "count_statuses",
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
    "status_counts",
    "table_chunks",
    "write_table_atomically",
]
