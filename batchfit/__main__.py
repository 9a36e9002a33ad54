"""The command: ``python -m batchfit`` and the ``batchfit`` script (pyproject's entry point)."""

import sys

from batchfit.core import interrupts  # (built-in modules only: nothing heavy before the handlers)


def entry() -> int:
    interrupts.hold()  # from the first line, a signal waits for cli.main to report it
    interrupts.install()
    from batchfit.app.cli import main

    code = main()
    interrupts.ignore()
    return code


if __name__ == "__main__":
    sys.exit(entry())
