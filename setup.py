"""Build script: the package plus its private compiled extension ``rollout_fast._C``.

``rollout_fast._C`` holds the C++ CPU kernel (always, given a C++ compiler) and the CUDA kernels (when a
CUDA toolkit is found) of the custom ops ``torch.ops.rollout_fast.rollout`` / ``fused_layers`` /
``topk_gather`` (schemas in ``csrc/ops.cpp``, bodies in ``csrc/cpu/`` and ``csrc/cuda/``). It is
built against the installed torch, so install torch first and build without isolation:
``pip install --no-build-isolation -e .`` (what ``make install`` does).

Environment knobs (declarative, nothing is downloaded):
    ROLLOUT_FAST_NO_EXT=1        build no compiled extension (pure Python, reference backend only)
    ROLLOUT_FAST_NO_CUDA=1       build the CPU kernel only, even where a CUDA toolkit is found
    CUDA_HOME (or CUDA_PATH)     the CUDA toolkit; when unset, the toolkit behind the ``nvcc`` on PATH
                                 (asked with ``nvcc --dryrun``, so wrapper scripts work), else torch's guess
    TORCH_CUDA_ARCH_LIST         GPU architectures to compile for, default "8.0;9.0+PTX" (A100, H100/H200,
                                 PTX for newer GPUs)
    MAX_JOBS                     parallel compile jobs (ninja), e.g. MAX_JOBS=1 on a busy machine
    ROLLOUT_FAST_DEBUG=1         compile with -O0 -g instead of -O3
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _toolkit_of_nvcc() -> str | None:
    """The toolkit root of the nvcc on PATH, from its own ``--dryrun`` report (TOP=...)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _toolkit_of_nvcc()
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _extensions():
    if _flag("ROLLOUT_FAST_NO_EXT"):
        return [], {}
    cuda_home = None if _flag("ROLLOUT_FAST_NO_CUDA") else _cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads these when it is imported
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    opt = ["-O0", "-g"] if _flag("ROLLOUT_FAST_DEBUG") else ["-O3"]
    # no FMA contraction: the baseline and AVX2 builds of the CPU kernel give the same bits
    cxx = [*opt, "-fvisibility=hidden", "-ffp-contract=off"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs in parallel only where _OPENMP is defined (ATen/ParallelOpenMP.h): without
        # -fopenmp every CPU kernel runs on one thread. The loader reuses the libgomp.so.1 torch loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # csrc/ops.cpp: the module and every op schema; csrc/cpu, csrc/cuda: the bodies per device
    sources = ["csrc/ops.cpp", "csrc/cpu/rollout_cpu.cpp", "csrc/cpu/gather_cpu.cpp"]
    if cuda_home:
        ext = CUDAExtension(
            "rollout_fast._C",
            sources + ["csrc/cuda/rollout_cuda.cpp", "csrc/cuda/rollout_cuda_kernels.cu", "csrc/cuda/gather_cuda.cu"],
            include_dirs=[os.path.abspath("csrc")],
            define_macros=[("ROLLOUT_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": [*opt, "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("rollout_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
