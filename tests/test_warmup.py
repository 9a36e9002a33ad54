"""``batchfit warmup`` on a brand-new machine (an empty cache): it builds the ahead-of-time
kernels, a second warmup only loads them, and a later fit in a new process runs on them
without compiling anything."""

import os
import subprocess
import sys

import pytest


def batchfit(*args, env):
    done = subprocess.run([sys.executable, "-m", "batchfit", *args], env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow  # (builds huber's kernels ahead of time: minutes on 2 cores)
def test_warmup_builds_once_and_later_processes_load(tmp_path):
    env = {**os.environ, "BATCHFIT_CACHE_DIR": str(tmp_path / "cache")}
    first = batchfit("warmup", "--loss", "huber", "--dtype", "float32", env=env)
    assert "huber (float32): ready" in first and "native kernel: ready" in first
    kernels = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt2"))
    assert kernels and not list((tmp_path / "cache").rglob("*.failed"))
    second = batchfit("warmup", "--loss", "huber", "--dtype", "float32", env=env)
    assert "huber (float32): ready" in second and "compiled" not in second
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.pt2")) == kernels
    data, out = tmp_path / "data.parquet", tmp_path / "fits.parquet"
    batchfit("generate", str(data), "--series", "3000", "--points", "100", env=env)
    notes = batchfit("run", str(data), "-o", str(out), "--loss", "huber", "--dtype",
                     "float32", "--no-progress", env=env)
    assert "compil" not in notes, notes
    assert out.exists()
