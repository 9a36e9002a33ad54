"""Checkpoints of ``batchfit run --resume``: what an interrupted run finished, kept beside
the output (on this machine or in a store) so that the same command continues it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchfit.core import interrupts
from batchfit.io import storage
from batchfit.io.write import hidden_beside, temp_beside

FORMAT = 2  # of manifest.json; a checkpoint of another format is another job's
MANIFEST = "manifest.json"
RESUME_ROOM = 64  # bytes a directory name needs beyond ``.NAME`` (``.resume``, temp suffix)


class Checkpoint:
    """The finished pieces of a run, kept so that a rerun with ``--resume`` continues it.

    A hidden directory beside the output, ``.NAME.resume/``, is one unit described by its
    ``manifest.json``: what the job is (its input files with their sizes and modification
    times, and its options), the finished pieces (``part-FIRST-COUNT.parquet``; FIRST: the
    position of the piece's first series in the run) and the latest aggregation state, each
    with the SHA-256 of its bytes. Files are written under temporary names and renamed,
    then the manifest is replaced (renamed too) to name them, so a run killed at any moment
    leaves a manifest whose files are whole; a file that does not match its digest on
    resume (damaged, edited or swapped) is an error, and files the manifest does not name
    are ignored and removed. The job removes the directory once the output is in place.
    In a store, the directory is a prefix that appears with its manifest, and each file is
    one upload, which is never seen half-written.
    """

    def __init__(self, output_path: str, job: dict):
        self.output_path = output_path
        self.directory = hidden_beside(output_path, ".resume", RESUME_ROOM)
        self.job = json.loads(json.dumps(job, sort_keys=True, default=str))
        self.parts: dict[tuple[int, int], list] = {}  # (first, count) -> [file, digest]
        self.statistics: dict | None = None  # {"batches": n, "files": {role: [file, digest]}}
        if not self._present():
            self._create()
            return
        manifest = self._load()
        if manifest["job"] != self.job:
            raise ValueError(f"{self.directory} holds checkpoints of a different job (the "
                             "input or the options changed); delete it, or run without "
                             "--resume")
        self.parts = {(first, count): [name, digest]
                      for first, count, name, digest in manifest["parts"]}
        self.statistics = manifest["statistics"]
        self._remove_unnamed()

    # ---------------------------------------------------------- the manifest

    def _manifest(self) -> dict:
        return {"format": FORMAT, "job": self.job, "statistics": self.statistics,
                "parts": [[first, count, name, digest]
                          for (first, count), (name, digest) in sorted(self.parts.items())]}

    def _path(self, name: str) -> str:
        return storage.join(self.directory, name)

    def _present(self) -> bool:
        """A checkpoint is there (in a store: its prefix appears with the manifest)."""
        if storage.is_remote(self.directory):
            return storage.exists(self._path(MANIFEST))
        return os.path.isdir(self.directory)

    def _create(self):
        """The directory appears whole, with its manifest, or not at all."""
        if storage.is_remote(self.directory):
            return self._publish()
        with interrupts.deferred():  # (a signal waits for these few small steps)
            # named as the output's temporary files (.NAME.PID.XXXX.tmp), so that what a
            # SIGKILL leaves here is removed by the next run that writes, as theirs are
            temp = temp_beside(self.output_path, directory=True)
            try:
                _write_json(os.path.join(temp, MANIFEST), self._manifest())
                os.rename(temp, self.directory)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise

    def _publish(self):
        _write_json(self._path(MANIFEST), self._manifest())

    def _load(self) -> dict:
        try:
            manifest = json.loads(storage.read_bytes(self._path(MANIFEST)))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise ValueError("not a manifest of this format")
            for first, count, name, digest in manifest["parts"]:
                if not (isinstance(first, int) and isinstance(count, int)
                        and _plain(name) and isinstance(digest, str)):
                    raise ValueError("a malformed part entry")
            statistics = manifest["statistics"]
            if statistics is not None:
                int(statistics["batches"])
                if not all(_plain(name) for name, _ in statistics["files"].values()):
                    raise ValueError("a malformed statistics entry")
            return manifest
        except FileNotFoundError:
            problem = "it has no manifest"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            problem = "its manifest is unreadable"  # (RecursionError: JSON nested too deep)
        raise ValueError(f"checkpoint {self.directory} is damaged ({problem}); delete it "
                         "and run again")

    def _remove_unnamed(self):
        """Files a killed run left that the manifest does not name (temporary files, parts
        or statistics it was about to name or had just replaced)."""
        named = {MANIFEST} | {name for name, _ in self.parts.values()}
        if self.statistics is not None:
            named |= {name for name, _ in self.statistics["files"].values()}
        for entry in storage.names(self.directory):
            if entry not in named:
                try:
                    storage.unlink(self._path(entry))
                except OSError:  # (a directory, or not ours to remove: leave it)
                    pass

    def _keep(self, name: str, data: bytes) -> list:
        """Write ``data`` as ``name``, never seen half-written; [name, digest]."""
        storage.write_whole(self._path(name), data)
        return [name, hashlib.sha256(data).hexdigest()]

    def _verified(self, entry: list) -> bytes:
        name, digest = entry
        path = self._path(name)
        try:
            data = storage.read_bytes(path)
        except (OSError, ValueError):
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"checkpoint {path} is damaged (its content is not what was "
                             f"written); delete {self.directory} and run again")
        return data

    # ---------------------------------------------------------- finished pieces

    def has(self, first: int, count: int) -> bool:
        return (first, count) in self.parts

    def save(self, first: int, count: int, table: pa.Table):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = f"part-{first:012d}-{count:09d}.parquet"
        self.parts[first, count] = self._keep(name, sink.getvalue().to_pybytes())
        self._publish()

    def read(self, first: int, count: int, schema: pa.Schema) -> pa.Table:
        entry = self.parts[first, count]
        data = self._verified(entry)
        try:
            table = pq.read_table(pa.BufferReader(data), schema=schema)
        except (pa.ArrowException, OSError):
            table = None
        if table is None or table.num_rows != count:
            raise ValueError(f"checkpoint {self._path(entry[0])} does not "
                             f"hold {count} rows of this job's output; delete "
                             f"{self.directory} and run again")
        return table

    # ---------------------------------------------------------- an aggregation's state

    def save_statistics(self, aggregator, codes, batches: int):
        """Keep an aggregation's state after ``batches`` decoded batches, replacing the last
        one: its numpy arrays (``statistics-BATCHES.npz``) and, for a hashed code table, the
        series ids (``ids-BATCHES.parquet``), named by the manifest together."""
        arrays = {**aggregator.state(), **{f"codes_{k}": v for k, v in codes.state().items()
                                             if not isinstance(v, pa.Array)}}
        ids = {k: v for k, v in codes.state().items() if isinstance(v, pa.Array)}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files = {"arrays": self._keep(f"statistics-{batches:09d}.npz", buffer.getvalue())}
        if ids:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(ids), sink)
            files["ids"] = self._keep(f"ids-{batches:09d}.parquet",
                                      sink.getvalue().to_pybytes())
        replaced, self.statistics = self.statistics, {"batches": batches, "files": files}
        self._publish()
        for name, _ in (replaced or {"files": {}})["files"].values():
            if name not in {new for new, _ in files.values()}:
                storage.unlink(self._path(name))

    def restore_statistics(self, aggregator, codes) -> int:
        """Load the kept state into ``aggregator`` and ``codes``; the number of decoded
        batches it covers (0: nothing kept)."""
        if self.statistics is None:
            return 0
        files = self.statistics["files"]
        arrays_data = self._verified(files["arrays"])
        ids_data = self._verified(files["ids"]) if "ids" in files else None
        try:
            with np.load(io.BytesIO(arrays_data), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            state = {k: v for k, v in arrays.items() if not k.startswith("codes_")}
            code_state = {k[len("codes_"):]: v for k, v in arrays.items()
                          if k.startswith("codes_")}
            if ids_data is not None:
                table = pq.read_table(pa.BufferReader(ids_data))
                code_state.update({name: table[name].combine_chunks()
                                   for name in table.column_names})
            aggregator.load_state(state)
            codes.load_state(code_state)
        except (OSError, ValueError, KeyError, pa.ArrowException):
            raise ValueError(f"checkpoint {self.directory} is damaged; delete it and run "
                             "again") from None
        return int(self.statistics["batches"])

    def remove(self):
        if storage.is_remote(self.directory):
            storage.remove(self.directory)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)


def _plain(name) -> bool:
    """A file name inside the checkpoint directory (no path: a manifest names nothing
    outside it)."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.sep not in name \
        and "/" not in name


def _write_json(path: str, value):
    storage.write_whole(path, json.dumps(value, sort_keys=True).encode())
