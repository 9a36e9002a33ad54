"""The soak test of "Nothing lost, nothing silently wrong": a few hundred runs of the real
CLI on one small dataset (500 series x 8 points, 4,000 points), most of them killed at a
seeded random moment, many continued with ``--resume``, for two jobs side by side (two runs
at a time, at most): the MSE job (the aggregation) and ``--loss huber --batch-size 20``
(25 checkpointed chunks).

Each job writes one OUTPUT over and over. Every run is a subprocess (``python -m
batchfit run``), plain or with ``--resume`` (then, after a killed ``--resume`` run, usually
continuing its checkpoint), left to finish or sent SIGKILL, SIGINT or SIGTERM after a
random delay: SIGKILL at any moment from the start of the process; SIGINT and SIGTERM at any
moment after the command installed its handlers (seen in /proc: before that, the Python
interpreter itself is starting and a signal's default action applies), so from the imports
to the last rename. What must hold, after every run:

* exit 0: OUTPUT is byte-identical to the clean run's output (outputs are deterministic:
  plain, ``--resume`` and resumed runs write the same bytes), no temporary file is left in
  its directory (a killed run's is removed by the next run), and after a ``--resume`` run
  no checkpoint; stderr is batchfit's lines only;
* SIGINT: exit 130, SIGTERM: exit 143 (unless the run had finished: exit 0), one stderr
  line ``batchfit: interrupted...`` / ``batchfit: terminated...``, its own temporary file
  removed (``.NAME.PID.*.tmp``; a SIGKILLed run's is removed by the next run that writes),
  OUTPUT exactly as it was before the run;
* SIGKILL: exit -9 (or 0), and OUTPUT either as before the run or, where the kill came
  after the final rename, the complete output: never anything else;
* never a traceback.

At the end each job's last run is a clean ``--resume`` run, after which the directory holds
the output alone. The counts of runs and outcomes are printed at the end (and written as
JSON to ``$BATCHFIT_SOAK_REPORT`` when set). ``BATCHFIT_SOAK_RUNS=MSE,HUBER`` sets the runs
per job (default 200,40: 240 runs, about 1.8 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
from test_job import run_cli

from batchfit.app.generate import generate

pytestmark = pytest.mark.slow  # (hundreds of CLI subprocesses, signalled)

RUNS = [int(n) for n in os.environ.get("BATCHFIT_SOAK_RUNS", "200,40").split(",")]
JOBS = {"mse": [], "huber": ["--loss", "huber", "--batch-size", "20"]}
COMMON = ["--no-progress", "--no-compile"]
SIGNALS = [None, signal.SIGKILL, signal.SIGINT, signal.SIGTERM]
WEIGHTS = [0.2, 0.4, 0.2, 0.2]
WORDS = {signal.SIGINT: (130, "batchfit: interrupted"),
         signal.SIGTERM: (143, "batchfit: terminated")}
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def handlers_installed(pid: int) -> bool | None:
    """Whether the process holds back or catches SIGTERM (batchfit's entry point does so
    first; the interpreter alone does not); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return None
    masks = [int(fields[key].strip(), 16) for key in ("SigBlk", "SigCgt") if key in fields]
    return bool(masks) and any(mask & SIGTERM_BIT for mask in masks)


