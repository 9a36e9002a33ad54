"""Killing `batchfit run` half way: SIGINT and SIGTERM clean up and say so, SIGKILL leaves
no output that looks complete, and `--resume` continues to the same output; SIGINT and
SIGTERM at any moment from the command's first line on (imports, argument parsing, pyarrow's
first use of pandas, the id scan) exit 130/143 with one line.

Each test runs the real CLI in a subprocess and sends the signal at a random point (seeded):
after the run has visibly started writing, well before it could finish, or (the unlucky
moments) at delays from the command's first line.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from zoo import assert_same_fits

from batchfit.app.cli import main
from batchfit.app.generate import generate

# GD keeps the run busy for several seconds on 2 cores (~8 s), in many small checkpointed
# pieces; ``job`` gives it more epochs where it would be over sooner (a faster machine).
JOB = ["--batch-size", "5000", "--no-progress", "--solver", "gd", "--epochs", "2000",
       "--no-compile"]
MIN_JOB_S = 4.0  # the uninterrupted run, at least (signals come in its first quarter)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("interrupt") / "data.parquet")
    generate(path, series=60_000, points=20, seed=3)
    return path


@pytest.fixture(scope="module")
def job(data, tmp_path_factory):
    """(options, the output of an uninterrupted run, its seconds): JOB, with its epochs
    scaled up where a run would take under MIN_JOB_S here."""
    out = str(tmp_path_factory.mktemp("reference") / "out.parquet")
    options = list(JOB)
    while True:
        begun = time.perf_counter()
        assert main(["run", data, "-o", out, *options]) == 0
        seconds = time.perf_counter() - begun
        if seconds >= MIN_JOB_S:
            return options, read_bytes(out), seconds
        at = options.index("--epochs") + 1
        options[at] = str(int(int(options[at]) * 1.5 * MIN_JOB_S / seconds))


def longer(options, factor=4):
    """``options`` with ``factor`` times the epochs: the runs that a signal must catch in
    flight, so that it still does where this run is much faster than the reference was
    (a machine whose load dropped meanwhile)."""
    options = list(options)
    at = options.index("--epochs") + 1
    options[at] = str(int(options[at]) * factor)
    return options


def start(options, data, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "batchfit", "run", data, "-o", out,
                             *options, *extra], stderr=subprocess.PIPE, text=True, env=env)


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


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_signal_cleans_up_and_keeps_the_old_output(data, job, tmp_path, signum, code, word):
    options, _, seconds = job
    out = str(tmp_path / "out.parquet")
    with open(out, "wb") as handle:
        handle.write(b"an older output")
    process = start(longer(options), data, out)
    assert wait_for(process, lambda: temp_files(tmp_path))  # the writer is open
    # (the fits, most of the run, come after this)
    time.sleep(random.Random(int(signum)).uniform(0, 0.25) * seconds)
    assert process.poll() is None, "the run ended before the signal"
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"batchfit: {word}; no output was written"], stderr
    assert read_bytes(out) == b"an older output"
    assert temp_files(tmp_path) == []


@pytest.mark.slow
def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(data, tmp_path, job):
    options, reference, seconds = job
    out = str(tmp_path / "out.parquet")
    process = start(longer(options), data, out)
    wait_for(process, lambda: temp_files(tmp_path))
    time.sleep(random.Random(9).uniform(0, 0.25) * seconds)
    process.kill()
    process.communicate(timeout=120)
    if process.returncode != 0:
        assert not os.path.exists(out)  # the partial file has its hidden temporary name
    assert main(["run", data, "-o", out, *options]) == 0
    assert temp_files(tmp_path) == []  # the dead run's temporary file was removed
    assert read_bytes(out) == reference


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_resume_continues_to_the_same_output(data, tmp_path, job, how, capsys):
    options, reference, _ = job
    out = str(tmp_path / "out.parquet")
    process = start(options, data, out, "--resume")
    wait_for(process, lambda: len(checkpoint_parts(out)) >= 2)
    time.sleep(random.Random(how).uniform(0, 1.0))
    process.send_signal(getattr(signal, how))
    stderr = process.communicate(timeout=120)[1]
    if how == "SIGINT" and process.returncode != 0:
        assert process.returncode == 130
        assert "checkpointed: run the same command again to continue" in stderr
    done = len(checkpoint_parts(out))
    assert main(["run", data, "-o", out, *options, "--resume"]) == 0
    assert read_bytes(out) == reference, f"resumed after {done} pieces"
    assert checkpoint_parts(out) == [] and temp_files(tmp_path) == []
    assert not os.path.exists(tmp_path / ".out.parquet.resume")


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_job(data, tmp_path, job, capsys):
    options = job[0]
    out = str(tmp_path / "out.parquet")
    process = start(options, data, out, "--resume")
    if wait_for(process, lambda: len(checkpoint_parts(out)) >= 1):
        process.kill()
    process.communicate(timeout=120)
    if os.path.exists(out):
        pytest.fail("the run ended before it could be killed")
    assert main(["run", data, "-o", out, *options, "--resume", "--lr", "0.002"]) == 2
    assert "holds checkpoints of a different job" in capsys.readouterr().err
    part = min(checkpoint_parts(out))
    directory = tmp_path / ".out.parquet.resume"
    with open(directory / part, "r+b") as handle:  # damage a finished part
        handle.truncate(100)
    assert main(["run", data, "-o", out, *options, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_resume_and_history_do_not_mix(data, tmp_path, capsys):
    out, history = str(tmp_path / "out.parquet"), str(tmp_path / "h.parquet")
    assert main(["run", data, "-o", out, *JOB, "--resume", "--history", history]) == 2
    assert "--resume cannot be combined with --history" in capsys.readouterr().err


# ---------------------------------------------------------------- signals at unlucky moments

# A robust job on series scattered over the input: the one signals at unlucky moments were
# reported on (torch's import, the id scan, pyarrow's first use of pandas: 1-3 s in).
SCATTERED_JOB = ["--loss", "huber", "--no-progress"]
# how the two launchers start the command (pyproject's script runs batchfit.__main__:entry)
LAUNCHERS = [["-m", "batchfit"],
             ["-c", "import sys; from batchfit.__main__ import entry; sys.exit(entry())"]]


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scattered")
    generate(str(directory / "sorted.parquet"), series=50_000, points=20, seed=5)
    table = pq.read_table(directory / "sorted.parquet")
    order = np.random.default_rng(5).permutation(table.num_rows)
    pq.write_table(table.take(order), directory / "data.parquet", row_group_size=1 << 18)
    return str(directory / "data.parquet")


def command_started(pid: int) -> bool:
    """Whether the command's first line has run: it holds SIGTERM back, or handles it
    (before that the interpreter itself is starting, and a signal is Python's own)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:  # (it has ended)
        return True
    mask = int(fields["SigBlk"], 16) | int(fields["SigCgt"], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def signal_at(launcher, data, out, signum, delay):
    """Run the scattered job, send ``signum`` ``delay`` s after the command's first line;
    (exit code, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *launcher, "run", data, "-o", out,
                                *SCATTERED_JOB], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not command_started(process.pid):
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.001)
    time.sleep(delay)
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    return process.returncode, stderr


def check_trials(data, tmp_path, trials):
    """Every trial (signal, delay): exit 130/143 with exactly one line, the older output
    byte for byte and no temporary file; or, where the run finished first, exit 0 and the
    output of an uninterrupted run."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to see when the command has started")
    out, older = str(tmp_path / "out.parquet"), b"an older output"
    reference = None
    for i, (signum, delay) in enumerate(trials):
        with open(out, "wb") as handle:
            handle.write(older)
        code, stderr = signal_at(LAUNCHERS[i % 2], data, out, signum, delay)
        trial = f"trial {i}: {signum.name} {delay:.3f} s in, exit {code}: {stderr!r}"
        assert "Traceback" not in stderr and temp_files(tmp_path) == [], trial
        if code == 0:
            if reference is None:
                assert main(["run", data, "-o", str(tmp_path / "ref.parquet"),
                             *SCATTERED_JOB]) == 0
                reference = pq.read_table(tmp_path / "ref.parquet")
            assert_same_fits(pq.read_table(out), reference)
            continue
        word, want = {signal.SIGINT: ("interrupted", 130),
                      signal.SIGTERM: ("terminated", 143)}[signum]
        assert code == want, trial
        assert stderr.splitlines() == [f"batchfit: {word}; no output was written"], trial
        assert read_bytes(out) == older, trial


def unlucky_moments(seed: int, early: int, later: int) -> list:
    """``early`` delays in the first 0.2 s (imports, parsing), ``later`` ones in 0.2-3 s
    (torch's import, the id scan), each with SIGINT or SIGTERM."""
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.2) for _ in range(early)] + \
        [rng.uniform(0.2, 3.0) for _ in range(later)]
    return [(rng.choice([signal.SIGINT, signal.SIGTERM]), delay) for delay in delays]


def test_signals_at_a_few_unlucky_moments(scattered, tmp_path):
    check_trials(scattered, tmp_path, [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0)]
                 + unlucky_moments(1, early=1, later=2))


@pytest.mark.slow
def test_signals_at_many_unlucky_moments(scattered, tmp_path):
    check_trials(scattered, tmp_path, unlucky_moments(2, early=10, later=20))
