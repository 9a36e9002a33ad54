"""`batchfit run --engine ray` next to the single-machine run, on generated long format.

Run:  python benchmarks/bench_ray.py [--series 1e6] [--points 100] [--files 8] [--reps 3]
                                     [--workers 1,2] [--warm] [--dir D] [--json PATH]

The data: `batchfit generate`'s series, their rows shuffled over --files Parquet files (every
series has points in every file). Each repetition runs, in turn and in fresh processes
(`python -m batchfit run ...`), the single-machine job and `--engine ray --workers W` for each
W (a local Ray on this machine, started and stopped by the command), timed by GNU time
(`/usr/bin/time -v`: wall, peak RSS, user + system CPU of the process tree as far as it is
reaped; the Ray run's RSS is the driver's). Then one more Ray run per W reports its stage
timings (`JobSummary.metadata["stages"]`: each stage's longest task and its tasks' CPU
seconds, timed by the tasks). Every output is checked against the single machine's on every
column. The crossover: the Ray run's wall time fitted as fixed + variable / W over the W
measured, against the single-machine run's. ``--warm``: also time `--address ADDRESS` runs
joining a local Ray started beforehand (by a process of this script's own, which holds it
and stops it at the end), as on a cluster that is already up.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchfit.app.generate import generate

STAGES = ("import json, sys; from batchfit.pipeline.distributed import run_ray; "
          "s = run_ray(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), "
          "address=sys.argv[4] or None); "
          "print(json.dumps({'seconds': s.seconds, **s.metadata['stages']}))")
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def time_v(command: list) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``: wall s, peak RSS MB, CPU s, stdout."""
    with tempfile.NamedTemporaryFile("r") as report:
        done = subprocess.run(["/usr/bin/time", "-v", "-o", report.name, *command],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, **RAY_ENV})
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        fields = dict(line.strip().rsplit(": ", 1) for line in report.read().splitlines()
                      if ": " in line)
    clock = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    wall = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock)))
    return {"wall_s": wall, "rss_mb": int(fields["Maximum resident set size (kbytes)"]) / 1024,
            "cpu_s": float(fields["User time (seconds)"]) + float(fields["System time (seconds)"]),
            "stdout": done.stdout}


def run(*args) -> dict:
    return time_v([sys.executable, "-m", "batchfit", "run", *args, "--no-progress"])


def shuffled(data: str, directory: str, files: int):
    """``data``'s rows in a random order, cut into ``files`` Parquet files."""
    table = pq.read_table(data)
    order = np.random.default_rng(1).permutation(table.num_rows)
    os.makedirs(directory, exist_ok=True)
    for i, rows in enumerate(np.array_split(order, files)):
        pq.write_table(table.take(pa.array(rows)), os.path.join(directory, f"part-{i}.parquet"))


def shuffled_input(scratch: str, series: int, points: int, files: int) -> str:
    """The generated series (made once in ``scratch``), shuffled over ``files`` files: their
    directory."""
    data = os.path.join(scratch, "d.parquet")
    if not os.path.exists(data):
        generate(data, series=series, points=points)
    parts = os.path.join(scratch, f"shuffled-{files}")
    if not os.path.isdir(parts):
        shuffled(data, parts, files)
    return parts


def agreement(want: pa.Table, got: pa.Table, coefficients: list) -> dict:
    """Per column: the largest difference, relative to the series' largest coefficient for
    ``coefficients`` (README's row-order promise) and to the value itself for the rest (0.0
    where equal); None where the columns differ otherwise (a NaN, an id, a status)."""
    want, got = want.sort_by(want.column_names[0]), got.sort_by(got.column_names[0])
    if want.column_names != got.column_names or want.num_rows != got.num_rows:
        return {"columns or rows": None}

    def values(table, name):
        return table[name].to_numpy(zero_copy_only=False).astype(float)

    largest = np.nanmax(np.abs(np.stack([values(want, c) for c in coefficients], 1)), axis=1)
    out = {}
    for name in want.column_names:
        if not pa.types.is_floating(want.schema.field(name).type):
            out[name] = 0.0 if want[name].equals(got[name]) else None
            continue
        a, b = values(want, name), values(got, name)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            out[name] = None
            continue
        scale = largest if name in coefficients else np.abs(a)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(a == b, 0.0, np.abs(a - b) / scale)
        out[name] = float(np.nanmax(rel)) if len(rel) else 0.0
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=float, default=1e6)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--dir")
    parser.add_argument("--json")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    scratch = args.dir or tempfile.mkdtemp(prefix="batchfit-ray-")
    try:
        parts = shuffled_input(scratch, int(args.series), args.points, args.files)
        one = os.path.join(scratch, "one.parquet")
        runs = {"single": []} | {f"ray{w}": [] for w in workers}
        for _ in range(args.reps):  # side by side, in turn: the machine's noise hits all
            runs["single"].append(run(parts, "-o", one))
            for w in workers:
                runs[f"ray{w}"].append(run(parts, "-o", os.path.join(scratch, f"ray{w}"),
                                           "--engine", "ray", "--workers", str(w)))
        want = pq.read_table(one)
        meta = json.loads(want.schema.metadata[b"batchfit"])
        coefficients = [name for name, _ in meta["coefficient_columns"]]
        stages, agree = {}, {}
        for w in workers:
            agree[w] = agreement(want, pq.read_table(os.path.join(scratch, f"ray{w}")),
                                 coefficients)
            done = time_v([sys.executable, "-c", STAGES, parts,
                           os.path.join(scratch, f"stages{w}"), str(w), ""])
            stages[w] = json.loads(done["stdout"].strip().splitlines()[-1])
        if args.warm:
            warm_runs(args, parts, scratch, workers, runs, stages)
        report(args, runs, stages, agree, workers)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


