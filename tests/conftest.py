"""Shared fixtures. Compiled kernels are cached per process (and on disk by inductor), so
tests that compile reuse each other's work; keep shapes to a few buckets."""

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
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
