"""--engine ray on a real local Ray cluster: same numbers as the single-machine job."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from zoo import assert_same_fits

import batchfit
from batchfit.app.cli import main
from batchfit.app.generate import generate

ray = pytest.importorskip("ray")  # the [ray] extra; CI installs it, so these tests run there
from batchfit.pipeline.distributed import run_ray

pytestmark = pytest.mark.slow  # (a real Ray cluster per test)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One hermetic local cluster for the session: 2 CPUs, one fake GPU, no auth token."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


def single_machine(path, out, **options):
    batchfit.run_job(str(path), str(out), **options)
    return pq.read_table(out).sort_by("series_id")


def ray_output(path, out, **options):
    summary = run_ray(str(path), str(out), **options)
    table = pq.read_table(out).sort_by("series_id")
    assert summary.n_series == table.num_rows
    return table.replace_schema_metadata(None), summary


def same(a: pa.Table, b: pa.Table):
    """The same fits, under the row-order promise (Ray's partitions put points in another
    order than one machine reads them), on every column of the single-machine output: the
    float columns within the promise, every other column (ids, counts, statuses) equal."""
    a, b = a.replace_schema_metadata(None), b.replace_schema_metadata(None)
    assert a.column_names == b.column_names
    assert_same_fits(a, b)
    for name in a.column_names:
        if not pa.types.is_floating(a.schema.field(name).type):
            assert a[name].equals(b[name]), name


def stages(summary) -> dict:
    """The statistics path's stage timings (absent on the point path)."""
    return summary.metadata.get("stages", {})


def write_parts(table: pa.Table, directory, parts: int, *, assign=None, **options):
    """``table``'s rows over ``parts`` files: row i to file ``assign[i]`` (default: a
    random permutation cut in ``parts``)."""
    directory.mkdir()
    if assign is None:
        assign = np.arange(table.num_rows) * parts // table.num_rows
        assign = assign[np.random.default_rng(7).permutation(table.num_rows)]
    for i in range(parts):
        pq.write_table(table.filter(pa.array(assign == i)), directory / f"p{i}.parquet",
                       **options)
    return directory


def test_long_format_sorted(ray_cluster, tmp_path):
    generate(str(tmp_path / "d.parquet"), series=500, points=20, min_points=3, max_points=30)
    want = single_machine(tmp_path / "d.parquet", tmp_path / "one.parquet")
    got, summary = ray_output(tmp_path / "d.parquet", tmp_path / "ray")
    same(got, want)
    assert summary.status_counts == {"ok": 500}
    meta = batchfit.io.read_metadata(pq.ParquetDataset(tmp_path / "ray").files[0])
    assert meta["engine"] == "ray" and meta["solver"] == "exact"
    assert stages(summary)["partial"]["tasks"] >= 1  # (statistics travelled, not points)


def test_sorted_file_cut_between_tasks(ray_cluster, tmp_path):
    """One sorted file of many row groups, shared out between two tasks: a series cut at
    the boundary merges from both; --workers 1 gives one task and one partition."""
    generate(str(tmp_path / "d.parquet"), series=400, points=25)
    pq.write_table(pq.read_table(tmp_path / "d.parquet"), tmp_path / "groups.parquet",
                   row_group_size=1234)
    want = single_machine(tmp_path / "d.parquet", tmp_path / "one.parquet")
    got, summary = ray_output(tmp_path / "groups.parquet", tmp_path / "ray")
    same(got, want)
    assert stages(summary)["tasks"] == 2
    got, summary = ray_output(tmp_path / "groups.parquet", tmp_path / "ray1", workers=1)
    same(got, want)
    assert stages(summary)["tasks"] == 1 and stages(summary)["merge"]["tasks"] == 1


