"""Shared fixtures. Compiled kernels are cached per process (and on disk by inductor), so
tests that compile reuse each other's work; keep shapes to a few buckets."""

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# No background compiles while the suite runs (they would compete with it for the cores);
# tests/test_compile_policy.py turns them on where it checks them.
os.environ["BATCHFIT_BACKGROUND"] = "0"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "batchfit-inductor-cache"))

import numpy as np
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every device test runs on the CPU, and on CUDA where a GPU exists (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session", autouse=True)
def native_kernel():
    """The tests run with the native kernel that the install built (test_native_kernel.py
    checks what a job does without it): an install that lost it fails here, not quietly.
    ``BATCHFIT_NATIVE=0 pytest`` runs the whole suite on the torch twin instead."""
    from batchfit.moments import native

    on_twin = os.environ.get("BATCHFIT_NATIVE") == "0"
    assert on_twin or native.library() is not None, "the native moment kernel did not load"