def wait_for_handlers(process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        state = handlers_installed(process.pid)
        if state is None:
            time.sleep(0.3)  # (no /proc: the interpreter is well past its start by then)
            return
        if state:
            return
        time.sleep(0.002)


def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


class Lane:
    """One job writing one OUTPUT, run after run."""

    def __init__(self, name, data, directory, reference, runs, seed):
        self.name, self.data, self.directory = name, data, directory
        self.out = os.path.join(directory, "out.parquet")
        self.checkpoint = os.path.join(directory, ".out.parquet.resume")
        self.reference = reference
        self.runs = runs
        self.rng = random.Random(seed)
        self.counts = Counter()
        self.span = None  # seconds of a clean run

    def hidden(self):
        return sorted(name for name in os.listdir(self.directory) if name.startswith("."))

    def temp_files(self):
        return [name for name in self.hidden() if name.endswith(".tmp")]

    def run(self, resume: bool, signum, label: str):
        args = [sys.executable, "-m", "batchfit", "run", self.data, "-o", self.out,
                *JOBS[self.name], *COMMON, *(["--resume"] if resume else [])]
        before = read(self.out)
        had_checkpoint = os.path.isdir(self.checkpoint)
        started = time.monotonic()
        env = {**os.environ, "BATCHFIT_BACKGROUND": "0", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   text=True, env=env, cwd=self.directory)
        delay = None
        if signum is not None:
            if signum != signal.SIGKILL:
                wait_for_handlers(process)
            # mostly within the run; one in ten up to past its end (the last rename)
            delay = self.rng.uniform(0, self.span * (1.3 if self.rng.random() < 0.1 else 0.9))
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signum)
        err = process.communicate(timeout=300)[1]
        seconds = time.monotonic() - started
        code, now = process.returncode, read(self.out)
        what = (f"{self.name} run {label}: {'--resume ' if resume else ''}"
                f"{signal.Signals(signum).name if signum else 'clean'}"
                f"{f' after {delay:.2f} s' if delay is not None else ''}: exit {code}")
        assert "Traceback" not in err, f"{what}\n{err}"
        if code == 0:
            assert now == self.reference, f"{what}: the output differs from the clean run's"
            assert self.temp_files() == [], f"{what}: {self.temp_files()}"
            if resume:
                assert not os.path.exists(self.checkpoint), f"{what}: checkpoint left"
            assert all(line.startswith("batchfit: ") for line in err.splitlines()), err
            outcome = "completed" + (" (resumed a checkpoint)" if resume and had_checkpoint
                                     else "")
            if signum is None:  # (the quickest clean run: contention only slows them)
                self.span = min(self.span, seconds) if self.span else seconds
        elif signum in WORDS:
            want, word = WORDS[signum]
            assert code == want, f"{what}\n{err}"
            assert err.startswith(word) and err.count("\n") == 1, f"{what}\n{err}"
            assert now == before, f"{what}: OUTPUT changed"
            own = [name for name in self.temp_files() if name.startswith(
                f".out.parquet.{process.pid}.")]  # (a SIGKILLed run's may wait for a writer)
            assert own == [], f"{what}: its temporary file is left: {own}"
            outcome = signal.Signals(signum).name
        else:
            assert signum == signal.SIGKILL and code == -signal.SIGKILL, f"{what}\n{err}"
            assert now in (before, self.reference), f"{what}: OUTPUT is neither the " \
                "previous output nor the complete one"
            outcome = "SIGKILL"
        self.counts[outcome] += 1
        self.counts["runs"] += 1
        return code

    def soak(self):
        started = time.monotonic()
        self.run(False, None, "0")  # (also times a whole run: the range of the delays)
        continuing = False
        for i in range(1, self.runs - 1):
            signum = self.rng.choices(SIGNALS, WEIGHTS)[0]
            resume = (continuing and self.rng.random() < 0.8) or self.rng.random() < 0.4
            code = self.run(resume, signum, str(i))
            continuing = resume and code != 0
        assert self.run(True, None, str(self.runs - 1)) == 0
        assert read(self.out) == self.reference
        assert self.hidden() == [], self.hidden()
        assert sorted(os.listdir(self.directory)) == ["out.parquet"]
        self.counts["seconds"] = round(time.monotonic() - started)
        return self.counts


def test_soak(tmp_path, pytestconfig):
    data = str(tmp_path / "data.parquet")
    generate(data, series=500, points=8, seed=5, x_kind="uniform")
    lanes = []
    for (name, job), runs, seed in zip(JOBS.items(), RUNS, (11, 12)):
        directory = tmp_path / name
        directory.mkdir()
        reference = directory / "reference.parquet"
        assert run_cli("run", data, "-o", reference, *job, *COMMON) == 0  # the clean run
        content = reference.read_bytes()
        assert pq.read_table(reference).num_rows == 500
        reference.unlink()
        lanes.append(Lane(name, data, str(directory), content, runs, seed))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:  # (two runs at a time)
        counts = [future.result() for future in [pool.submit(lane.soak) for lane in lanes]]
    report = {lane.name: dict(c) for lane, c in zip(lanes, counts)}
    report["seconds"] = round(time.monotonic() - started, 1)
    path = os.environ.get("BATCHFIT_SOAK_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1, sort_keys=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ntest_soak: {sum(c['runs'] for c in counts)} runs in {report['seconds']} s: "
              + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                          for name, c in report.items() if name != "seconds"),
              file=sys.stderr)