HOLD = ("import sys, ray; ray.init(include_dashboard=False, log_to_driver=False, "
        "configure_logging=False); print(ray.get_runtime_context().gcs_address, flush=True); "
        "sys.stdin.read(); ray.shutdown()")


def warm_runs(args, parts, scratch, workers, runs, stages):
    """`--address` runs joining a local Ray that a process of ours starts and holds (its own
    cluster, stopped when we close its stdin: no other Ray on the machine is touched)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV})
    try:
        address = holder.stdout.readline().strip()
        for w in workers:
            runs[f"warm{w}"] = [run(parts, "-o", os.path.join(scratch, f"warm{w}"), "--engine",
                                    "ray", "--workers", str(w), "--address", address)
                                for _ in range(args.reps)]
            done = time_v([sys.executable, "-c", STAGES, parts,
                           os.path.join(scratch, f"warmstages{w}"), str(w), address])
            stages[f"warm{w}"] = json.loads(done["stdout"].strip().splitlines()[-1])
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)


def report(args, runs, stages, agree, workers):
    per_million = 1e6 / args.series
    print(f"{int(args.series):,} series x {args.points} points, rows shuffled over "
          f"{args.files} files; {args.reps} repetitions side by side (median [min-max])")
    print(f"{'run':>10} {'wall s':>20} {'CPU s':>8} {'peak RSS MB':>12}   (CPU and RSS: the "
          "command's process tree as GNU time sees it; not Ray's workers)")
    summary = {}
    for name, values in runs.items():
        walls = sorted(v["wall_s"] for v in values)
        cpu = float(np.median([v["cpu_s"] for v in values]))
        rss = float(np.median([v["rss_mb"] for v in values]))
        summary[name] = {"wall_s": walls, "median_wall_s": float(np.median(walls)),
                         "cpu_s": cpu, "rss_mb": rss}
        print(f"{name:>10} {np.median(walls):8.2f} [{walls[0]:.2f}-{walls[-1]:.2f}] "
              f"{cpu:8.1f} {rss:12.0f}")
    single = summary["single"]["median_wall_s"]
    for name in summary:
        if name != "single":
            ratio = summary[name]["median_wall_s"] / single
            print(f"{name}: {ratio:.2f}x the single machine's wall time")
    print("\nstages (one more run per W; CPU-s per million series: the tasks' own)")
    for w in stages:
        s = stages[w]
        line = [f"W={w}: ray.init {s['start_s']:.1f} s, plan {s['plan_s']:.2f} s"]
        for stage in ("partial", "merge", "residual", "refine", "fit"):
            if stage in s:
                line.append(f"{stage} {s[stage]['wall_s']:.1f} s wall / "
                            f"{s[stage]['cpu_s'] * per_million:.1f} CPU-s per 1e6 series"
                            f" ({s[stage]['tasks']} tasks)")
        line.append(f"check {s['check_s']:.2f} s; job {s['seconds']:.1f} s")
        print("  " + "; ".join(line))
    for w in workers:
        worst = {k: v for k, v in agree[w].items() if v}
        bad = [k for k, v in agree[w].items() if v is None]
        print(f"W={w} output vs single machine: {'DIFFERENT: ' + str(bad) if bad else 'agree'}"
              f"; largest relative difference {max(worst.values(), default=0.0):.1e}"
              f" ({max(worst, key=worst.get) if worst else '-'})")
    if len(workers) >= 2:
        (w1, t1), (w2, t2) = [(w, summary[f"ray{w}"]["median_wall_s"]) for w in workers[:2]]
        variable = (t1 - t2) / (1 / w1 - 1 / w2)
        fixed = t1 - variable / w1
        print(f"\nRay wall time ~ {fixed:.1f} s + {variable:.1f} s / W (W workers; per "
              f"{int(args.series):,} series)")
        if variable > 0 and single > fixed:
            print(f"beats this machine's single run ({single:.1f} s) from W ~ "
                  f"{variable / (single - fixed):.1f} workers")
        else:
            print("never beats this machine's single run on this machine's cores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"series": args.series, "points": args.points, "files": args.files,
                       "runs": summary, "stages": stages,
                       "agreement": {str(w): a for w, a in agree.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
