"""Build mmh_fast._C: the C++ CPU kernels and bindings always; the CUDA
kernels when torch has CUDA and nvcc is found (FORCE_CUDA=1 insists,
FORCE_CPU=1 skips them). TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by
torch.utils.cpp_extension.

MMH_SKIP_EXT=1 installs the Python package without compiling (the Makefile
does this for the editable install, then builds the extension in place with
ninja so that rebuilds are incremental)."""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _with_cuda():
    if os.getenv("FORCE_CPU", "0") == "1":
        return False
    has_nvcc = cpp_extension.CUDA_HOME is not None
    torch_cuda = torch.version.cuda is not None
    if os.getenv("FORCE_CUDA", "0") == "1":
        if not (has_nvcc and torch_cuda):
            raise RuntimeError(
                "FORCE_CUDA=1 but "
                + ("torch is a CPU build" if not torch_cuda else "nvcc/CUDA_HOME was not found")
            )
        return True
    return has_nvcc and torch_cuda and (
        torch.cuda.is_available() or bool(os.getenv("TORCH_CUDA_ARCH_LIST"))
    )


def extensions():
    if os.getenv("MMH_SKIP_EXT", "0") == "1":
        return []
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "bindings", "*.cpp")))
    # at::parallel_for is OpenMP in ATen's headers: without -fopenmp it runs serially.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    define_macros = []
    if _with_cuda():
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            cpp_extension.CUDAExtension(
                "mmh_fast._C", sources, define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "mmh_fast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
