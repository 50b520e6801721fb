"""Build the optional C++ backend `rcgrpo_kernels._C`.

The extension is optional: with RCGRPO_NO_EXT=1, without a compiler, or when the build fails,
the package still installs and `rcgrpo_kernels` falls back to the Triton and torch backends.
"""
import os
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that adds OpenMP when the compiler supports it and never fails the install."""

    def build_extensions(self):
        openmp = _compiler_accepts(self.compiler, "-fopenmp")
        for ext in self.extensions:
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        try:
            super().build_extensions()
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the package usable
            print(f"rcgrpo: C++ backend not built ({exc}); the torch and Triton backends remain", file=sys.stderr)

    def copy_extensions_to_source(self):
        try:
            super().copy_extensions_to_source()
        except Exception as exc:  # noqa: BLE001
            print(f"rcgrpo: C++ backend not copied in place ({exc})", file=sys.stderr)


def _compiler_accepts(compiler, flag):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write("int main() { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        except Exception:  # noqa: BLE001
            return False
    return True


def _extensions():
    if os.environ.get("RCGRPO_NO_EXT", "") not in ("", "0"):
        return []
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".cpp")
    ) if os.path.isdir("csrc") else []
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("rcgrpo: pybind11 missing, C++ backend not built", file=sys.stderr)
        return []
    return [
        Pybind11Extension(
            "rcgrpo_kernels._C",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
