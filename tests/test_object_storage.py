"""Inputs and outputs in object storage, against a real S3 API: moto's standalone server on
a free port of 127.0.0.1, started and stopped here (nothing reaches beyond 127.0.0.1). The
CLI runs as a user runs it; every remote result is compared with the same job on local
files."""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchfit.app.cli import main
from batchfit.app.generate import generate
from batchfit.io import storage

SECRET = "TOPSECRET-never-shown-4f9c"  # the secret key: it must appear nowhere


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(port: int, **env) -> subprocess.Popen:
    """moto's server in its own process group, once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return server
        except OSError as exc:
            if getattr(exc, "code", None):  # (an HTTP answer: it is up)
                return server
            time.sleep(0.1)
    stop(server)
    raise RuntimeError("moto's server did not start")


def stop(process: subprocess.Popen):
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint with a bucket ``data``; the environment points every client at it."""
    port = free_port()
    server = start_moto(port)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    filesystem = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}",
                                   allow_bucket_creation=True, allow_bucket_deletion=True)
    filesystem.create_dir("data")
    yield filesystem
    stop(server)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def upload(filesystem, local: str, key: str):
    pafs.copy_files(local, key, destination_filesystem=filesystem)


def keys(filesystem, prefix: str) -> list[str]:
    return sorted(info.path for info in filesystem.get_file_info(
        pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        if info.type == pafs.FileType.File)


def remote_table(filesystem, key: str) -> pa.Table:
    return pq.read_table(key, filesystem=filesystem)


def bare(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None)


def metadata(table: pa.Table) -> dict:
    return json.loads(table.schema.metadata[b"batchfit"])


@pytest.fixture(scope="module")
def layouts(s3, tmp_path_factory):
    """The same series as a sorted file, scattered over 3 files and as list format: locally
    and in the bucket (``in/<layout>/``)."""
    root = tmp_path_factory.mktemp("layouts")
    generate(str(root / "sorted.parquet"), series=3000, points=20, seed=4)
    generate(str(root / "list.parquet"), series=3000, points=20, seed=4, fmt="list")
    table = pq.read_table(root / "sorted.parquet")
    order = np.random.default_rng(4).permutation(table.num_rows)
    (root / "scattered").mkdir()
    for i, part in enumerate(np.array_split(order, 3)):
        pq.write_table(table.take(pa.array(part)), root / "scattered" / f"p{i}.parquet")
    local = {"sorted": str(root / "sorted.parquet"), "list": str(root / "list.parquet"),
             "scattered": str(root / "scattered")}
    for name, path in local.items():
        files = sorted(os.listdir(path)) if os.path.isdir(path) else [None]
        for file in files:
            source = os.path.join(path, file) if file else path
            upload(s3, source, f"data/in/{name}/{file or 'part0.parquet'}")
    return local


@pytest.mark.parametrize("layout", ["sorted", "scattered", "list"])
def test_the_single_machine_reads_and_writes_the_store(s3, layouts, tmp_path, layout):
    """A key, a prefix (here of one or of many files) and a remote output: the same table as
    the same files on local disk."""
    fmt = ["--format", "list"] if layout == "list" else []
    local_out = str(tmp_path / "local.parquet")
    assert main(["run", layouts[layout], "-o", local_out, "--no-progress", *fmt]) == 0
    want = pq.read_table(local_out)
    uri = f"s3://data/in/{layout}/"
    assert main(["run", uri, "-o", f"s3://data/out/{layout}.parquet", "--no-progress",
                 *fmt]) == 0
    got = remote_table(s3, f"data/out/{layout}.parquet")
    assert bare(got).equals(bare(want))
    assert metadata(got)["input"] == uri
    assert {k: v for k, v in metadata(got).items() if k != "input"} == \
        {k: v for k, v in metadata(want).items() if k != "input"}
    if layout == "sorted":  # a single key, to a local output
        assert main(["run", f"{uri}part0.parquet", "-o", str(tmp_path / "k.parquet"),
                     "--no-progress"]) == 0
        assert bare(pq.read_table(tmp_path / "k.parquet")).equals(bare(want))
    assert [k for k in keys(s3, "data/out") if k.endswith(".tmp")] == []


@pytest.mark.slow  # (a robust fit, GD and plots: 4 s)
def test_points_jobs_history_and_plots_from_the_store(s3, layouts, tmp_path):
    """A robust job (whole series gathered from scattered files), its --history in the
    store, and `batchfit plot` reading everything from there."""
    options = ["--loss", "huber", "--no-progress", "--no-compile"]
    assert main(["run", layouts["scattered"], "-o", str(tmp_path / "l.parquet"),
                 *options]) == 0
    assert main(["run", "s3://data/in/scattered", "-o", "s3://data/robust/fits.parquet",
                 *options]) == 0
    assert bare(remote_table(s3, "data/robust/fits.parquet")).equals(
        bare(pq.read_table(tmp_path / "l.parquet")))
    assert main(["run", "s3://data/in/sorted/part0.parquet", "-o", "s3://data/gd/f.parquet",
                 "--solver", "gd", "--epochs", "50", "--no-progress", "--no-compile",
                 "--history", "s3://data/gd/history.parquet"]) == 0
    assert "epoch" in remote_table(s3, "data/gd/history.parquet").column_names
    out = tmp_path / "plots"
    assert main(["plot", "s3://data/in/sorted/part0.parquet", "s3://data/gd/f.parquet",
                 "--history", "s3://data/gd/history.parquet", "-o", str(out)]) == 0
    assert {"data.png", "fits.png", "loss.png"} <= set(os.listdir(out))


def test_a_failed_run_leaves_the_older_remote_output(s3, layouts, tmp_path, capsys):
    """The second file of the input is bad (a negative weight): found after the writer has
    started, the job fails; the older output is untouched and no temporary object stays."""
    older = b"an older output"
    with s3.open_output_stream("data/keep/fits.parquet") as stream:
        stream.write(older)
    table = pq.read_table(layouts["sorted"])
    weights = np.ones(table.num_rows)
    weights[-1] = -1.0
    table = table.append_column("weight", pa.array(weights))
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), tmp_path / "a.parquet")
    pq.write_table(table.slice(half), tmp_path / "b.parquet")
    upload(s3, str(tmp_path / "a.parquet"), "data/bad/a.parquet")
    upload(s3, str(tmp_path / "b.parquet"), "data/bad/b.parquet")
    assert main(["run", "s3://data/bad/", "-o", "s3://data/keep/fits.parquet",
                 "--weight-col", "weight", "--no-progress", "--batch-size", "500"]) == 2
    assert "weights must be >= 0" in capsys.readouterr().err
    with s3.open_input_stream("data/keep/fits.parquet") as stream:
        assert stream.read() == older
    assert keys(s3, "data/keep") == ["data/keep/fits.parquet"]


