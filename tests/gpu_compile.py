"""Compiling Triton kernels for GPUs on a machine without one (shared by the kernel test files; pytest puts
tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_without_interpreter(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c script args...`` in a fresh process with TRITON_INTERPRET unset, so the kernels are
    built by Triton's real compiler (which type-checks what the interpreter does not)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


_COMPILE_LOOP = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

for arch in map(int, sys.argv[1:]):
    for fn, signature, constexprs in kernels:
        out = compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        assert out.asm.get("cubin"), (fn.__name__, arch)
"""


def compile_for_gpu(kernels_script: str, *archs: str) -> subprocess.CompletedProcess:
    """:func:`run_without_interpreter` on ``kernels_script`` (which defines ``kernels``, a list of
    ``(jit_function, signature, constexprs)``) followed by compiling each kernel to a cubin for each of
    ``archs`` (e.g. "80", "90"); a non-zero return code says which failed."""
    return run_without_interpreter(kernels_script + _COMPILE_LOOP, *archs)
