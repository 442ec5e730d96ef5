"""The fused rollout backends that :mod:`rollout_fast.ops` registers: "cpu", "cuda" and "triton".

Each backend is three callables, the registry's calling convention: ``available() -> bool`` (cheap,
imports nothing heavy until first asked), ``supports(device) -> bool``, and ``run(args) -> Tensor``
taking the :class:`rollout_fast.reference.RolloutArgs` that ``ops.attention_rollout`` validated.
``run`` returns float32 ``(B, gh, gw)`` maps, or ``(B, N, N)`` for readout 'full', on the input's
device, with the semantics of :func:`rollout_fast.reference.attention_rollout`.

- "cpu" / "cuda": ``torch.ops.rollout_fast.rollout`` from the compiled extension ``rollout_fast._C``
  (C++ kernel on CPU tensors, CUDA kernels on CUDA tensors; ``csrc/``).
- "triton": ``torch.ops.rollout_fast.rollout_triton`` (:mod:`rollout_fast.triton`), on CUDA tensors,
  or on CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..reference import RolloutArgs

__all__ = ["cpu_available", "cuda_available", "triton_available", "triton_supports", "run_compiled",
           "run_triton"]


def _ext():
    from . import _ext

    return _ext


def cpu_available() -> bool:
    """The compiled extension imports (its C++ CPU kernel is always built with it)."""
    return _ext().loaded()


def cuda_available() -> bool:
    """The extension was built with CUDA and a CUDA device is visible."""
    return torch.cuda.is_available() and _ext().cuda_built()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    """Triton is installed and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpret()


def triton_supports(device: torch.device) -> bool:
    """CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` with interpreted kernels."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not _interpret():
        return False
    from .. import triton as rt  # decides the kernels' mode on first import

    return rt.interpreted()


def _finish(out: torch.Tensor, args: RolloutArgs) -> torch.Tensor:
    if args.readout == "full":
        return out
    return out.reshape(out.shape[0], *args.grid)


def run_compiled(args: RolloutArgs) -> torch.Tensor:
    """Rollout with the C++/CUDA kernels of ``rollout_fast._C`` (the tensor's device picks which).

    Raises:
        ValueError: NaN or infinite attention values (the CPU kernel checks during its single read,
            so the caller may skip ``check_rollout_args``' separate finiteness pass for this backend).
        RuntimeError: the extension is not built (the message says how to build it), or a CUDA
            launch failed.
    """
    _ext().require()
    try:
        out = torch.ops.rollout_fast.rollout(args.attentions, args.head_fusion, args.discard_ratio,
                                             args.num_prefix_tokens, args.protect_prefix, args.readout,
                                             args.normalize)
    except RuntimeError as e:  # the CPU kernel checks finiteness during its one read of the input
        if "NaN or infinite" in str(e):
            raise ValueError("attentions: contains NaN or infinite values") from None
        raise
    return _finish(out, args)


def run_triton(args: RolloutArgs) -> torch.Tensor:
    """Rollout with the Triton kernels of :mod:`rollout_fast.triton`."""
    from .. import triton as rt

    out = rt.rollout_triton(args.attentions, args.head_fusion, args.discard_ratio, args.num_prefix_tokens,
                            args.protect_prefix, args.readout, args.normalize)
    return _finish(out, args)
