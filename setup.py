"""Build mmfast._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is present.

FORCE_CUDA=1 builds the CUDA kernels on a machine without a GPU (needs nvcc and a CUDA build of torch);
FORCE_CPU=1 skips them; DEBUG=1 builds with -O0 -g.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.__config__ import parallel_info
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    if os.getenv("FORCE_CPU", "0") == "1":
        return False
    toolkit = CUDA_HOME is not None and torch.version.cuda is not None  # nvcc AND a CUDA build of torch
    if os.getenv("FORCE_CUDA", "0") == "1":
        if not toolkit:
            raise RuntimeError(
                "mmfast: FORCE_CUDA=1 but nvcc (CUDA_HOME) is missing or torch is a CPU-only build "
                f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")
        return True
    return toolkit and torch.cuda.is_available()


def get_extensions():
    with_cuda = use_cuda()
    debug = os.getenv("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # -g0 overrides Python's default -g: faster builds
    cxx = opt + ["-std=c++20"]
    if sys.platform == "linux" and "OpenMP" in parallel_info():
        cxx.append("-fopenmp")  # ATen's parallel_for is OpenMP-backed only under _OPENMP
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    ext_cls, extra = CppExtension, {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        ext_cls = CUDAExtension
        nvcc_opt = ["-O0", "-g"] if debug else ["-O3"]  # nvcc rejects -g0 (and adds no -g of its own)
        # No --use_fast_math: it flushes float32 denormals and loosens division; kernels that want fast
        # intrinsics use them explicitly.
        extra["nvcc"] = nvcc_opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    arch = os.getenv("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    print(f"mmfast: building {'CUDA' if with_cuda else 'CPU-only'} extension ({len(sources)} sources)")
    return [
        ext_cls(
            "mmfast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[
                ("MMFAST_WITH_CUDA", "1" if with_cuda else "0"),
                ("MMFAST_VERSION", f'"{VERSION}"'),
                ("MMFAST_CUDA_ARCH_LIST", f'"{arch}"'),
            ],
            extra_compile_args=extra,
        )
    ]


setup(
    name="mmfast",
    version=VERSION,
    description="Fused C++/CUDA ops and drop-in modules for small multimodal (image + text) classifiers",
    packages=find_packages(include=["mmfast", "mmfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "tqdm"],
    entry_points={"console_scripts": ["mmfast = mmfast.cli:main"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