@pytest.mark.slow
def test_a_signal_leaves_the_older_remote_output_and_no_temporary_object(s3, layouts):
    older = b"an older output"
    with s3.open_output_stream("data/sig/fits.parquet") as stream:
        stream.write(older)
    process = subprocess.Popen(
        [sys.executable, "-m", "batchfit", "run", "s3://data/in/sorted/", "-o",
         "s3://data/sig/fits.parquet", "--solver", "gd", "--epochs", "1000000",
         "--no-compile", "--no-progress"], stderr=subprocess.PIPE, text=True)
    # (an upload in progress is not listed: the signal comes well into the fit, which takes
    # minutes, once its temporary object is being written)
    time.sleep(10)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["batchfit: terminated; no output was written"]
    with s3.open_input_stream("data/sig/fits.parquet") as stream:
        assert stream.read() == older
    assert keys(s3, "data/sig") == ["data/sig/fits.parquet"]


@pytest.mark.slow
def test_resume_keeps_its_state_beside_a_remote_output(s3, layouts, tmp_path):
    """--resume with a remote output: a killed run's checkpoint lives in the store, and the
    next run continues to the output an uninterrupted run writes, byte for byte."""
    job = ["--solver", "gd", "--epochs", "3000", "--no-compile", "--no-progress",
           "--batch-size", "300"]
    assert main(["run", layouts["sorted"], "-o", str(tmp_path / "ref.parquet"), *job]) == 0
    out = "s3://data/resume/fits.parquet"
    process = subprocess.Popen([sys.executable, "-m", "batchfit", "run",
                                "s3://data/in/sorted/", "-o", out, *job, "--resume"],
                               stderr=subprocess.DEVNULL)
    parts = "data/resume/.fits.parquet.resume"
    deadline = time.monotonic() + 300
    while len([k for k in keys(s3, parts) if "/part-" in k]) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert keys(s3, parts)  # (the checkpoint stayed)
    assert main(["run", "s3://data/in/sorted/", "-o", out, *job, "--resume"]) == 0
    with s3.open_input_stream("data/resume/fits.parquet") as stream:
        got = pq.read_table(pa.BufferReader(stream.read()))
    assert bare(got).equals(bare(pq.read_table(tmp_path / "ref.parquet")))
    assert keys(s3, "data/resume") == ["data/resume/fits.parquet"]