def test_weights_degree_3_every_series_in_every_file(ray_cluster, tmp_path, rng):
    """Weighted degree-3 fits whose points are dealt round-robin over 4 files (every series
    has points in every file), with zero, NaN and missing weights among them."""
    generate(str(tmp_path / "d.parquet"), series=300, points=24, degree=3, min_points=8,
             max_points=40)
    table = pq.read_table(tmp_path / "d.parquet")
    weights = rng.uniform(0.2, 3.0, table.num_rows)
    weights[rng.random(table.num_rows) < 0.05] = 0.0
    weights[rng.random(table.num_rows) < 0.02] = np.nan
    table = table.append_column("weight", pa.array(weights))
    pq.write_table(table, tmp_path / "w.parquet")
    ids = table["series_id"].to_numpy()
    rank = np.arange(len(ids)) - np.searchsorted(ids, ids)  # point's place in its series
    parts = write_parts(table, tmp_path / "parts", 4, assign=rank % 4)
    for i in range(4):  # every series is in every file
        assert pc.count_distinct(pq.read_table(parts / f"p{i}.parquet")["series_id"]).as_py() \
            == 300
    want = single_machine(tmp_path / "w.parquet", tmp_path / "one.parquet", degree=3)
    got, summary = ray_output(parts, tmp_path / "ray", degree=3)
    same(got, want)
    assert got.column_names[1:5] == ["p3", "p2", "p1", "p0"]
    assert stages(summary)["partial"]["tasks"] == 2


def test_string_ids_shuffled(ray_cluster, tmp_path):
    generate(str(tmp_path / "d.parquet"), series=300, points=15)
    table = pq.read_table(tmp_path / "d.parquet")
    names = pc.binary_join_element_wise("s-", pc.cast(table["series_id"], pa.string()), "")
    table = table.set_column(0, "series_id", names)
    pq.write_table(table, tmp_path / "s.parquet")
    parts = write_parts(table, tmp_path / "parts", 3)
    want = single_machine(tmp_path / "s.parquet", tmp_path / "one.parquet")
    got, _ = ray_output(parts, tmp_path / "ray")
    assert got.schema.field("series_id").type == pa.string()
    same(got, want)


def test_series_that_need_refining(ray_cluster, tmp_path):
    """Noise-free series explain almost all their spread: the sums lose the residual, and
    the single-machine job refines them with a second pass over the points. So does Ray's:
    their residual moments from every task, then the refined fits (all columns agree)."""
    generate(str(tmp_path / "exact.parquet"), series=200, points=30, noise=0.0)
    generate(str(tmp_path / "noisy.parquet"), series=200, points=30)
    noisy = pq.read_table(tmp_path / "noisy.parquet")
    mixed = pa.concat_tables([pq.read_table(tmp_path / "exact.parquet"), noisy.set_column(
        0, "series_id", pc.add(noisy["series_id"], 1000))])
    pq.write_table(mixed, tmp_path / "m.parquet")
    parts = write_parts(mixed, tmp_path / "parts", 3)
    want = single_machine(tmp_path / "m.parquet", tmp_path / "one.parquet")
    got, summary = ray_output(parts, tmp_path / "ray")
    same(got, want)
    assert stages(summary)["refine"]["tasks"] >= 1
    assert stages(summary)["residual"]["tasks"] == stages(summary)["partial"]["tasks"]


def test_long_format_shuffled_over_files(ray_cluster, tmp_path, rng):
    generate(str(tmp_path / "d.parquet"), series=400, points=15, outliers=0.05)
    table = pq.read_table(tmp_path / "d.parquet")
    shuffled = table.take(rng.permutation(table.num_rows))
    (tmp_path / "parts").mkdir()
    for i, rows in enumerate(np.array_split(np.arange(table.num_rows), 3)):
        pq.write_table(shuffled.take(rows), tmp_path / "parts" / f"p{i}.parquet")
    for loss in ["mse", "huber"]:
        want = single_machine(tmp_path / "d.parquet", tmp_path / f"one-{loss}.parquet",
                              loss=loss)
        got, _ = ray_output(tmp_path / "parts", tmp_path / f"ray-{loss}", loss=loss)
        same(got, want)


