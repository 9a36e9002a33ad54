"""Killing `batchfit run` half way: SIGINT and SIGTERM clean up and say so, SIGKILL leaves
no output that looks complete, and `--resume` continues to the same output.

Each test runs the real CLI in a subprocess and sends the signal at a random point (seeded)
after the run has visibly started writing, well before it could finish.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from batchfit.cli import main
from batchfit.generate import generate

pytestmark = pytest.mark.slow  # (real CLI subprocesses, signalled mid-run)

# GD keeps the run busy for several seconds on 2 cores (~8 s: GD on the sums costs about
# 0.6 ns a series an epoch), in many small checkpointed pieces.
JOB = ["--batch-size", "5000", "--no-progress", "--solver", "gd", "--epochs", "2000",
       "--no-compile"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("interrupt") / "data.parquet")
    generate(path, series=60_000, points=20, seed=3)
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The output of an uninterrupted run."""
    out = str(tmp_path_factory.mktemp("reference") / "out.parquet")
    assert main(["run", data, "-o", out, *JOB]) == 0
    with open(out, "rb") as handle:
        return handle.read()


def start(data, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "batchfit", "run", data, "-o", out, *JOB,
                             *extra], stderr=subprocess.PIPE, text=True, env=env)


def wait_for(process, condition, timeout=120):
    """Poll until ``condition()`` or the process ended; True if the condition held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("the run neither progressed nor ended")


def temp_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def checkpoint_parts(out):
    """The finished parts the checkpoint's manifest names (it is replaced atomically)."""
    manifest = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.resume",
                            "manifest.json")
    try:
        with open(manifest) as handle:
            return [name for _, _, name, _ in json.load(handle)["parts"]]
    except FileNotFoundError:
        return []


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_signal_cleans_up_and_keeps_the_old_output(data, tmp_path, signum, code, word):
    out = str(tmp_path / "out.parquet")
    with open(out, "wb") as handle:
        handle.write(b"an older output")
    process = start(data, out)
    assert wait_for(process, lambda: temp_files(tmp_path))  # the writer is open
    time.sleep(random.Random(int(signum)).uniform(0, 2.0))  # the fits take ~7 s from here
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"batchfit: {word}; no output was written"], stderr
    assert read_bytes(out) == b"an older output"
    assert temp_files(tmp_path) == []


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(data, tmp_path, reference):
    out = str(tmp_path / "out.parquet")
    process = start(data, out)
    wait_for(process, lambda: temp_files(tmp_path))
    time.sleep(random.Random(9).uniform(0, 2.0))
    process.kill()
    process.communicate(timeout=120)
    if process.returncode != 0:
        assert not os.path.exists(out)  # the partial file has its hidden temporary name
    assert main(["run", data, "-o", out, *JOB]) == 0
    assert temp_files(tmp_path) == []  # the dead run's temporary file was removed
    assert read_bytes(out) == reference


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_resume_continues_to_the_same_output(data, tmp_path, reference, how, capsys):
    out = str(tmp_path / "out.parquet")
    process = start(data, out, "--resume")
    wait_for(process, lambda: len(checkpoint_parts(out)) >= 2)
    time.sleep(random.Random(how).uniform(0, 1.0))
    process.send_signal(getattr(signal, how))
    stderr = process.communicate(timeout=120)[1]
    if how == "SIGINT" and process.returncode != 0:
        assert process.returncode == 130
        assert "checkpointed: run the same command again to continue" in stderr
    done = len(checkpoint_parts(out))
    assert main(["run", data, "-o", out, *JOB, "--resume"]) == 0
    assert read_bytes(out) == reference, f"resumed after {done} pieces"
    assert checkpoint_parts(out) == [] and temp_files(tmp_path) == []
    assert not os.path.exists(tmp_path / ".out.parquet.resume")


def test_resume_refuses_a_checkpoint_of_another_job(data, tmp_path, capsys):
    out = str(tmp_path / "out.parquet")
    process = start(data, out, "--resume")
    if wait_for(process, lambda: len(checkpoint_parts(out)) >= 1):
        process.kill()
    process.communicate(timeout=120)
    if os.path.exists(out):
        pytest.fail("the run ended before it could be killed; make JOB longer")
    assert main(["run", data, "-o", out, *JOB, "--resume", "--lr", "0.002"]) == 2
    assert "holds checkpoints of a different job" in capsys.readouterr().err
    part = min(checkpoint_parts(out))
    directory = tmp_path / ".out.parquet.resume"
    with open(directory / part, "r+b") as handle:  # damage a finished part
        handle.truncate(100)
    assert main(["run", data, "-o", out, *JOB, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0]
    assert not os.path.exists(out)


def test_resume_and_history_do_not_mix(data, tmp_path, capsys):
    out, history = str(tmp_path / "out.parquet"), str(tmp_path / "h.parquet")
    assert main(["run", data, "-o", out, *JOB, "--resume", "--history", history]) == 2
    assert "--resume cannot be combined with --history" in capsys.readouterr().err
