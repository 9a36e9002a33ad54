"""The ``batchfit`` entry of a job's output schema: one builder for every engine and path, so
an output records the same things however it was made."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit._version import __version__
from batchfit.io import storage

if TYPE_CHECKING:
    from batchfit.core.options import Options
    from batchfit.io.schema import ColumnSpec, Layout

ENGINES = ("local", "ray")


def job_metadata(opts: Options, input_path: str, layout: Layout, input_format: str,
                 columns: ColumnSpec, fit_options: dict, *, engine: str, device=None,
                 batch_size: int | None = None) -> dict:
    """What a job's output records about it: the version, the resolved options
    (``Options.describe``; ``device``: where the job ran, else the device asked for, which
    each Ray worker resolves for itself), the input, its format (long or list), its files'
    format (``input_format``: parquet, csv or ipc), what a temporal x counts (``x_unit``),
    the columns read, the options as given (with ``batch_size`` where the job has one, as
    the single-machine job has) and the ``engine`` (local or ray)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    options = {key: value for key, value in fit_options.items() if not callable(value)}
    if batch_size is not None:
        options["batch_size"] = batch_size
    return {"version": __version__, **opts.describe(device), "input": storage.shown(input_path),
            "format": layout.format, "input_format": input_format, "x_unit": layout.x_unit,
            "engine": engine,
            "columns": {"series_id": columns.series_id,
                        "x": columns.x if not columns.more_x else list(columns.x_columns),
                        "y": columns.y,
                        "weight": columns.weight if layout.has_weight else None},
            "options": options}