def test_list_format(ray_cluster, tmp_path):
    generate(str(tmp_path / "l.parquet"), series=300, points=12, fmt="list")
    want = single_machine(tmp_path / "l.parquet", tmp_path / "one.parquet")
    got, _ = ray_output(tmp_path / "l.parquet", tmp_path / "ray")
    same(got, want)
    # over files: each task fits and writes its own series (no exchange at all)
    parts = write_parts(pq.read_table(tmp_path / "l.parquet"), tmp_path / "parts", 2)
    got, summary = ray_output(parts, tmp_path / "ray-parts")
    same(got, want)
    assert stages(summary)["fit"]["tasks"] == 2 and "merge" not in stages(summary)
    # an id in two files is two series of one id: refused, as on one machine
    twice = tmp_path / "twice"
    twice.mkdir()
    for i in range(2):
        pq.write_table(pq.read_table(tmp_path / "l.parquet"), twice / f"p{i}.parquet")
    with pytest.raises(ValueError, match="series ids repeat in list format"):
        run_ray(str(twice), str(tmp_path / "ray-twice"))
    assert not (tmp_path / "ray-twice").exists()


def test_gpu_workers_are_scheduled(ray_cluster, tmp_path):
    """Tasks asking for a GPU run on the cluster's (fake) GPU; on a CPU they fit on the CPU."""
    generate(str(tmp_path / "d.parquet"), series=200, points=10)
    want = single_machine(tmp_path / "d.parquet", tmp_path / "one.parquet")
    got, _ = ray_output(tmp_path / "d.parquet", tmp_path / "ray", num_gpus_per_worker=1,
                        workers=1)
    same(got, want)


