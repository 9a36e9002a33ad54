"""The native moment kernel as installed: built with the package, used with no compiler on
the machine, checked against the package's shared numbers at load, and replaced by the torch
twin (one warning line, the same fits) when it is missing, unloadable or stale."""

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchfit.app.generate import generate
from batchfit.moments import native, shared

WARNING = "warning: the native moment kernel is unusable"
# A job in a fresh process that says, after it, whether it ever imported torch: the kernel's
# job never does, the twin's must.
JOB = textwrap.dedent("""
    import sys
    from batchfit.app.cli import main
    code = main(sys.argv[1:])
    print("torch" in sys.modules)
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "data.parquet"
    generate(str(path), series=300, points=40, seed=3)
    return path


def run_job(data, out, env=None, stub_dir=None, path=None):
    """``batchfit run`` in a new process (with ``stub_dir`` first on its import path); its
    stderr and whether it imported torch."""
    env = {**os.environ, **(env or {})}
    if stub_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(stub_dir), env.get("PYTHONPATH", "")])
    if path is not None:
        env["PATH"] = path
    # (cwd: away from the checkout, which ``-c`` would put first on the import path)
    done = subprocess.run([sys.executable, "-c", JOB, "run", str(data), "-o", str(out),
                           "--no-progress"], env=env, cwd=os.path.dirname(out),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr, done.stdout.strip().splitlines()[-1] == "True"


def assert_same_fits(a, b):
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column("status").to_pylist() == tb.column("status").to_pylist()
    for name in ("a", "b", "c", "rmse", "r2"):
        np.testing.assert_allclose(ta[name].to_numpy(), tb[name].to_numpy(), rtol=1e-9,
                                   atol=1e-12)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "fits.parquet"
    notes, used_torch = run_job(data, out)
    assert WARNING not in notes and not used_torch
    return out


def test_the_kernel_is_the_installed_extension():
    lib = native.library()
    assert lib is not None and "_aggregate" in os.path.basename(lib._name)
    assert lib.bf_shared() == shared.signature()


def test_a_machine_with_no_compiler_uses_the_installed_kernel(data, reference, tmp_path):
    """PATH holds only the interpreter's directory: no cc, gcc or clang, and $CC unset."""
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    for compiler in ("cc", "gcc", "clang"):
        assert shutil.which(compiler, path=str(bare)) is None
    out = tmp_path / "fits.parquet"
    notes, used_torch = run_job(data, out, env={"CC": ""}, path=str(bare))
    assert WARNING not in notes and not used_torch
    assert_same_fits(out, reference)


def shadow_package(tmp_path, kernel: bytes | None):
    """A copy of the ``batchfit.moments.native`` package whose extension is ``kernel``
    (None: absent), put before the installed one on the import path of a new process."""
    root = tmp_path / "shadow"
    source = os.path.dirname(native.__file__)
    package = root / "batchfit" / "moments" / "native"
    shutil.copytree(os.path.dirname(os.path.dirname(source)), root / "batchfit",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if kernel is not None:
        (package / os.path.basename(native.library()._name)).write_bytes(kernel)
    return root


def stale_kernel() -> bytes:
    """The installed kernel with its BF_SHARED digest changed: built from other numbers."""
    with open(native.library()._name, "rb") as f:
        blob = f.read()
    digest = shared.signature().to_bytes(8, sys.byteorder)
    assert blob.count(digest) == 1
    return blob.replace(digest, (shared.signature() ^ 1).to_bytes(8, sys.byteorder))


@pytest.mark.parametrize("kernel, why", [
    (None, "not installed"),
    # (the other two in the slow tier: a fresh process each, 3 s)
    pytest.param(b"\x7fELF this is no shared object", "cannot load", marks=pytest.mark.slow),
    pytest.param("stale", "stale", marks=pytest.mark.slow),
])
def test_an_unusable_kernel_warns_once_and_the_twin_fits(data, reference, tmp_path,
                                                          kernel, why):
    stub = shadow_package(tmp_path, stale_kernel() if kernel == "stale" else kernel)
    out = tmp_path / "fits.parquet"
    notes, used_torch = run_job(data, out, stub_dir=stub)
    assert notes.count(WARNING) == 1 and why in notes, notes
    assert used_torch
    assert_same_fits(out, reference)


def test_batchfit_native_0_picks_the_twin_quietly(data, reference, tmp_path):
    out = tmp_path / "fits.parquet"
    notes, used_torch = run_job(data, out, env={"BATCHFIT_NATIVE": "0"})
    assert WARNING not in notes and used_torch
    assert_same_fits(out, reference)


def test_the_header_matches_the_shared_numbers():
    """shared.h as built is what batchfit.moments.shared writes today (a stale checkout
    header would be rebuilt by setup.py; this catches a build that skipped it)."""
    header = os.path.join(os.path.dirname(native.__file__), "shared.h")
    with open(header) as f:
        assert f.read() == shared.header()


def test_every_installed_build_gives_the_same_statistics(rng):
    """The baseline build and the AVX-512 one (where both are installed and this CPU runs
    it) gather and solve the same table to rounding."""
    builds = [spec.origin for spec in map(importlib.util.find_spec, native.BUILDS) if spec]
    if len(builds) < 2:
        pytest.skip("one build of the kernel is installed here (not an x86-64 machine)")
    codes = rng.integers(0, 500, 20_000)
    x, y = rng.uniform(-3, 5, 20_000), rng.normal(size=20_000)
    fits = []
    for path in builds:
        lib = native._declare(ctypes.CDLL(path))
        if not lib.bf_cpu_ok():
            pytest.skip(f"this CPU does not run {os.path.basename(path)}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "_library", [lib])
            agg = native.Aggregator(2, False, True, rows=500)
            agg.add(codes, x, y)
            fits.append(native.solve(agg.finish(), 2, False))
    np.testing.assert_allclose(fits[0]["params"], fits[1]["params"], rtol=1e-12)
    np.testing.assert_array_equal(fits[0]["status"], fits[1]["status"])
