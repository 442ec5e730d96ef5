"""Fused top-k token gather: keep the prefix tokens and the k best-scored patch tokens of each sample.

``kept, indices = topk_gather(tokens, scores, k, num_prefix_tokens=P)`` is what
:func:`rollout_fast.prune_tokens` runs between a ViT's position embedding and its blocks. It replaces
``torch.topk`` + ``torch.sort`` + ``torch.gather`` + ``torch.cat`` (four launches, EViT/DynamicViT's
batch-1 overhead, REFERENCE.md section 6) with one op. Semantics: :mod:`rollout_fast.reference.gather`,
which every backend follows exactly.

Backends of the op "topk_gather" (:mod:`rollout_fast.ops.registry`; "auto" picks the first available for
the tensors' device):

- "cpu": ``torch.ops.rollout_fast.topk_gather`` from the compiled extension (csrc/cpu/gather_cpu.cpp);
- "cuda": the same op on CUDA tensors (csrc/cuda/gather_cuda.cu, one block per sample);
- "triton": ``torch.ops.rollout_fast.topk_gather_triton`` (:mod:`rollout_fast.triton.gather`), on CUDA
  tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests; "auto" never picks it there);
- "reference": :func:`rollout_fast.reference.topk_gather_reference` (``torch.topk`` + ``torch.gather``).

Source: the token selection of EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022) and
DynamicViT (Rao et al., NeurIPS 2021), applied once before the blocks as in the seeds' experiment.
"""

from __future__ import annotations

import torch

from ..reference.gather import score_keys, topk_gather_reference
from . import _ext, meta, registry
from .registry import Backend

__all__ = ["GATHER_BACKENDS", "available_gather_backends", "score_keys", "topk_gather", "topk_gather_reference"]

GATHER_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_OP = "topk_gather"
_TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -------------------------------------------------------------------------------------------- backends
def _op_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("rollout_fast::topk_gather", "")
    except RuntimeError:
        return False
    return True


def load() -> bool:
    """Load the compiled extension (its fakes and autograd registered); True when the compiled
    ``rollout_fast::topk_gather`` exists (an extension built before this op was added has none: rebuild
    with ``pip install --no-build-isolation -e .``)."""
    return meta.load_compiled() is not None and _op_defined()


def cuda_built() -> bool:
    """The compiled op exists and the extension holds its CUDA kernel."""
    return load() and _ext.cuda_built()


def triton_ops():
    """:mod:`rollout_fast.triton.gather` (imports Triton on first call), its fake and autograd registered."""
    from ..triton import gather as tg

    meta.register_triton_gather(tg.INTERPRETED)
    return tg


def _run_reference(tokens, scores, k, P):
    return topk_gather_reference(tokens, scores, k, P)


def _run_compiled(tokens, scores, k, P):
    return torch.ops.rollout_fast.topk_gather(tokens, scores, k, P)


def _run_triton(tokens, scores, k, P):
    return triton_ops().topk_gather_triton(tokens, scores, k, P)


registry.register(_OP, "reference", Backend(lambda: True, lambda device: True, _run_reference))
registry.register(_OP, "cpu", Backend(load, lambda device: device.type == "cpu", _run_compiled))
registry.register(_OP, "cuda", Backend(lambda: torch.cuda.is_available() and cuda_built(),
                                       lambda device: device.type == "cuda", _run_compiled))
registry.register(_OP, "triton", Backend(registry.triton_usable, registry.triton_usable, _run_triton))


# ------------------------------------------------------------------------------------------ public op
def available_gather_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends of :func:`topk_gather` that run on ``device`` in this install (always 'reference')."""
    return registry.available(_OP, device)


def _pick(backend: str, device: torch.device) -> Backend:
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"backend: expected one of {GATHER_BACKENDS}, got {backend!r}")
    found = registry.pick(_OP, backend, device)
    if found is None:
        raise ValueError(f"backend: {backend!r} is not available for {device.type} tensors in this install; "
                         f"available: {available_gather_backends(device)}")
    return found[1]


def _check(tokens, scores, k, num_prefix_tokens) -> tuple[int, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError("tokens: expected a (B, N, D) tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if tokens.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"tokens: expected float16, bfloat16, float32 or float64, got {tokens.dtype}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens: expected an int, got {num_prefix_tokens!r}")
    B, N, _ = tokens.shape
    P = num_prefix_tokens
    if not 0 <= P < N:
        raise ValueError(f"num_prefix_tokens: expected 0 <= P < N = {N}, got {P}")
    G = N - P
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores: expected a floating-point (B, G) tensor, got "
                        f"{scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if tuple(scores.shape) != (B, G):
        raise ValueError(f"scores: expected shape (B, N - P) = ({B}, {G}), got {tuple(scores.shape)}")
    if scores.device != tokens.device:
        raise ValueError(f"scores: on {scores.device}, tokens on {tokens.device}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {k!r}")
    if not 1 <= k <= G:
        raise ValueError(f"k: expected 1 <= k <= G = {G}, got {k}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contains NaN or infinite values")
    return P, G


def topk_gather(tokens: torch.Tensor, scores: torch.Tensor, k: int, num_prefix_tokens: int = 1, *,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the ``k`` highest-scored patch tokens of each sample (one fused op).

    Args:
        tokens: ``(B, N, D)`` float16|bfloat16|float32|float64, prefix tokens first.
        scores: ``(B, N - P)`` floating point on the tokens' device; compared in float32.
        k: patch tokens to keep, ``1 <= k <= N - P``.
        num_prefix_tokens: ``P``, ``0 <= P < N``.
        backend: 'auto' | 'reference' | 'cpu' | 'cuda' | 'triton' (see :func:`available_gather_backends`).

    Returns:
        ``(kept, indices)``: ``kept`` ``(B, P + k, D)`` in the tokens' dtype, prefix tokens then the kept
        patches in ascending patch order; ``indices`` int64 ``(B, k)`` ascending patch indices. Ties: the
        lower index wins (:mod:`rollout_fast.reference.gather`).

    Raises:
        TypeError: non-float tokens or scores, non-int ``k``/``num_prefix_tokens``.
        ValueError: wrong shapes, ``k`` outside ``[1, G]``, ``P`` outside ``[0, N)``, non-finite scores,
            tensors on different devices, an unknown or unavailable backend.
    """
    _check(tokens, scores, k, num_prefix_tokens)
    run = _pick(backend, tokens.device).run
    return run(tokens, scores.to(torch.float32), k, num_prefix_tokens)
