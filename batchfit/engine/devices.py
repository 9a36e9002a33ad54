"""Devices and threads: where a fit runs and how many CPUs it may use."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from batchfit.engine import usable_cpus


def resolve_device(device, *arrays) -> torch.device:
    """``auto``: the device of the tensor inputs (results stay where the caller's tensors
    are); for numpy inputs, CUDA when available, else the CPU."""
    if device is None or device == "auto":
        for array in arrays:
            if isinstance(array, torch.Tensor):
                return array.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


_POOL: list = []


def thread_pool() -> ThreadPoolExecutor:
    """One pool of ``usable_cpus()`` threads for the work that releases the GIL (the native
    kernel, Parquet decoding)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(usable_cpus(), thread_name_prefix="batchfit"))
    return _POOL[0]


def configure_threads():
    """Size torch's thread pool to the CPUs this process may use (once)."""
    if not _CONFIGURED:
        torch.set_num_threads(usable_cpus())
        _CONFIGURED.append(True)


_CONFIGURED: list = []
