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
