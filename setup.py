"""Build script: one C++ extension (pybind11, OpenMP), the CPU backend of every op. A failed
build fails the install: there is no pure-Python stand-in for the compiled path. GPU kernels are
Triton (compiled at run time), so nothing here needs a CUDA toolkit."""

import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildExtWithClearErrors(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # re-raised: the install must fail
            raise RuntimeError(
                "genrec-decoding: building the C++ extension `decoding._C` failed "
                f"({type(exc).__name__}: {exc}). A C++17 compiler with OpenMP support "
                "(g++ >= 9 or clang with libomp) is required; there is no pure-Python fallback."
            ) from exc


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return Pybind11Extension(
        "decoding._C",
        sources,
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi", *openmp],
        extra_link_args=openmp,
    )


setup(ext_modules=[cpu_extension()], cmdclass={"build_ext": BuildExtWithClearErrors})
