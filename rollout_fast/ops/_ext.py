"""Loading of the compiled extension ``rollout_fast._C`` (private; only :mod:`rollout_fast.ops` imports it).

The shared library registers, when loaded, the custom ops whose schemas are in ``csrc/ops.cpp``
(bodies: ``csrc/cpu/``, and ``csrc/cuda/`` when built with CUDA):

``torch.ops.rollout_fast.rollout(attentions, head_fusion, discard_ratio, num_prefix_tokens,
protect_prefix, readout, normalize) -> Tensor``
    attentions ``(L, B, H, N, N)`` float16|bfloat16|float32|float64; returns float32 ``(B, N - P)``
    normalised maps for readout 'cls'/'mean' (the caller reshapes to the patch grid), or ``(B, N, N)``
    for 'full'.
``torch.ops.rollout_fast.fused_layers(attentions, head_fusion, discard_ratio, protect_first) -> Tensor``
    float32 ``(L, B, N, N)``: the per-layer ``M_l = (discard(F_l) + I) / rowsum`` (steps 1-3).
``torch.ops.rollout_fast.topk_gather(tokens, scores, k, num_prefix_tokens) -> (Tensor, Tensor)``
    the fused top-k token gather (:mod:`rollout_fast.reference.gather`).

They raise ``RuntimeError`` on a bad shape, dtype, device or mode (the public ops validate with
friendlier messages first). The C++ library names :mod:`rollout_fast.ops.meta` as its Python module
(``set_python_module``), so torch imports the fake kernels whenever it needs them (torch.compile,
FakeTensorMode, ``torch.library.opcheck``). The module itself reports ``cuda_built()`` and ``cpu_isa()``.
"""

from __future__ import annotations

__all__ = ["cuda_built", "load", "load_error", "loaded", "require"]

_REBUILD_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` (torch must be "
    "installed first, a C++ compiler on PATH, and ROLLOUT_FAST_NO_EXT unset), or use "
    "backend='reference'; `python -m rollout_fast.info` lists the backends this install has")

_state: dict = {"module": None, "error": None, "tried": False}


def load():
    """Import ``rollout_fast._C`` once (registering its ops); the module, or None when it cannot load."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from .. import _C
        except ImportError as e:  # not built, or built against another torch
            _state["error"] = f"{type(e).__name__}: {e}"
        else:
            _state["module"] = _C
    return _state["module"]


def loaded() -> bool:
    """True when the compiled extension is importable (the 'cpu' backends are available)."""
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
