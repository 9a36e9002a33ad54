"""Builds the native moment kernel with the package (the rest of the metadata is in
pyproject.toml). setuptools because the kernel is one C file with no dependencies: an
Extension needs no build tool beyond the compiler, and pip's editable installs build it in
place. The extension is optional: where it cannot be built the package installs, and batchfit
warns once and sums with its torch twin (docs/architecture.md)."""

import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join("batchfit", "moments", "native")


def write_shared_header():
    """native/shared.h from batchfit/moments/shared.py (the numbers C and Python share)."""
    sys.path.insert(0, HERE)
    try:
        from batchfit.moments import shared
    finally:
        sys.path.remove(HERE)
    path, text = Path(HERE, NATIVE, "shared.h"), shared.header()
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# The kernel's builds: the baseline, and on x86-64 one for AVX-512 (x86-64-v4), which the
# loader takes where the CPU has it (4x faster on grouped points than the baseline; an AVX2
# build measured no faster than the baseline, so there is none).
LEVELS = {"_aggregate": [], "_aggregate_avx512": ["-march=x86-64-v4"]}


def kernel(module: str) -> Extension:
    return Extension(
        f"batchfit.moments.native.{module}",
        sources=[os.path.join(NATIVE, "module.c"), os.path.join(NATIVE, "aggregate.c")],
        depends=[os.path.join(NATIVE, name) for name in ("sums.h", "sums_all.h", "shared.h")]
        + [os.path.join("batchfit", "moments", "shared.py")],
        define_macros=[("Py_LIMITED_API", "0x030A0000"), ("BF_MODULE", module)],
        extra_compile_args=list(LEVELS[module]),
        py_limited_api=True,
        optional=True,  # (no compiler: batchfit installs and uses the torch twin)
    )


class BuildNative(build_ext):
    def build_extensions(self):
        write_shared_header()
        unix = self.compiler.compiler_type == "unix"
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if not (unix and x86):
            self.extensions = [ext for ext in self.extensions
                               if not ext.name.endswith("_avx512")]
        for ext in self.extensions:
            if unix:
                # (-Wno-psabi: 512-bit vectors passed in registers; nothing leaves the file
                # that way)
                ext.extra_compile_args += ["-O3", "-fno-math-errno", "-Wno-psabi"]
        super().build_extensions()


setup(
    ext_modules=[kernel(module) for module in LEVELS],
    cmdclass={"build_ext": BuildNative},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
