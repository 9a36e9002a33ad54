"""The tree is the architecture (docs/architecture.md): each layer imports only the layers
below it, keeps out the packages it must not need, and the CPU MSE job never loads torch."""

import ast
import pathlib
import subprocess
import sys

import pytest

import batchfit

PACKAGE = pathlib.Path(batchfit.__file__).parent
LAYERS = ("core", "moments", "io", "fitting", "engine", "pipeline", "app")  # bottom to top
# packages a layer must never import, even lazily (torch-free layers keep the main job light)
FORBIDDEN = {
    "core": {"torch", "pyarrow", "matplotlib", "ray"},
    "moments": {"torch", "pyarrow", "matplotlib", "ray"},
    "io": {"torch", "matplotlib", "ray"},
    "fitting": {"pyarrow", "matplotlib", "ray"},
    "engine": {"pyarrow", "matplotlib", "ray"},
    "pipeline": {"matplotlib"},
    "app": set(),
}
# modules whose top level stays torch-free although their layer uses torch elsewhere
TORCH_FREE_AT_IMPORT = {"batchfit.engine"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, module: str, is_package: bool):
    """(module imported, at top level?) for every import in ``tree``, relative ones resolved;
    ``from batchfit.x import y`` counts as importing ``batchfit.x.y`` (y may be a module)."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            yield base, id(node) in top
            for alias in node.names:
                yield f"{base}.{alias.name}", id(node) in top


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "batchfit" and parts[1] in LAYERS else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What ``source`` (the text of ``module``) imports against the layer rules."""
    found, layer = [], layer_of(module)
    if layer is None:
        return found
    rank = LAYERS.index(layer)
    for name, at_top in imported(ast.parse(source), module, is_package):
        target = layer_of(name)
        if target is not None and LAYERS.index(target) > rank:
            found.append(f"{module} imports {name} from the layer above ({target})")
        elif name == "batchfit.__version__":
            found.append(f"{module} imports the package root (use batchfit._version)")
        top_package = name.split(".")[0]
        if top_package in FORBIDDEN[layer]:
            found.append(f"{module} ({layer}) imports {name}")
        if top_package == "torch" and at_top and module in TORCH_FREE_AT_IMPORT:
            found.append(f"{module} imports torch at import time")
    return found


def test_every_layer_imports_only_downward_and_only_what_it_may():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert {layer_of(module_name(p)) for p in modules} >= set(LAYERS)
    problems = [v for p in modules
                for v in violations(p.read_text(), module_name(p), p.name == "__init__.py")]
    assert problems == []


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("batchfit.core.options", "from batchfit.moments.degrees import parse\n", "layer above"),
    ("batchfit.fitting.models", "from ..pipeline import job\n", "layer above"),
    ("batchfit.io.write", "def f():\n    import torch\n", "imports torch"),
    ("batchfit.engine", "import torch\n", "at import time"),
    ("batchfit.pipeline.job", "from batchfit import __version__\n", "package root"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, expected):
    """(so the test above cannot pass by seeing nothing)"""
    problems = violations(source, module, is_package=module == "batchfit.engine")
    assert problems and expected in problems[0]


def test_the_cpu_mse_job_never_imports_torch(tmp_path):
    """The main job (MSE polynomial fits on the CPU) runs on the native kernel, numpy and
    pyarrow alone: torch's import would cost it more than the fit."""
    from batchfit.app.generate import generate

    data, out = tmp_path / "d.parquet", tmp_path / "f.parquet"
    generate(str(data), series=200, points=20, seed=3)
    script = ("import sys\nfrom batchfit.app.cli import main\n"
              f"code = main(['run', {str(data)!r}, '-o', {str(out)!r}, '--no-progress'])\n"
              "assert code == 0, code\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'matplotlib', 'ray')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert out.exists()
