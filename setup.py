"""Builds torch_convt: the C++ operator library (CPU always, CUDA when available) as torch_convt/_C.

Environment: MAX_JOBS (parallel compile jobs), FORCE_CUDA=1 (build CUDA kernels even without a visible GPU),
TORCH_CUDA_ARCH_LIST (CUDA architectures), NVCC_FLAGS (extra nvcc flags), TORCH_CONVT_DEBUG=1 (-O0 -g),
TORCH_CONVT_SANITIZE=address,undefined (build with sanitizers).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def extension():
    # (csrc/python: the Python module's entries, not part of the C++ library that CMake builds)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/api/*.cpp") +
                     glob.glob("csrc/python/*.cpp"))
    debug = os.environ.get("TORCH_CONVT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++20", "-fopenmp", "-Wall", "-Wno-sign-compare", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("TORCH_CONVT_SANITIZE")
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        link += [f"-fsanitize={sanitize}"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "include")], extra_link_args=link)
    if use_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr"] + os.environ.get("NVCC_FLAGS", "").split()
        return CUDAExtension("torch_convt._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("torch_convt._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
