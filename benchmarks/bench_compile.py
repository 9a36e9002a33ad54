"""What compiling costs a user: the iterative half on a brand-new machine, on one that has run
it, uncompiled against compiled, and a user model against a scipy loop.

    python benchmarks/bench_compile.py [--dir /tmp/bench-compile] [--json out.json]

Every measurement is a fresh process (``python -c``), timed from outside, so imports and
loading count. "Brand-new" is an empty batchfit cache and an empty inductor cache (both
pointed at new directories under ``--dir``: each brand-new measurement gets its own);
"warm" is a machine that has run each workload once, once the background builders those runs
left behind are done (and anything they did not build built by one ``compile=True`` run). Stages:

1. brand-new: ``batchfit demo``; the first ``batchfit run --loss huber`` and the first
   ``fit(x, y, loss="huber")`` on 1e5 x 100; the 8-parameter, 250-point user model on 1e4
   series (NIST Gauss1's two peaks on an exponential baseline): its first three fits in
   one process, and one uncompiled fit in another;
2. warm: ``batchfit run --loss huber`` on 1e5 x 100 (wall, 3 runs); a new process fitting
   the user model (its first fit against its second: what it pays before running compiled);
3. uncompiled against compiled, in one process each: the seed's GD (1e4 series, 15,000
   epochs), huber Newton (1e5 x 100), LM on the user model (1e4);
4. the user model against ``scipy.optimize.least_squares(method="lm")`` per series, same
   starts (2,000 and 1e4 series; the scipy loop timed on 300 series and extrapolated), and
   the share of converged fits of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

PEAKS = "from batchfit.app.bench import peaks, peaks_dataset\n"


def run(*parts: str, env: dict, timeout: float = 1800) -> tuple[float, list]:
    """(wall seconds, the JSON lines it printed) of a fresh ``python -c`` of ``parts``."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return wall, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def command(args: list, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return time.perf_counter() - start


TIMED = """
import json, time
def timed(label, fn):
    start = time.perf_counter(); out = fn(); seconds = time.perf_counter() - start
    print(json.dumps({"label": label, "seconds": seconds})); return out
"""


