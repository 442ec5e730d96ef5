"""Loading of the compiled extension ``rollout_fast._C`` and the fake kernels of its custom ops.

The shared library registers, when loaded, the custom ops (schemas in ``csrc/rollout_cpu.cpp``):

``torch.ops.rollout_fast.rollout(attentions, head_fusion, discard_ratio, num_prefix_tokens,
protect_prefix, readout, normalize) -> Tensor``
    attentions ``(L, B, H, N, N)`` float16|bfloat16|float32|float64 (CPU, or CUDA when built with
    CUDA); returns float32 ``(B, N - P)`` normalised maps for readout 'cls'/'mean' (the caller
    reshapes to the patch grid), or ``(B, N, N)`` for 'full'.
``torch.ops.rollout_fast.fused_layers(attentions, head_fusion, discard_ratio, protect_first) -> Tensor``
    float32 ``(L, B, N, N)``: the per-layer ``M_l = (discard(F_l) + I) / rowsum`` (steps 1-3).

Both raise ``RuntimeError`` on a bad shape, dtype, device, ratio or mode (the public op validates
with friendlier messages first). The C++ library names this module as its Python module
(``set_python_module``), so torch imports it, and with it the fake kernels below, whenever it needs
them (torch.compile, FakeTensorMode, ``torch.library.opcheck``).
"""

from __future__ import annotations

import torch

__all__ = ["load", "loaded", "load_error", "cuda_built"]

_REBUILD_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` (torch must be "
    "installed first, a C++ compiler on PATH, and ROLLOUT_FAST_NO_EXT unset), or use "
    "backend='reference'; `python -m rollout_fast.info` lists the backends this install has")

_state: dict = {"module": None, "error": None, "tried": False}


def _register_fakes() -> None:
    @torch.library.register_fake("rollout_fast::rollout")
    def _rollout_fake(attentions, head_fusion, discard_ratio, num_prefix_tokens, protect_prefix, readout,
                      normalize):
        torch._check(attentions.dim() == 5, lambda: "rollout_fast: attentions must be (L, B, H, N, N)")
        _, B, _, N, _ = attentions.shape
        if readout == "full":
            return attentions.new_empty((B, N, N), dtype=torch.float32)
        return attentions.new_empty((B, N - num_prefix_tokens), dtype=torch.float32)

    @torch.library.register_fake("rollout_fast::fused_layers")
    def _fused_layers_fake(attentions, head_fusion, discard_ratio, protect_first):
        torch._check(attentions.dim() == 5, lambda: "rollout_fast: attentions must be (L, B, H, N, N)")
        L, B, _, N, _ = attentions.shape
        return attentions.new_empty((L, B, N, N), dtype=torch.float32)


def load():
    """Import ``rollout_fast._C`` once (registering the ops and their fakes); the module or None."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from .. import _C
        except ImportError as e:  # not built, or built against another torch
            _state["error"] = f"{type(e).__name__}: {e}"
        else:
            _register_fakes()
            _state["module"] = _C
    return _state["module"]


def loaded() -> bool:
    """True when the compiled extension is importable (the 'cpu' backend is available)."""
    return load() is not None


def load_error() -> str:
    """Why the extension is unavailable, with what to do about it ('' when it loaded)."""
    if load() is not None:
        return ""
    return f"rollout_fast._C could not be imported ({_state['error']}); {_REBUILD_HINT}"


def require():
    """The loaded extension module; ``RuntimeError`` with :func:`load_error`'s advice otherwise."""
    module = load()
    if module is None:
        raise RuntimeError(load_error())
    return module


def cuda_built() -> bool:
    """True when the extension holds the CUDA kernels (built where a CUDA toolkit was found)."""
    module = load()
    return bool(module is not None and module.cuda_built())


# Importing this module loads the extension: torch imports it (set_python_module) when it needs the
# fakes, and the backends import it right before they use the ops.
load()
