"""Nothing read from a file is ever evaluated or unpickled: custom code (losses, models)
comes only through the Python API."""

import ast
import builtins
import json
import pathlib
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import batchfit
from batchfit.app.cli import main

PACKAGE = pathlib.Path(batchfit.__file__).parent
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "loads", "load", "import_module",
                   "literal_eval", "unsafe_load"}
# json of batchfit's own metadata; torch.compile of batchfit's functions; aot.load of the
# kernels this machine compiled into its own cache (never a path from the data); the module
# a user names in --model package.module:function or fit(model=...) (their own code, never a
# name read from a file: a table's metadata is not imported, see test_user_models)
ALLOWED = {("json", "load"), ("json", "loads"), ("torch", "compile"), ("aot", "load"),
           ("importlib", "import_module")}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "yaml",
                     "joblib"}


def test_the_package_has_no_way_to_run_code_from_data():
    """Every call named like a deserialiser or evaluator, in every subpackage, is one of
    ALLOWED or numpy's load with pickles refused; no pickle-like module is imported."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert {p.parent.name for p in paths} >= {"core", "io", "moments", "fitting", "engine",
                                              "pipeline", "app"}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", "")]
                assert not {str(n).split(".")[0] for n in names} & FORBIDDEN_MODULES, (
                    f"{path.relative_to(PACKAGE)}:{node.lineno} imports a deserialiser")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in FORBIDDEN_CALLS:
                    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
                        func.value, ast.Name) else None
                    refuses_pickles = (owner, name) == ("np", "load") and any(
                        k.arg == "allow_pickle" and isinstance(k.value, ast.Constant)
                        and k.value.value is False for k in node.keywords)
                    assert (owner, name) in ALLOWED or refuses_pickles, (
                        f"{path.relative_to(PACKAGE)}:{node.lineno} calls {name}")


class Trap:
    """Unpickling this (or evaluating the text below) would create the marker file."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_metadata_is_only_data(tmp_path, monkeypatch):
    """Metadata carrying a pickle, Python source and a bogus batchfit entry: the run and the
    plots treat it as text, and nothing that executes code is called on the way."""
    marker = tmp_path / "pwned"
    Trap.marker = str(marker)
    source = f"open({str(marker)!r}, 'w')"
    x = np.tile(np.linspace(0, 1, 10), 3)
    table = pa.table({"series_id": np.repeat([1, 2, 3], 10), "x": x, "y": 3 * x**2 + 1})
    table = table.replace_schema_metadata({
        "pickle": pickle.dumps(Trap()), "python": source,
        "batchfit": json.dumps({"loss": source, "degree": source, "solver": source})})
    data = str(tmp_path / "data.parquet")
    pq.write_table(table, data)

    def refuse(*args, **kwargs):
        raise AssertionError("code from data was about to run")

    def guard(original):  # the library's own uses (imports, namedtuple) are fine
        def checked(source, *args, **kwargs):
            if isinstance(source, str | bytes) and marker.name in str(source):
                refuse()
            return original(source, *args, **kwargs)
        return checked

    monkeypatch.setattr(builtins, "eval", guard(builtins.eval))
    monkeypatch.setattr(builtins, "exec", guard(builtins.exec))
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    out = str(tmp_path / "out.parquet")
    assert main(["run", data, "-o", out, "--no-progress", "--no-compile"]) == 0
    coeffs = pq.read_table(out)
    coeffs = coeffs.replace_schema_metadata({"batchfit": json.dumps({"degree": source}),
                                             "pickle": pickle.dumps(Trap())})
    pq.write_table(coeffs, out)
    assert main(["plot", data, out, "-o", str(tmp_path / "plots")]) == 0  # degree: columns'
    history = str(tmp_path / "history.parquet")
    pq.write_table(pa.table({"epoch": [0]}).replace_schema_metadata(
        {"batchfit_history": json.dumps({"tracked": source})}), history)
    assert main(["plot", data, out, "--history", history, "-o", str(tmp_path / "p2")]) == 2
    assert not marker.exists()
    assert np.allclose(pq.read_table(out)["a"].to_numpy(), 3)