def wait_for_builders(cache: str, limit: float = 1800):
    """Until no background builder holds a lock in ``cache`` (or ``limit`` seconds)."""
    deadline, quiet = time.time() + limit, 0
    while time.time() < deadline and quiet < 3:  # (three quiet looks in a row)
        locks = [name for root, _, files in os.walk(cache) for name in files
                 if name.endswith(".building")]
        quiet = 0 if locks else quiet + 1
        time.sleep(5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/bench-compile")
    parser.add_argument("--json")
    parser.add_argument("--scipy-series", type=int, default=300)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    def machine(name: str) -> dict:
        """The environment of a machine with its own, so far empty, caches."""
        return {**{k: v for k, v in os.environ.items() if k != "BATCHFIT_BACKGROUND"},
                "BATCHFIT_CACHE_DIR": os.path.join(args.dir, name, "cache"),
                "TORCHINDUCTOR_CACHE_DIR": os.path.join(args.dir, name, "inductor"),
                "TORCHINDUCTOR_COMPILE_THREADS": "1"}

    env = machine("warm")  # (every brand-new measurement gets a machine of its own)
    data = os.path.join(args.dir, "huber.parquet")
    rows = []

    def record(stage, label, seconds, **extra):
        rows.append({"stage": stage, "label": label, "seconds": seconds, **extra})
        print(f"{stage:<10} {label:<58} {seconds:9.2f} s", flush=True)

    # 1. brand-new (each process leaves builders behind: waited for before the next one, so
    # that they do not share the cores with it)
    new = machine("demo")
    record("new", "batchfit demo (wall)", command(
        [sys.executable, "-m", "batchfit", "demo", "-o", os.path.join(args.dir, "demo")], new))
    wait_for_builders(new["BATCHFIT_CACHE_DIR"])
    subprocess.run([sys.executable, "-m", "batchfit", "generate", data, "--series", "100000",
                    "--points", "100", "--outliers", "0.02"], env=env, check=True,
                   capture_output=True)
    new = machine("run")
    record("new", "first batchfit run --loss huber, 1e5 x 100 (wall)", command(
        [sys.executable, "-m", "batchfit", "run", data, "-o", data + ".out.parquet",
         "--loss", "huber", "--no-progress"], new))
    wait_for_builders(new["BATCHFIT_CACHE_DIR"])
    new = machine("fit")
    wall, lines = run(TIMED, """
        import numpy as np
        from batchfit import fit
        from batchfit.app.bench import dataset
        x, y = dataset(100_000, 100)
        x = np.tile(x, (100_000, 1)).astype(np.float32); y = y.astype(np.float32)
        timed("huber fit", lambda: fit(x, y, loss="huber"))
        """, env=new)
    record("new", "first fit(x, y, loss='huber'), 1e5 x 100: the call", lines[0]["seconds"])
    record("new", "  the whole process (imports, data, fit)", wall)
    wait_for_builders(new["BATCHFIT_CACHE_DIR"])
    new = machine("model")
    user_model = """
        from batchfit import fit
        x, y, truth, p0 = peaks_dataset(10_000)
        for i in range(FITS):
            timed(f"fit {i + 1}", lambda: fit(x, y, model=peaks, p0=p0, dtype="float64",
                                              compile=COMPILE))
        """
    _, lines = run(TIMED, PEAKS, "FITS, COMPILE = 1, False", user_model, env=new)
    eager = lines[0]["seconds"]
    record("new", "user model 1e4, compile=False (first call of a new process)", eager)
    _, lines = run(TIMED, PEAKS, "FITS, COMPILE = 3, 'auto'", user_model, env=new)
    for line in lines:
        record("new", f"user model 1e4, {line['label']} (x {line['seconds'] / eager:.2f} "
               "of uncompiled)", line["seconds"])

    # 2. warm: a machine that has run each of them once, its builders done (and anything
    # they did not reach built by one compile=True run)
    begun = time.perf_counter()
    wait_for_builders(new["BATCHFIT_CACHE_DIR"])
    command([sys.executable, "-m", "batchfit", "run", data, "-o", data + ".out.parquet",
             "--loss", "huber", "--no-progress"], env)
    run(TIMED, PEAKS, "FITS, COMPILE = 1, 'auto'", user_model, env=env)
    wait_for_builders(env["BATCHFIT_CACHE_DIR"])
    record("warm", "(ran each once, waited for the builders)", time.perf_counter() - begun)
    run(TIMED, PEAKS, """
        import numpy as np
        from batchfit import fit
        from batchfit.app.bench import dataset
        x, y = dataset(2000, 100)
        fit(np.tile(x, (2000, 1)).astype(np.float32), y.astype(np.float32), loss="huber",
            compile=True)
        fit(x, y.astype(np.float32), loss="huber", compile=True)
        x, y, truth, p0 = peaks_dataset(200)
        fit(x, y, model=peaks, p0=p0, dtype="float64", compile=True)
        """, env=env)
    for i in range(3):
        record("warm", f"batchfit run --loss huber, 1e5 x 100 (wall) #{i + 1}", command(
            [sys.executable, "-m", "batchfit", "run", data, "-o", data + ".out.parquet",
             "--loss", "huber", "--no-progress"], env))
    wall, lines = run(TIMED, PEAKS, """
        from batchfit import fit
        x, y, truth, p0 = peaks_dataset(10_000)
        for i in range(2):
            timed(f"fit {i + 1}", lambda: fit(x, y, model=peaks, p0=p0, dtype="float64"))
        """, env=env)
    first, second = lines[0]["seconds"], lines[1]["seconds"]
    record("warm", "user model, new process: first fit", first)
    record("warm", "  its second fit (compiled, steady)", second)
    record("warm", "  paid before running compiled (first - second)", first - second)
    record("warm", "  the whole process (imports, data, two fits)", wall)

    # 3. uncompiled against compiled, warm
    for label, setup, call in [
        ("seed GD, 1e4 x 100, 15,000 epochs", """
            import numpy as np
            from batchfit.app.bench import dataset
            x, y = dataset(10_000, 100)
            x = np.tile(x, (10_000, 1)).astype(np.float32); y = y.astype(np.float32)
            """, 'fit(x, y, solver="gd", compile=C)'),
        ("huber Newton, 1e5 x 100", """
            import numpy as np
            from batchfit.app.bench import dataset
            x, y = dataset(100_000, 100)
            x = np.tile(x, (100_000, 1)).astype(np.float32); y = y.astype(np.float32)
            """, 'fit(x, y, loss="huber", compile=C)'),
        ("LM, user model, 1e4", PEAKS + "x, y, truth, p0 = peaks_dataset(10_000)\n",
         'fit(x, y, model=peaks, p0=p0, dtype="float64", compile=C)')]:
        _, lines = run(TIMED, "from batchfit import fit", setup, f"""
for C in ("auto", False):
    {call}
    timed(str(C), lambda: {call})
""", env=env)
        compiled, uncompiled = lines[0]["seconds"], lines[1]["seconds"]
        record("ratio", f"{label}: uncompiled / compiled = "
               f"{uncompiled / compiled:.2f}", uncompiled, compiled=compiled)

    # 4. the user model against a scipy loop
    for series in (2000, 10_000):
        _, lines = run(TIMED, PEAKS, f"""
            import numpy as np
            from batchfit import fit
            from batchfit.app.bench import _peaks_scipy_loop
            x, y, truth, p0 = peaks_dataset({series})
            fit(x, y, model=peaks, p0=p0, dtype="float64")
            result = timed("batchfit", lambda: fit(x, y, model=peaks, p0=p0, dtype="float64"))
            rows = min({series}, {args.scipy_series})
            from scipy.optimize import least_squares
            def model(b):
                return (b[0] * np.exp(-b[1] * x) + b[2] * np.exp(-((x - b[3]) ** 2) / b[4] ** 2)
                        + b[5] * np.exp(-((x - b[6]) ** 2) / b[7] ** 2))
            fits = timed("scipy", lambda: [least_squares(lambda b, i=i: model(b) - y[i], p0[i],
                                                         method="lm") for i in range(rows)])
            ok_scipy = float(np.mean([f.success for f in fits]))
            ok = float((result.status_labels() == "ok").mean())
            err = float(np.max(np.abs(result.params.numpy()[:rows] - np.array([f.x for f in fits]))
                               / np.abs(np.array([f.x for f in fits])).max(axis=1, keepdims=True)))
            print(json.dumps({{"ok": ok, "ok_scipy": ok_scipy, "rows": rows, "err": err}}))
            """, env=env)
        ours, theirs, info = lines[0]["seconds"], lines[1]["seconds"], lines[2]
        scipy_s = theirs * series / info["rows"]
        record("peaks", f"{series:,} series: batchfit {ours / series * 1e6:.0f} us/fit, "
               f"scipy ~{scipy_s / series * 1e6:.0f} us/fit: x{scipy_s / ours:.1f}", ours,
               scipy_s=scipy_s, ok=info["ok"], ok_scipy=info["ok_scipy"],
               max_rel_diff=info["err"])
        print(f"{'':<10}   converged: batchfit {info['ok']:.4f}, scipy {info['ok_scipy']:.4f}; "
              f"max relative difference {info['err']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
