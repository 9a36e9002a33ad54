"""What a user pays for compiled kernels: never a compile that cannot pay back within the
call, kernels kept per machine (a user's model too, by its code's fingerprint), builds in
the background that later runs pick up."""

import os
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from zoo import seed_data

import batchfit
from batchfit.core.keys import fingerprint
from batchfit.engine import background


def _model(x, p):
    return p[0] * np.exp(-x) + p[1]


def test_a_fingerprint_follows_the_code_and_values_a_function_uses():
    def first(x, p):
        return p[0] * x + OFFSET

    def same(x, p):
        return p[0] * x + OFFSET

    def other(x, p):
        return p[1] * x + OFFSET

    scale = 2.0

    def closure(x, p):
        return scale * p[0] * x

    before = fingerprint(closure)
    scale = 3.0
    assert fingerprint(first) == fingerprint(same) != fingerprint(other)
    assert fingerprint(closure) != before  # (a closure's value is part of it)
    assert fingerprint(lambda x, p: OPAQUE) is None  # (an object with no stable value)
    assert fingerprint(lambda x, p: undefined_name) is None  # noqa: F821
    assert len(fingerprint(_model)) == 24


OFFSET = 1.5
OPAQUE = object()


def test_a_fingerprint_is_the_same_in_another_process(tmp_path):
    module = tmp_path / "user_models.py"
    module.write_text(textwrap.dedent("""
        import torch
        K = 0.25

        def helper(x):
            return torch.exp(-K * x)

        def model(x, p):
            return p[0] * helper(x) + p[1]
        """))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import user_models; "
            "from batchfit.core.keys import fingerprint; print(fingerprint(user_models.model))")
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24
    module.write_text(module.read_text().replace("K = 0.25", "K = 0.5"))
    changed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert changed != runs[0]  # (a global the model reads through a helper)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty per-machine cache, background builds on (nothing is forked: the test
    empties the queue before the process could end)."""
    monkeypatch.setenv("BATCHFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BATCHFIT_BACKGROUND", "1")
    monkeypatch.setattr(background, "_ASKED", set())
    monkeypatch.setattr(background, "_PENDING", [])
    yield tmp_path / "cache"
    background._PENDING.clear()


def test_a_compile_that_cannot_pay_back_is_not_run_in_the_foreground(fresh_cache, rng):
    """A huber fit worth compiled kernels (its eager estimate is above AOT_WORTH_S) but far
    below a build's cost runs uncompiled, builds nothing now, and leaves its kernels to
    the background builder; the answers are the eager path's."""
    x, y = seed_data(30_000, 100, rng, noise=0.3)
    y[:, ::11] += 15
    fit = batchfit.fit(x, y, loss="huber", dtype="float64")
    kept = list(fresh_cache.rglob("*.pt2")) if fresh_cache.exists() else []
    assert kept == [], kept
    asked = {what for *_, what in background._PENDING}
    assert any("derivatives_kernel" in what for what in asked), asked
    assert any("final_kernel" in what for what in asked), asked
    eager = batchfit.fit(x, y, loss="huber", dtype="float64", compile=False)
    assert np.array_equal(fit.params.numpy(), eager.params.numpy())


BUILD_AND_FIT = textwrap.dedent("""
    import sys, time, numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    import batchfit
    from batchfit.engine import ahead
    from user_models import model
    rng = np.random.default_rng(0)
    x = np.linspace(0, 4, 300)
    truth = rng.uniform([1, 0.5, -1], [3, 1.5, 1], (2000, 3))
    y = truth[:, :1] * np.exp(-truth[:, 1:2] * x) + truth[:, 2:] + rng.normal(0, 0.05, (2000, 300))
    fit = batchfit.fit(x, y, model=model, p0=[2.0, 1.0, 0.0], dtype="float64")
    loaded = sum(1 for kernel in ahead._AHEAD.values() if kernel)
    print(loaded, float(fit.params.sum()), fit.status_counts()["ok"])
    """)


@pytest.mark.slow  # (the builder compiles the model's kernels: minutes on 2 cores)
def test_a_users_model_is_built_in_the_background_and_kept_for_later_runs(tmp_path):
    """Run 1 fits uncompiled and leaves a builder behind; once it is done, run 2 (a new
    process) loads the model's kernels instead of compiling, with the same answers."""
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch

        def model(x, p):
            return p[0] * torch.exp(-p[1] * x) + p[2]
        """))
    (tmp_path / "fit.py").write_text(BUILD_AND_FIT)
    cache = tmp_path / "cache"
    env = {**os.environ, "BATCHFIT_CACHE_DIR": str(cache), "BATCHFIT_BACKGROUND": "1"}

    def run():
        done = subprocess.run([sys.executable, str(tmp_path / "fit.py"), str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        loaded, total, ok = done.stdout.split()
        return int(loaded), float(total), int(ok), done.stderr

    loaded, total, ok, notes = run()
    assert loaded == 0 and ok >= 1990
    assert "in the background" in notes
    deadline = time.time() + 900
    while time.time() < deadline and (not list(cache.rglob("*.pt2"))
                                      or list(cache.rglob("*.building"))):
        time.sleep(2)
    assert list(cache.rglob("*.pt2")) and not list(cache.rglob("*.building"))
    again, total_again, ok_again, notes_again = run()
    assert again >= 4  # (the model's kernels and the step's, loaded: nothing compiled)
    assert "compil" not in notes_again
    assert ok_again == ok and total_again == pytest.approx(total, rel=1e-9)


@pytest.mark.slow  # (builds one small AOTInductor package: about half a minute on 2 cores)
def test_a_kernel_built_from_one_tensor_passed_thrice_reads_three_inputs(tmp_path):
    """A damping starts as one zero tensor for every parameter; tracing once merged such
    inputs, and the kept kernel then read the first of them for all three (robust Newton
    compiled took other steps than uncompiled)."""
    import torch

    from batchfit.engine import aot

    def scaled(a, b, c):
        return a * 2, b * 3, c * 4

    zero = torch.zeros(4, dtype=torch.float64)
    path = str(tmp_path / "kernel.pt2")
    with warnings.catch_warnings():  # (torch's internals warn about their own APIs)
        warnings.simplefilter("ignore", FutureWarning)
        aot.build(scaled, 0, (zero, zero, zero), path)
    a, b, c = (torch.arange(4, dtype=torch.float64) + shift for shift in (1, 10, 100))
    for got, want in zip(aot.load(path)(a, b, c), scaled(a, b, c)):
        assert torch.equal(got, want)
