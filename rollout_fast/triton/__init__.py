"""Triton kernels of the rollout_fast ops, one file per op (private; only :mod:`rollout_fast.ops` imports them).

- :mod:`.rollout`: ``torch.ops.rollout_fast.rollout_triton`` / ``fused_layers_triton`` (same arguments and
  results as the compiled ``rollout`` / ``fused_layers``);
- :mod:`.gather`: ``torch.ops.rollout_fast.topk_gather_triton`` (as the compiled ``topk_gather``);
- :mod:`.attention`: the kernel of ``torch.ops.rollout_fast.fused_attention`` (a ``triton_op`` on GPUs).

Importing a kernel module imports Triton, so this package imports them only on first use. The kernels run
compiled on CUDA tensors, or in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set
before that first use (slow; for tests). Each op is a ``torch.library.triton_op`` where its kernels are
compiled and an opaque ``custom_op`` where they are interpreted; fakes and autograd formulas live in
:mod:`rollout_fast.ops.meta`.
"""

from __future__ import annotations

__all__ = ["interpreted"]


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1``; imports them)."""
    from . import rollout

    return rollout.INTERPRETED
