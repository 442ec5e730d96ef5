"""Triton kernels of the fused attention rollout (private; use :func:`rollout_fast.attention_rollout`).

:mod:`.rollout` defines the custom ops ``torch.ops.rollout_fast.rollout_triton`` and
``fused_layers_triton`` (same arguments and results as the compiled ``rollout`` / ``fused_layers``
ops of :mod:`rollout_fast.kernels._ext`). Importing it imports Triton, so this package imports it
only on first use. The kernels run compiled on CUDA tensors, or in Triton's interpreter on CPU
tensors when ``TRITON_INTERPRET=1`` is set before that first use (slow; for tests).
"""

from __future__ import annotations

__all__ = ["rollout_triton", "fused_layers_triton", "interpreted"]


def _module():
    from . import rollout

    return rollout


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return _module().INTERPRETED


def rollout_triton(*args, **kwargs):
    """``torch.ops.rollout_fast.rollout_triton``; see :func:`rollout_fast.triton.rollout.rollout_triton`."""
    return _module().rollout_triton(*args, **kwargs)


def fused_layers_triton(*args, **kwargs):
    """``torch.ops.rollout_fast.fused_layers_triton``; see :mod:`rollout_fast.triton.rollout`."""
    return _module().fused_layers_triton(*args, **kwargs)
