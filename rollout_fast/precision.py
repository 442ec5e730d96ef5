"""Reduced-precision inference of a small network (a pruning student) inside a float32 pipeline.

A student that scores tokens only has to rank them: running it under bfloat16 autocast (``torch.autocast``;
convolutions and matrix products in bfloat16, reductions and the output in float32) halves its cost on CPUs with
AVX512-BF16 / AMX and on GPUs, while the model it prunes keeps its own precision. The ranking can change where
two scores are closer than bfloat16's resolution (8 bits of mantissa), so the pruned model's accuracy is measured
again with it (``prune-eval --student-precision bf16``), not assumed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PRECISIONS", "AutocastModule", "with_precision"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastModule(nn.Module):
    """``module`` run under ``torch.autocast(device_type, dtype)``, its floating-point outputs cast back to float32.

    Args:
        module: any module (e.g. a :class:`rollout_fast.students.RolloutStudent`); its attributes (``grid``,
            ``thumbnail_size``, ...) stay readable through the wrapper.
        dtype: ``torch.bfloat16`` or ``torch.float16``.

    ``forward(x)``: ``module(x)`` with the same shapes, float32. The device type comes from the input tensor.

    Raises:
        TypeError: ``module`` is not an nn.Module.
        ValueError: ``dtype`` is not bfloat16 / float16.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype}")
        self.module = module
        self.dtype = dtype

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.module(x, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.float() if out.is_floating_point() else out
        if isinstance(out, (tuple, list)):
            return type(out)(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return out

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


def with_precision(module, precision: str):
    """``module`` as is for ``'fp32'``, else wrapped in :class:`AutocastModule` (``'bf16'``, ``'fp16'``).

    Raises:
        ValueError: ``precision`` not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return module if dtype is None or module is None else AutocastModule(module, dtype)
