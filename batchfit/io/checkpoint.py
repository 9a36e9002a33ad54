"""Checkpoints of ``batchfit run --resume``: what an interrupted run finished, kept beside
the output so that the same command continues it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class Checkpoint:
    """The finished pieces of a run, kept so that a rerun with ``--resume`` continues it.

    A hidden directory beside the output, ``.NAME.resume/``, holds ``job.json`` (what the
    job is: its input files with their sizes and modification times, and its options) and a
    Parquet file per finished piece, ``part-FIRST-COUNT.parquet`` (FIRST: the position of the
    piece's first series in the run). Each part is written to a temporary name and renamed,
    so a killed run leaves only whole parts; the job removes the directory once the output
    is in place.
    """

    def __init__(self, output_path: str, job: dict):
        directory, name = os.path.split(os.path.abspath(output_path))
        self.directory = os.path.join(directory, f".{name}.resume")
        manifest = os.path.join(self.directory, "job.json")
        job = json.loads(json.dumps(job, sort_keys=True, default=str))
        if os.path.exists(manifest):
            with open(manifest) as handle:
                try:
                    same = json.load(handle) == job
                except ValueError:  # a manifest cut short: nothing in there can be trusted
                    same = False
            if not same:
                raise ValueError(f"{self.directory} holds checkpoints of a different job (the "
                                 "input or the options changed); delete it, or run without "
                                 "--resume")
        else:
            os.makedirs(self.directory, exist_ok=True)
            temp = manifest + f".{os.getpid()}.tmp"
            with open(temp, "w") as handle:
                json.dump(job, handle, sort_keys=True)
            os.replace(temp, manifest)
        self.parts = {}
        for entry in os.listdir(self.directory):
            fields = entry.split(".")[0].split("-")
            if entry.endswith(".parquet") and len(fields) == 3 and fields[0] == "part":
                self.parts[int(fields[1]), int(fields[2])] = os.path.join(self.directory, entry)

    def has(self, first: int, count: int) -> bool:
        return (first, count) in self.parts

    def save(self, first: int, count: int, table: pa.Table):
        path = os.path.join(self.directory, f"part-{first:012d}-{count:09d}.parquet")
        temp = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, temp)
        os.replace(temp, path)
        self.parts[first, count] = path

    def read(self, first: int, count: int, schema: pa.Schema) -> pa.Table:
        try:
            table = pq.read_table(self.parts[first, count], schema=schema)
        except (pa.ArrowException, OSError):
            table = None
        if table is None or table.num_rows != count:
            raise ValueError(f"checkpoint {self.parts[first, count]} is damaged; delete "
                             f"{self.directory} and run again")
        return table

    # ---------------------------------------------------------- an aggregation's state

    def save_statistics(self, aggregator, codes, batches: int):
        """Keep an aggregation's state after ``batches`` decoded batches (replacing the
        last one): its numpy arrays in ``statistics.npz``, the series ids in ``ids.parquet``
        (a hashed code table), then ``statistics.json`` naming the count, written last."""
        arrays = {**aggregator.state(), **{f"codes_{k}": v for k, v in codes.state().items()
                                             if not isinstance(v, pa.Array)}}
        ids = {k: v for k, v in codes.state().items() if isinstance(v, pa.Array)}
        temp = os.path.join(self.directory, f"statistics.{os.getpid()}.tmp.npz")
        np.savez(temp, **arrays)
        os.replace(temp, os.path.join(self.directory, "statistics.npz"))
        for name, values in ids.items():
            temp = os.path.join(self.directory, f"ids.{os.getpid()}.tmp")
            pq.write_table(pa.table({name: values}), temp)
            os.replace(temp, os.path.join(self.directory, "ids.parquet"))
        temp = os.path.join(self.directory, f"statistics.{os.getpid()}.tmp.json")
        with open(temp, "w") as handle:
            json.dump({"batches": batches}, handle)
        os.replace(temp, os.path.join(self.directory, "statistics.json"))

    def restore_statistics(self, aggregator, codes) -> int:
        """Load the kept state into ``aggregator`` and ``codes``; the number of decoded
        batches it covers (0: nothing kept)."""
        marker = os.path.join(self.directory, "statistics.json")
        if not os.path.exists(marker):
            return 0
        try:
            with open(marker) as handle:
                batches = int(json.load(handle)["batches"])
            with np.load(os.path.join(self.directory, "statistics.npz"),
                         allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            state = {k: v for k, v in arrays.items() if not k.startswith("codes_")}
            code_state = {k[len("codes_"):]: v for k, v in arrays.items()
                          if k.startswith("codes_")}
            ids = os.path.join(self.directory, "ids.parquet")
            if os.path.exists(ids):
                table = pq.read_table(ids)
                code_state.update({name: table[name].combine_chunks()
                                   for name in table.column_names})
            aggregator.load_state(state)
            codes.load_state(code_state)
        except (OSError, ValueError, KeyError, pa.ArrowException):
            raise ValueError(f"checkpoint {self.directory} is damaged; delete it and run "
                             "again") from None
        return batches

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)