def test_the_guard_works_on_uris(s3, layouts, capsys):
    cases = [("s3://data/in/sorted/part0.parquet", "s3://data/in/sorted/part0.parquet",
              "is the input"),
             ("s3://data/in/scattered/", "s3://data/in/scattered/fits.parquet",
              "lies inside the input directory")]
    for source, target, said in cases:
        assert main(["run", source, "-o", target]) == 2
        assert said in capsys.readouterr().err
    assert len(keys(s3, "data/in/scattered")) == 3


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert SECRET not in lines[0]
    return lines[0]


def test_what_is_missing_is_named(s3, layouts, tmp_path, capsys):
    out = str(tmp_path / "out.parquet")
    assert "input bucket does not exist: s3://nobucket" in error_of(
        ["run", "s3://nobucket/in.parquet", "-o", out], capsys)
    assert "input not found: s3://data/in/nokey.parquet" in error_of(
        ["run", "s3://data/in/nokey.parquet", "-o", out], capsys)
    assert "output bucket does not exist: s3://nobucket" in error_of(
        ["run", "s3://data/in/sorted/", "-o", "s3://nobucket/f.parquet"], capsys)
    assert not os.path.exists(out)


@pytest.mark.slow  # (pyarrow retries a refused connection for about 6 s)
def test_a_wrong_endpoint_and_a_bad_option_are_one_line(s3, layouts, tmp_path, capsys):
    out = str(tmp_path / "out.parquet")
    said = error_of(["run", "s3://data/in/sorted/", "-o", out, "--storage-option",
                     f"endpoint_override=http://127.0.0.1:{free_port()}"], capsys)
    assert "cannot connect (check the endpoint)" in said
    said = error_of(["run", "s3://data/in/sorted/", "-o", out, "--storage-option",
                     "no_such_option=1"], capsys)
    assert "storage options ['no_such_option']" in said
    assert "--storage-option must be KEY=VALUE" in error_of(
        ["run", "s3://data/in/sorted/", "-o", out, "--storage-option", "novalue"], capsys)
    said = error_of(["run", f"s3://test:{SECRET}@data/in/sorted/", "-o", out], capsys)
    assert "may not hold a password" in said
    assert not os.path.exists(out)


