"""`batchfit run` on data in object storage: a local S3 server (moto's, on 127.0.0.1) against
the same files on local disk, and `--engine ray` joined to a running 2-node Ray cluster.

Run:  python benchmarks/bench_storage.py [--series 1e6] [--points 100] [--files 8] [--reps 2]
                                         [--dir D] [--json PATH]

The data: `batchfit generate`'s series, rows shuffled over --files Parquet files (as
bench_ray.py), uploaded once to the server (not timed). Each repetition runs in turn, in fresh
processes timed by GNU time: the single machine on the local files, the single machine on
the same files in S3, and `--engine ray --address ADDRESS` on S3, joined to a cluster of two
Ray nodes (`ray start`, one CPU each, started beforehand and stopped at the end). One more
Ray run reports its stage timings (`JobSummary.metadata["stages"]`, timed by the tasks). Every
output is checked against the local run's (bench_ray.agreement).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ray import RAY_ENV, STAGES, agreement, run, shuffled_input, time_v

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started(command: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def stop(process: subprocess.Popen):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=float, default=1e6)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir")
    parser.add_argument("--json")
    args = parser.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="batchfit-s3-")
    os.makedirs(scratch, exist_ok=True)
    s3_port, ray_port = free_port(), free_port()
    env = {**os.environ, **RAY_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)  # (time_v's commands inherit it)
    processes = []
    try:
        parts = shuffled_input(scratch, int(args.series), args.points, args.files)
        processes.append(started([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                  "-p", str(s3_port)], env))
        time.sleep(3)
        store = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"],
                                  allow_bucket_creation=True)
        store.create_dir("data")
        begun = time.perf_counter()
        pafs.copy_files(parts, "data/in", destination_filesystem=store)
        upload_s = time.perf_counter() - begun
        head = tempfile.mkdtemp(prefix="bf-ray-", dir="/tmp")
        common = ["--num-cpus", "1", "--block", "--disable-usage-stats", "--node-ip-address",
                  "127.0.0.1"]
        processes.append(started([RAY, "start", "--head", "--port", str(ray_port),
                                  "--include-dashboard", "false", "--temp-dir", head, *common],
                                 env))
        time.sleep(5)
        processes.append(started([RAY, "start", "--address", f"127.0.0.1:{ray_port}",
                                  *common], env))
        time.sleep(5)
        address = f"127.0.0.1:{ray_port}"
        one = os.path.join(scratch, "one.parquet")
        runs = {"local files": [], "S3": [], "S3, ray 2 nodes": []}
        for rep in range(args.reps):
            runs["local files"].append(run(parts, "-o", one))
            runs["S3"].append(run("s3://data/in/", "-o", f"s3://data/out/one-{rep}.parquet"))
            runs["S3, ray 2 nodes"].append(run("s3://data/in/", "-o", f"s3://data/out/ray-{rep}",
                                               "--engine", "ray", "--address", address))
        want = pq.read_table(one)
        meta = json.loads(want.schema.metadata[b"batchfit"])
        coefficients = [name for name, _ in meta["coefficient_columns"]]
        got = {"S3": pq.read_table("data/out/one-0.parquet", filesystem=store),
               "S3, ray 2 nodes": pq.read_table(
                   [info.path for info in store.get_file_info(pafs.FileSelector("data/out/ray-0"))
                    if info.path.endswith(".parquet")], filesystem=store)}
        agree = {name: agreement(want, table, coefficients) for name, table in got.items()}
        done = time_v([sys.executable, "-c", STAGES, "s3://data/in/", "s3://data/out/stages",
                       "2", address])
        stages = json.loads(done["stdout"].strip().splitlines()[-1])
        report(args, runs, stages, agree, upload_s)
    finally:
        for process in reversed(processes):
            stop(process)
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def report(args, runs, stages, agree, upload_s):
    print(f"{int(args.series):,} series x {args.points} points, rows shuffled over "
          f"{args.files} files (uploaded to the S3 server in {upload_s:.1f} s); "
          f"{args.reps} repetitions side by side (median [min-max])")
    summary = {}
    for name, values in runs.items():
        walls = sorted(v["wall_s"] for v in values)
        summary[name] = {"wall_s": walls, "median_wall_s": float(np.median(walls)),
                         "rss_mb": float(np.median([v["rss_mb"] for v in values]))}
        print(f"{name:>16} {np.median(walls):8.2f} s [{walls[0]:.2f}-{walls[-1]:.2f}] "
              f"peak RSS {summary[name]['rss_mb']:.0f} MB (the command's)")
    base = summary["S3"]["median_wall_s"]
    print(f"S3 / local files: {base / summary['local files']['median_wall_s']:.2f}x; "
          f"ray 2 nodes / single machine on S3: "
          f"{summary['S3, ray 2 nodes']['median_wall_s'] / base:.2f}x")
    print("stages of one more Ray run (seconds; wall: the stage's longest task):")
    print(f"  join the cluster {stages['start_s']:.2f}; list the files and read their footers "
          f"(plan) {stages['plan_s']:.2f}")
    for stage, what in (("partial", "read + partial statistics"),
                        ("merge", "exchange + merge + solve + write")):
        s = stages[stage]
        print(f"  {what}: {s['wall_s']:.2f} wall, {s['cpu_s']:.1f} CPU-s, {s['tasks']} tasks "
              f"on {s['nodes']} nodes, done {s['done_after_s']:.2f} after submitting"
              + (f" (write {s['write_s']:.2f} CPU-s)" if stage == "merge" else ""))
    print(f"  check the output {stages['check_s']:.2f}; job {stages['seconds']:.2f}")
    for name, columns in agree.items():
        worst = {k: v for k, v in columns.items() if v}
        print(f"{name} against local files: "
              + (f"differs: {worst}" if worst else "every column equal"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": summary, "stages": stages, "agreement": agree,
                       "upload_s": upload_s}, handle, indent=1)


if __name__ == "__main__":
    main()
