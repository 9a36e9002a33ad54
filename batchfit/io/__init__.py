"""Everything batchfit reads and writes, and the one package that imports pyarrow.

schema: which columns hold what, checked; read: datasets as streams of decoded batches or of
whole-series chunks; write: outputs, atomically; checkpoint: ``--resume``; artefacts: readers
of batchfit's own files.
"""

from .artefacts import read_coefficients, read_history, read_metadata, read_parquet, read_series
from .checkpoint import Checkpoint
from .read import (
    BATCH_ROWS,
    Batch,
    Chunk,
    Dataset,
    arrow_table,
    ids_of_type,
    indices,
    list_files,
    positions_in,
    table_chunks,
)
from .schema import FORMATS, ColumnSpec, describe, first_line
from .write import (
    AtomicParquetWriter,
    check_apart,
    check_writable,
    column_sum,
    concat_tables,
    count_statuses,
    fit_arrow,
    history_table,
    output_schema,
    result_table,
    status_counts,
    write_table_atomically,
)

__all__ = [
    "BATCH_ROWS",
    "FORMATS",
    "AtomicParquetWriter",
    "Batch",
    "Checkpoint",
    "Chunk",
    "ColumnSpec",
    "Dataset",
    "arrow_table",
    "check_apart",
    "check_writable",
    "column_sum",
    "concat_tables",
    "count_statuses",
    "describe",
    "first_line",
    "fit_arrow",
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
