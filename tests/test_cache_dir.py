"""An unusable cache directory (a read-only home on a compute node, a path through a file)
never fails a job: it runs, says so in one line, and keeps nothing past the process."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.optimize import least_squares

from batchfit.app.generate import generate


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_a_job_completes_with_an_unusable_cache_directory(tmp_path, loss):
    data, out = tmp_path / "d.parquet", tmp_path / "f.parquet"
    generate(str(data), series=40, points=30, seed=5)
    env = {**os.environ, "BATCHFIT_CACHE_DIR": "/dev/null/cache", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "batchfit", "run", str(data), "-o", str(out),
                          "--loss", loss, "--dtype", "float64", "--no-progress"],
                         capture_output=True, text=True, check=False, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    notices = [line for line in run.stderr.splitlines() if "/dev/null/cache" in line]
    assert len(notices) <= 1 and "Traceback" not in run.stderr
    assert not any(p.name.startswith("batchfit-cache-") for p in tmp_path.iterdir()), (
        "the per-process cache is removed at exit")

    fits = pq.read_table(out).to_pydict()
    points = pq.read_table(data).to_pydict()
    ids, xs, ys = (np.asarray(points[c]) for c in ("series_id", "x", "y"))
    for row, sid in enumerate(fits["series_id"][:10]):
        x, y = xs[ids == sid], ys[ids == sid]
        if loss == "mse":
            want = np.polyfit(x, y, 2)
        else:
            start = np.polyfit(x, y, 2)
            want = least_squares(lambda p, x=x, y=y: np.polyval(p, x) - y, start,
                                 loss="huber", f_scale=1.0, xtol=1e-12, ftol=1e-12,
                                 gtol=1e-12).x
        got = np.array([fits[c][row] for c in ("a", "b", "c")])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
