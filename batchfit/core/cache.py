"""Where batchfit keeps what it compiles once per machine, and how it says so.

Compiled kernels (AOTInductor packages of the torch kernels; the native moment kernel is
built at install) are built once per machine (when and where: ``batchfit.engine``) and kept under
``cache_dir()``:
``$BATCHFIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchfit``, else ``~/.cache/batchfit``. Every
entry's name carries a key of everything it depends on (source, CPU, torch version), so a
change builds a new entry instead of loading a stale one, and writers rename finished files
into place, so concurrent processes never see half a file.

A cache directory that cannot be used (a read-only home on a compute node, a path through a
file) never fails a job: the process keeps its kernels in a temporary directory of its own,
removed at exit, and says so once; ``persistent()`` tells the engine that nothing it builds
will outlive the process (so it builds nothing in the background for later processes).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

_log = logging.getLogger("batchfit")
_fallback: list = []  # [the temporary root or None], once the configured one failed


def configured_root() -> str:
    return os.environ.get("BATCHFIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "batchfit")


def cache_dir(*parts: str) -> str | None:
    """The directory ``parts`` under the cache root, created if need be; under this process's
    temporary root if the configured one is unusable; None if even that fails."""
    if not _fallback:
        try:
            return _made(configured_root(), parts)
        except OSError as exc:
            _fallback.append(_temporary_root(exc))
    if _fallback[0] is None:
        return None
    try:
        return _made(_fallback[0], parts)
    except OSError:
        return None


def persistent() -> bool:
    """Whether what is kept now outlives this process (the configured root is usable)."""
    if not _fallback:
        cache_dir()
    return not _fallback


def _made(root: str, parts) -> str:
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"not writable: {path}")
    return path


def _temporary_root(exc: OSError) -> str | None:
    reason = exc.strerror or str(exc)
    try:
        root = tempfile.mkdtemp(prefix="batchfit-cache-")
    except OSError:
        notice(f"the cache directory {configured_root()} is unusable ({reason}), nor is a "
               "temporary one: compiled kernels are not kept")
        return None
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    notice(f"the cache directory {configured_root()} is unusable ({reason}): compiled kernels "
           f"are kept for this process only (set BATCHFIT_CACHE_DIR to a writable directory)")
    return root


def digest(*parts) -> str:
    """A short stable key of ``parts`` (strings or bytes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """What code compiled for this CPU depends on: its instruction-set features (Linux
    /proc/cpuinfo, macOS sysctl), so a cache shared between machines never serves a kernel
    built for AVX-512 to an AVX2 host."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    try:
        features = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
             "machdep.cpu.leaf7_features", "hw.optional.arm64"],
            check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        features = ""
    return " ".join([platform.machine(), platform.processor(), *features.split()])


def temp_path(directory: str, suffix: str) -> str:
    """A new temporary file in ``directory`` (to be renamed into place when complete)."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return path


def notice(message: str):
    """One line on stderr (through the ``batchfit`` logger, so it can be silenced)."""
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("batchfit: %(message)s"))
        _log.addHandler(handler)
        _log.propagate = False
        _log.setLevel(logging.INFO)
    _log.info(message)
