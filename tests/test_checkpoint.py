"""``--resume`` checkpoints as one verified unit (issue 20, item 5): a run interrupted at
any moment continues to the same bytes; a checkpoint whose files were swapped, edited or
damaged, or whose manifest is not one, is refused with one line (exit 2), never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import batchfit.pipeline.job
from batchfit import io
from batchfit.app.cli import main
from batchfit.app.generate import generate

PIECES = ["--loss", "huber", "--batch-size", "50", "--no-compile", "--no-progress"]


@pytest.fixture
def job(tmp_path):
    """A huber job of 8 pieces; its output without interruption; its arguments."""
    generate(str(tmp_path / "d.parquet"), series=400, points=12, outliers=0.1)
    args = ["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet"), *PIECES,
            "--resume"]
    assert main(args) == 0
    reference = (tmp_path / "o.parquet").read_bytes()
    (tmp_path / "o.parquet").unlink()
    return args, reference, tmp_path / ".o.parquet.resume"


def interrupt_after(monkeypatch, saves: int):
    """Ctrl-C, as it were, once ``saves`` pieces are checkpointed."""
    real, done = io.Checkpoint.save, []

    def save(self, first, count, table):
        real(self, first, count, table)
        done.append(first)
        if len(done) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(io.Checkpoint, "save", save)


def kept_parts(directory) -> list[str]:
    with open(directory / "manifest.json") as handle:
        return [name for _, _, name, _ in json.load(handle)["parts"]]


def refused(args, capsys, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not os.path.exists(args[args.index("-o") + 1])


def test_an_interrupted_job_resumes_to_the_same_bytes(job, monkeypatch, tmp_path):
    args, reference, directory = job
    interrupt_after(monkeypatch, 3)
    assert main(args) == 130
    assert len(kept_parts(directory)) == 3
    (directory / "part-000000000000-000000050.parquet.999.tmp").write_bytes(b"left over")
    monkeypatch.undo()
    assert main(args) == 0
    assert (tmp_path / "o.parquet").read_bytes() == reference
    assert not directory.exists()


def test_a_part_copied_over_another_is_refused(job, monkeypatch, capsys):
    args, _, directory = job
    interrupt_after(monkeypatch, 3)
    assert main(args) == 130
    monkeypatch.undo()
    first, second = sorted(kept_parts(directory))[:2]
    (directory / second).write_bytes((directory / first).read_bytes())
    capsys.readouterr()
    refused(args, capsys, f"checkpoint {directory / second} is damaged")


def test_edited_numbers_in_a_valid_part_are_refused(job, monkeypatch, capsys):
    args, _, directory = job
    interrupt_after(monkeypatch, 2)
    assert main(args) == 130
    monkeypatch.undo()
    part = directory / kept_parts(directory)[1]
    table = pq.read_table(part)
    table = table.set_column(table.schema.get_field_index("a"), "a",
                             pc.multiply(table["a"], 1.001))
    pq.write_table(table, part)
    capsys.readouterr()
    refused(args, capsys, f"checkpoint {part} is damaged")


@pytest.mark.parametrize("manifest", [b"[" * 200_000, b'{"format": 2, "parts": [[0, "x"]]}',
                                      b"", b"\xff\xfe"])
def test_a_manifest_that_is_not_one_is_refused(job, monkeypatch, capsys, manifest):
    args, _, directory = job
    interrupt_after(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.undo()
    (directory / "manifest.json").write_bytes(manifest)
    capsys.readouterr()
    refused(args, capsys, "is damaged (its manifest is unreadable)")


def test_a_manifest_naming_a_file_outside_is_refused(job, monkeypatch, capsys, tmp_path):
    args, _, directory = job
    interrupt_after(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.undo()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["parts"][0][2] = "../d.parquet"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    refused(args, capsys, "is damaged (its manifest is unreadable)")
    assert (tmp_path / "d.parquet").exists()


def test_a_kill_inside_a_statistics_save_keeps_a_consistent_pair(tmp_path, monkeypatch):
    """The aggregation's state and its batch count are one unit: an interruption just
    before the count (or manifest) is replaced leaves the previous pair in force, so no
    batch is added twice."""
    generate(str(tmp_path / "d.parquet"), series=400, points=12)
    table = pq.read_table(tmp_path / "d.parquet")
    pq.write_table(table.take(pc.sort_indices(table, [("x", "ascending")])),  # scattered
                   tmp_path / "d.parquet", row_group_size=50)
    monkeypatch.setattr(batchfit.pipeline.job, "CHECKPOINT_BATCHES", 20)
    args = ["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "o.parquet"), "--resume"]
    assert main(args) == 0
    reference = (tmp_path / "o.parquet").read_bytes()
    (tmp_path / "o.parquet").unlink()
    real_replace, saves = os.replace, []
    real_save = io.Checkpoint.save_statistics

    def save_statistics(self, aggregator, codes, batches):
        saves.append(batches)
        real_save(self, aggregator, codes, batches)

    def replace(source, target):
        if len(saves) == 3 and str(target).endswith(".json"):
            raise KeyboardInterrupt  # the last step of the third save: it never happens
        real_replace(source, target)

    monkeypatch.setattr(io.Checkpoint, "save_statistics", save_statistics)
    monkeypatch.setattr(os, "replace", replace)
    assert main(args) == 130
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(args) == 0
    assert saves[3:5] == [60, 80]  # resumed after the second save, not the third
    assert (tmp_path / "o.parquet").read_bytes() == reference


def test_an_output_name_near_the_limit_can_resume(tmp_path, monkeypatch):
    generate(str(tmp_path / "d.parquet"), series=200, points=12)
    name = "f" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".parquet")) + ".parquet"
    args = ["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / name), *PIECES,
            "--resume"]
    interrupt_after(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.undo()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".resume")]
    assert main(args) == 0
    assert pq.read_table(tmp_path / name).num_rows == 200
    assert sorted(os.listdir(tmp_path)) == sorted(["d.parquet", "d.truth.parquet", name])


def test_a_run_killed_while_making_its_checkpoint_leaves_nothing_after_the_next(tmp_path):
    """SIGKILL between the checkpoint's temporary directory and its rename (the soak test
    found this window): the temporary directory is named as the output's temporary files,
    so the next run that writes the output removes it."""
    data, out = str(tmp_path / "d.parquet"), str(tmp_path / "out.parquet")
    generate(data, series=20, points=8, seed=0)
    killed = (
        "import os, signal, sys\n"
        "from batchfit.io import checkpoint\n"
        "made = checkpoint.temp_beside\n"
        "def made_then_killed(*args, **kwargs):\n"
        "    made(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.temp_beside = made_then_killed\n"
        "from batchfit.app.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.run([sys.executable, "-c", killed, "run", data, "-o", out,
                              "--resume", "--no-progress"], check=False,
                             capture_output=True)
    assert process.returncode == -signal.SIGKILL
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".out.parquet."), left
    assert main(["run", data, "-o", out, "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["d.parquet", "d.truth.parquet", "out.parquet"]
