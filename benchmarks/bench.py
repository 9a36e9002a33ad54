"""The throughput table: `python benchmarks/bench.py [options]` is `batchfit bench [options]`.

Full run on this machine (about 10 minutes):
    python benchmarks/bench.py --json benchmarks/results-cpu.json --plot docs/throughput.png
"""

import os
import sys

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from batchfit.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
