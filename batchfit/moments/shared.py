"""What the native kernel (C) and Python share, defined once: the statistics row's header,
the solve's thresholds, the frames' slack, the kernel's statuses and error codes.

``header()`` is the C header the kernel is compiled with (setup.py writes it to
``native/shared.h``); the kernel returns the header's ``signature()`` from ``bf_shared``, so
a kernel built from other numbers than these is refused when it is loaded. Standard library
only: setup.py imports this before anything is installed.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

from batchfit.core.names import MAX_DEGREE, Status


class Field(IntEnum):
    """The header of a statistics row (``batchfit.moments.layout`` describes the row)."""

    CENTRE = 0
    HALF = 1
    INVH = 2
    YREF = 3
    LO = 4
    HI = 5
    NPTS = 6
    YSCALE = 7
    WSCALE = 8


HEADER = len(Field)
TRUST_PIVOT = 0.25  # below this relative Cholesky pivot, one refinement step on the points
# The residual sum of squares follows from the sums as Y2 - q.R, which loses digits when it is
# small next to Y2 (a fit explaining almost all of the spread): trusted only when it is at
# least this many eps of Y2 (then it keeps ~12 digits, the row-order promise); below, the
# series gets one refinement step with its points.
CANCELLATION_MARGIN = 2.0**42
# Widened frames get this much room to grow, so scattered series are reframed fewer times.
# Mapping sums from a wider frame onto the exact one at the end costs about slack**(2D)
# rounding errors, so degrees above SLACK_MAX_DEGREE reframe exactly instead.
SLACK = 1.25
SLACK_MAX_DEGREE = 3
# What the kernel's calls return when they refuse (0: done).
ERRORS = {"BF_BAD_CODE": -1, "BF_NO_MEMORY": -2, "BF_MISMATCH": -3}
# The statuses the kernel's solve gives (the others come from iterative solvers).
KERNEL_STATUSES = (Status.OK, Status.TOO_FEW_POINTS, Status.SINGULAR, Status.DIVERGED)


def _body() -> str:
    lines = [f"#define MAX_DEGREE {MAX_DEGREE}",
             # (hexadecimal floats: the exact doubles)
             f"#define TRUST_PIVOT {TRUST_PIVOT.hex()}",
             f"#define CANCELLATION_MARGIN {CANCELLATION_MARGIN.hex()}",
             f"#define SLACK {SLACK.hex()}",
             f"#define SLACK_MAX_DEGREE {SLACK_MAX_DEGREE}",
             "enum { " + ", ".join(f"{f.name} = {f.value}" for f in Field)
             + f", HEADER = {HEADER} }};",
             "enum { " + ", ".join(f"{s.name} = {s.value}" for s in KERNEL_STATUSES) + " };",
             "enum { " + ", ".join(f"{name} = {code}" for name, code in ERRORS.items()) + " };"]
    return "\n".join(lines) + "\n"


def signature() -> int:
    """A digest of the shared numbers (positive, 62 bits: a C int64_t literal)."""
    return int(hashlib.sha256(_body().encode()).hexdigest()[:15], 16) >> 2


def header() -> str:
    return ("/* Generated from batchfit/moments/shared.py by setup.py: edit that file. */\n"
            "#pragma once\n" + _body() + f"#define BF_SHARED {signature()}LL\n")
