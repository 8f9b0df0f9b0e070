"""Build script: one C++ extension (pybind11, OpenMP) always; CUDA sources only when a CUDA
toolkit and a CUDA build of torch are present. A failed build fails the install: there is no
pure-Python stand-in for the compiled path."""

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


def cuda_extensions():
    """CUDA kernels (csrc/cuda/*.cu) build only with a CUDA toolkit and a CUDA build of torch."""
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cu_sources or os.environ.get("DECODING_SKIP_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension("decoding._cuda", cu_sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


cuda_exts, cuda_cmdclass = cuda_extensions()
cmdclass = {"build_ext": BuildExtWithClearErrors}
if cuda_cmdclass:
    # torch's BuildExtension knows nvcc; keep the clear-error wrapper around it.
    class _Build(cuda_cmdclass["build_ext"], BuildExtWithClearErrors):
        pass

    cmdclass["build_ext"] = _Build

setup(ext_modules=[cpu_extension(), *cuda_exts], cmdclass=cmdclass)
