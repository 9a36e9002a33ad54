"""``python -m batchfit.moments.native``: build this machine's native kernel (the background builder
that ``batchfit.moments.native.library`` starts), in the idle scheduling class (whatever else runs
on the machine comes first)."""

import contextlib
import os
import sys

from batchfit.moments.native import build_once

if __name__ == "__main__":
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    sys.exit(0 if build_once() else 1)