def test_cli_and_failed_job_leave_no_complete_output(ray_cluster, tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    assert main(["run", str(tmp_path / "d.parquet"), "-o", str(tmp_path / "ok"),
                 "--engine", "ray", "--workers", "2"]) == 0
    assert "fitted 50 series (ok 50)" in capsys.readouterr().err
    bad = pq.read_table(tmp_path / "d.parquet")
    bad = bad.append_column("weight", pa.array(np.where(np.arange(bad.num_rows) == 7, -1.0, 1.0)))
    pq.write_table(bad, tmp_path / "bad.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"an older output")
    with pytest.raises(Exception, match="weights must be >= 0"):
        run_ray(str(tmp_path / "bad.parquet"), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["old.parquet"]  # untouched
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp left
    # one task of several fails (its file only): the others' work is thrown away too
    late = pq.read_table(tmp_path / "d.parquet")
    rows = late.num_rows
    late = late.append_column("weight", pa.array(np.where(np.arange(rows) == rows - 3, -1.0,
                                                          1.0)))
    parts = write_parts(late, tmp_path / "parts", 2, assign=np.arange(rows) * 2 // rows)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        run_ray(str(parts), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["old.parquet"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_engine_options_need_the_ray_engine(tmp_path, capsys):
    generate(str(tmp_path / "d.parquet"), series=5, points=5)
    assert main(["run", str(tmp_path / "d.parquet"), "--workers", "2"]) == 2
    assert "need --engine ray" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "d.parquet"), "--engine", "ray"]) == 2
    assert "--engine ray needs -o OUTPUT" in capsys.readouterr().err


def test_single_machine_path_never_imports_ray(tmp_path):
    import subprocess
    import sys

    generate(str(tmp_path / "d.parquet"), series=20, points=5)
    code = ("import sys, batchfit; batchfit.run_job(sys.argv[1], sys.argv[2]); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.parquet"),
                           str(tmp_path / "o.parquet")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_custom_model_runs_on_ray_like_on_one_machine(ray_cluster, tmp_path):
    """A user's f(x, params) travels to the workers (as code from the Python session, never
    from a file) and gives the single-machine numbers. (Defined here, it travels by value; a
    function of an importable module travels by name and the workers must have the module.)"""
    def decay(x, params):
        return params[0] * torch.exp(-params[1] * x) + params[2]

    generate(str(tmp_path / "d.parquet"), series=300, points=20, model="exp")
    options = dict(model=decay, p0=[1.0, 1.0, 0.0], param_names=["a", "b", "c"],
                   dtype="float64")
    want = single_machine(tmp_path / "d.parquet", tmp_path / "one.parquet", **options)
    got, summary = ray_output(tmp_path / "d.parquet", tmp_path / "ray", **options)
    same(got, want)
    assert got.column_names[1:4] == ["a", "b", "c"] and summary.status_counts == {"ok": 300}


def test_a_ray_output_that_holds_the_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    generate(str(data / "part-0.parquet"), series=20, points=10)
    before = (data / "part-0.parquet").read_bytes()
    for output in (tmp_path, data, data / "fits"):
        with pytest.raises(ValueError, match="input"):
            run_ray(str(data), str(output))
    assert (data / "part-0.parquet").read_bytes() == before


def test_every_path_writes_the_same_metadata_keys(ray_cluster, tmp_path):
    """One metadata builder for every path: the single-machine job, Ray's statistics path
    (MSE polynomial, local Parquet) and Ray's points path (a robust loss) record the same
    keys with the same values, but for what legitimately differs between them."""
    generate(str(tmp_path / "d.parquet"), series=60, points=10)
    data = str(tmp_path / "d.parquet")

    def ray_metadata(name, **options):
        summary = run_ray(data, str(tmp_path / name), **options)
        return summary, batchfit.io.read_metadata(pq.ParquetDataset(tmp_path / name).files[0])

    local = {loss: batchfit.io.read_metadata(batchfit.run_job(
        data, str(tmp_path / f"one-{loss}.parquet"), loss=loss).output)
        for loss in ("mse", "huber")}
    summary, statistics = ray_metadata("ray-statistics", loss="mse")
    assert stages(summary)["partial"]["tasks"] >= 1  # (the statistics path)
    summary, points = ray_metadata("ray-points", loss="huber")
    assert not stages(summary)  # (the points path)
    # what legitimately differs: the engine; the device (one machine records where it ran,
    # each Ray worker resolves "auto" for itself); batch_size (an option of run_job alone)
    differ = {"engine", "device"}
    for want, got in ((local["mse"], statistics), (local["huber"], points)):
        assert got.keys() == want.keys()
        assert (want["engine"], got["engine"]) == ("local", "ray")
        assert (want["device"], got["device"]) == ("cpu", "auto")
        assert {key for key in want if want[key] != got[key]} <= differ | {"options"}
        assert want["options"].pop("batch_size") == batchfit.pipeline.job.DEFAULT_BATCH_SIZE
        assert got["options"] == want["options"]
        assert got["columns"] == want["columns"]
    for meta in (*local.values(), statistics, points):
        assert meta["input_format"] == "parquet" and "x_unit" in meta


def test_a_remote_output_counts_its_series_and_points(ray_cluster, tmp_path, capsys):
    """A remote output (here Ray's ``local://``, remote to batchfit) is not read back as a
    local directory: the summary still counts the points and statuses the job wrote, its
    own files only (a remote output may hold an earlier job's), on both paths."""
    generate(str(tmp_path / "d.parquet"), series=50, points=10)
    points = pq.read_table(tmp_path / "d.parquet").num_rows
    (tmp_path / "remote").mkdir()
    pq.write_table(pq.read_table(tmp_path / "d.parquet").slice(0, 5),
                   tmp_path / "remote" / "earlier.parquet")
    for loss in ("huber", "mse"):
        assert main(["run", str(tmp_path / "d.parquet"), "-o", f"local://{tmp_path}/remote",
                     "--engine", "ray", "--loss", loss]) == 0
        assert f"fitted 50 series (ok 50) from {points:,} points" in capsys.readouterr().err
        assert (tmp_path / "remote" / "_SUCCESS").exists()
        summary = run_ray(str(tmp_path / "d.parquet"), f"local://{tmp_path}/remote",
                          loss=loss)
        assert (summary.n_series, summary.n_points, summary.status_counts) == \
            (50, points, {"ok": 50})