def test_access_denied(layouts, tmp_path, monkeypatch, capsys):
    """A server that checks credentials (moto with authentication on) refuses unknown
    keys."""
    port = free_port()
    server = start_moto(port, INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        said = error_of(["run", "s3://data/in/sorted/", "-o", str(tmp_path / "o.parquet")],
                        capsys)
        assert "access denied" in said
    finally:
        stop(server)


class Unavailable(http.server.BaseHTTPRequestHandler):
    """A store that answers every request with 503 (for ever: past pyarrow's retries)."""

    def _refuse(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _refuse

    def log_message(self, *args):
        pass


@pytest.mark.slow  # (pyarrow's retries: about 6 s a request)
def test_a_transient_failure_that_outlasts_the_retries(s3, layouts, tmp_path, monkeypatch,
                                                       capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        said = error_of(["run", "s3://data/in/sorted/", "-o", str(tmp_path / "o.parquet")],
                        capsys)
        assert "kept failing, after retries" in said
        said = error_of(["run", str(layouts["sorted"]), "-o", "s3://data/busy/o.parquet"],
                        capsys)
        assert "kept failing" in said
    finally:
        server.shutdown()
        server.server_close()
    assert not os.path.exists(tmp_path / "o.parquet")
    assert keys(s3, "data/busy") == []


def test_a_missing_filesystem_package_is_named(tmp_path, capsys):
    # fsspec knows sftp://, whose package (paramiko) is not installed here
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("paramiko") is None:
        said = error_of(["run", "sftp://127.0.0.1/x.parquet", "-o",
                         str(tmp_path / "o.parquet")], capsys)
        assert "paramiko" in said
    # without fsspec at all: the extra that brings it
    shadow = tmp_path / "shadow"
    (shadow / "fsspec").mkdir(parents=True)
    (shadow / "fsspec" / "__init__.py").write_text("raise ImportError('no fsspec here')\n")
    done = subprocess.run([sys.executable, "-m", "batchfit", "run", "memory://b/x.parquet",
                           "-o", str(tmp_path / "o.parquet")], capture_output=True, text=True,
                          check=False,
                          env={**os.environ, "PYTHONPATH": str(shadow)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        ("batchfit: error: pyarrow has no filesystem for memory:// URIs, and fsspec (which "
         "may) is not installed: pip install 'batchfit[remote]'")]


def test_fsspec_filesystems_are_reached_too(tmp_path):
    """A scheme pyarrow has no filesystem for (fsspec's in-memory one), in and out."""
    fsspec = pytest.importorskip("fsspec")
    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    memory = fsspec.filesystem("memory")
    with open(tmp_path / "d.parquet", "rb") as handle:
        memory.pipe("/bf/in/d.parquet", handle.read())
    assert main(["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "l.parquet")]) == 0
    assert main(["run", "memory://bf/in/", "-o", "memory://bf/out/f.parquet"]) == 0
    got = pq.read_table(pa.BufferReader(memory.cat("/bf/out/f.parquet")))
    assert bare(got).equals(bare(pq.read_table(tmp_path / "l.parquet")))


def test_credentials_never_show():
    """What messages and metadata show of a URI, and of a store's error text."""
    assert storage.shown("s3://bucket/key?secret_key=abc&region=x") == "s3://bucket/key"
    assert storage.shown("abfs://container@account.dfs.core.windows.net/k") == \
        "abfs://container@account.dfs.core.windows.net/k"
    with storage.using({"secret_key": SECRET, "region": "us-east-1"}):
        assert storage.redacted(f"failed with {SECRET} at us-east-1") == \
            "failed with *** at us-east-1"
    assert storage.split("s3://b/k?region=eu-west-1") == ("s3://b/k", {"region": "eu-west-1"})


# ---------------------------------------------------------------- Ray

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RAY_DRIVER = """
import json, sys, time
import ray
from batchfit.pipeline.distributed import run_ray
address, nodes, source, target, loss = sys.argv[1:]
if address != "-":
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    while len([n for n in ray.nodes() if n["Alive"]]) < int(nodes):
        time.sleep(0.2)
summary = run_ray(source, target, loss=loss)
print(json.dumps({"n_series": summary.n_series, "n_points": summary.n_points,
                  "stages": summary.metadata.get("stages", {})}))
"""


def ray_job(source, target, loss="mse", address="-", nodes=1) -> dict:
    done = subprocess.run([sys.executable, "-c", RAY_DRIVER, address, str(nodes), source,
                           target, loss], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def remote_directory(filesystem, prefix: str) -> pa.Table:
    files = [k for k in keys(filesystem, prefix) if k.endswith(".parquet")]
    assert f"{prefix}/_SUCCESS" in keys(filesystem, prefix)
    return pa.concat_tables(pq.read_table(k, filesystem=filesystem) for k in files)


def same_fits(got: pa.Table, want: pa.Table):
    from zoo import assert_same_fits

    got, want = bare(got).sort_by("series_id"), bare(want).sort_by("series_id")
    assert got.column_names == want.column_names
    assert_same_fits(got, want)
    for name in ("series_id", "n_points", "status"):
        assert got[name].equals(want[name])


@pytest.mark.slow
@pytest.mark.parametrize("layout, loss", [("scattered", "mse"), ("list", "mse"),
                                          ("scattered", "huber")])
def test_ray_reads_and_writes_the_store(s3, layouts, tmp_path, layout, loss):
    """Both Ray paths from a prefix of the store to a remote directory: the single machine's
    fits, the points counted, the same metadata keys; the statistics path moved no points
    (its tasks read their shares from the store)."""
    fmt = ["--format", "list"] if layout == "list" else []
    local = str(tmp_path / "one.parquet")
    assert main(["run", layouts[layout], "-o", local, "--loss", loss, "--no-progress",
                 *fmt]) == 0
    want = pq.read_table(local)
    target = f"data/ray/{layout}-{loss}"
    with s3.open_output_stream(f"{target}/earlier.parquet") as stream:
        stream.write(b"an earlier job's file: replaced")
    summary = ray_job(f"s3://data/in/{layout}/", f"s3://{target}", loss)
    got = remote_directory(s3, target)
    same_fits(got, want)
    assert (summary["n_series"], summary["n_points"]) == (3000, 3000 * 20)
    assert metadata(got).keys() == metadata(want).keys()
    assert metadata(got)["input_format"] == "parquet" and metadata(got)["engine"] == "ray"
    assert bool(summary["stages"]) == (loss == "mse")  # (the statistics path, or points)
    assert not any(k.endswith((".tmp", "earlier.parquet")) for k in keys(s3, "data/ray"))


@pytest.fixture
def two_nodes(s3):
    """A Ray head and a second node (`ray start`), each in its own process group and temp
    directory, stopped afterwards; their workers see the S3 endpoint."""
    import tempfile

    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
    nodes = []
    try:
        head_dir = tempfile.mkdtemp(prefix="bf-ray-", dir="/tmp")
        nodes.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--include-dashboard", "false", "--temp-dir", head_dir, *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True))
        time.sleep(5)  # (the head's GCS first)
        nodes.append(subprocess.Popen(
            [RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address",
             "127.0.0.1", *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True))
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(node.pid, sig)
                    node.wait(timeout=30)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


@pytest.mark.slow
def test_a_two_node_cluster_reads_the_store(s3, layouts, two_nodes, tmp_path):
    """The job's tasks run on both nodes, read from the S3 server, and give the single
    machine's table."""
    local = str(tmp_path / "one.parquet")
    assert main(["run", layouts["scattered"], "-o", local, "--no-progress"]) == 0
    summary = ray_job("s3://data/in/scattered/", "s3://data/two/out", address=two_nodes,
                      nodes=2)
    assert summary["stages"]["partial"]["nodes"] == 2, summary["stages"]
    same_fits(remote_directory(s3, "data/two/out"), pq.read_table(local))
