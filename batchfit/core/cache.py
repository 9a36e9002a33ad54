"""Where batchfit keeps what it compiles once per machine, and how it says so.

Compiled kernels (the native aggregation kernel, AOTInductor packages of the torch kernels)
are built once per machine (when and where: ``batchfit.engine``) and kept under
``cache_dir()``:
``$BATCHFIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchfit``, else ``~/.cache/batchfit``. Every
entry's name carries a key of everything it depends on (source, compiler, CPU, torch
version), so a change builds a new entry instead of loading a stale one, and writers rename
finished files into place, so concurrent processes never see half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile

_log = logging.getLogger("batchfit")


def cache_dir(*parts: str) -> str:
    root = os.environ.get("BATCHFIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "batchfit")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def digest(*parts) -> str:
    """A short stable key of ``parts`` (strings or bytes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cpu_signature() -> str:
    """What code compiled for this CPU (``-march=native``) depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


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
