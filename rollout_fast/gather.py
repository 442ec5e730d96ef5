"""Fused top-k token gather: keep the prefix tokens and the k best-scored patch tokens of each sample.

``kept, indices = topk_gather(tokens, scores, k, num_prefix_tokens=P)`` is what
:func:`rollout_fast.prune_tokens` runs between a ViT's position embedding and its blocks. It replaces
``torch.topk`` + ``torch.sort`` + ``torch.gather`` + ``torch.cat`` (four launches, EViT/DynamicViT's
batch-1 overhead, REFERENCE.md section 6) with one op.

Semantics (every backend and :func:`topk_gather_reference` follow them exactly):

- ``tokens``: ``(B, N, D)`` float16|bfloat16|float32|float64, the token sequence with ``P`` prefix tokens
  (class, distillation, register) first and ``G = N - P`` patch tokens after them.
- ``scores``: ``(B, G)`` floating point, one score per patch token (larger = keep); compared in float32.
- Selection: the ``k`` patches with the largest scores, ``1 <= k <= G``. Ties: the LOWER patch index
  wins. ``-0.0`` equals ``+0.0``. NaN would order by its bit pattern in the op; :func:`topk_gather`
  rejects non-finite scores.
- Result: ``kept`` ``(B, P + k, D)`` in the tokens' dtype (contiguous): the P prefix tokens unchanged,
  then the kept patch tokens in ascending patch order (so ``k = G`` returns the input unchanged);
  ``indices`` ``(B, k)`` int64, the kept patch indices in ``[0, G)``, ascending.

Backends ("auto" picks the first available for the tensors' device):

- "cpu": ``torch.ops.rollout_fast.topk_gather`` from the compiled extension (csrc/gather_cpu.cpp);
- "cuda": the same op on CUDA tensors (csrc/gather_cuda.cu, one block per sample);
- "triton": ``torch.ops.rollout_fast.topk_gather_triton`` (:mod:`rollout_fast.triton.gather`), on CUDA
  tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests; "auto" never picks it there);
- "reference": :func:`topk_gather_reference` (``torch.topk`` + ``torch.gather``), always available.

Source: the token selection of EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022) and
DynamicViT (Rao et al., NeurIPS 2021), applied once before the blocks as in the seeds' experiment.
"""

from __future__ import annotations

import importlib.util

import torch

from .kernels import backends as _kb

__all__ = ["GATHER_BACKENDS", "available_gather_backends", "score_keys", "topk_gather", "topk_gather_reference"]

GATHER_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_state = {"fakes": False}
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: topk_gather is a hot path


# ------------------------------------------------------------------------------------------- reference
def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, G)`` keys that order like float32 ``scores`` with ties broken by lower index.

    ``key = s * 2**32 + (2**32 - 1 - i)`` with ``s`` the signed 32-bit order key of the float32 score
    (``-0`` mapped to ``+0``; csrc/gather_common.h's order): keys are distinct, a larger score gives a
    larger key, and among equal scores the lower index ``i`` gives the larger key.
    """
    s = scores.to(torch.float32)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0 -> +0
    bits = s.view(torch.int32).to(torch.int64)
    signed = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving signed key (two's complement)
    idx = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return signed * (1 << 32) + ((1 << 32) - 1 - idx)


def topk_gather_reference(tokens: torch.Tensor, scores: torch.Tensor, k: int,
                          num_prefix_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`topk_gather` in plain PyTorch: ``torch.topk`` + ``torch.gather``.

    ``torch.topk`` runs on :func:`score_keys` (distinct keys, so its own tie order never matters), the
    winners are sorted by index and gathered after the prefix tokens. Shapes, dtypes and the tie rule:
    see the module docstring. No validation beyond what torch does (use :func:`topk_gather`).
    """
    P = int(num_prefix_tokens)
    _, idx = torch.topk(score_keys(scores), int(k), dim=1, largest=True, sorted=False)
    idx = idx.sort(dim=1).values
    patches = tokens[:, P:]
    kept = torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :P], kept], dim=1).contiguous(), idx


# ------------------------------------------------------------------------------------- compiled op
def _register_fakes() -> None:
    """Fake (meta) kernel of ``rollout_fast::topk_gather``; run once, after ``_ext.load()``."""
    if _state["fakes"]:
        return
    _state["fakes"] = True

    @torch.library.register_fake("rollout_fast::topk_gather")
    def _topk_gather_fake(tokens, scores, k, num_prefix_tokens):
        torch._check(tokens.dim() == 3, lambda: "rollout_fast::topk_gather: tokens must be (B, N, D)")
        B, _, D = tokens.shape
        return (tokens.new_empty((B, num_prefix_tokens + k, D)),
                scores.new_empty((B, k), dtype=torch.int64))

    torch.library.register_autograd("rollout_fast::topk_gather", gather_backward,
                                    setup_context=gather_setup_context)


# Autograd of the gather ops (the compiled rollout_fast::topk_gather and the Triton topk_gather_triton):
# the kept tokens' gradient goes back to the tokens they came from, 0 for the dropped ones; none to scores.
def gather_setup_context(ctx, inputs, output):
    tokens, _, _, P = inputs
    ctx.shape, ctx.P = tokens.shape, P
    ctx.save_for_backward(output[1])


def gather_backward(ctx, grad_kept, grad_indices):
    (idx,) = ctx.saved_tensors
    return _scatter_back(grad_kept, idx, ctx.shape, ctx.P), None, None, None


def _scatter_back(grad_kept: torch.Tensor, idx: torch.Tensor, shape, P: int) -> torch.Tensor:
    """Gradient of the gather: ``grad_kept`` (B, P + k, D) back to the tokens' (B, N, D); 0 for dropped tokens."""
    grad = grad_kept.new_zeros(shape)
    grad[:, :P] = grad_kept[:, :P]
    grad[:, P:].scatter_(1, idx.unsqueeze(-1).expand(-1, -1, shape[-1]), grad_kept[:, P:])
    return grad


def _op_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("rollout_fast::topk_gather", "")
    except RuntimeError:
        return False
    return True


def load() -> bool:
    """Load the compiled extension (``rollout_fast.kernels._ext.load()``) and register the fake kernel of
    ``rollout_fast::topk_gather``; True when the compiled op exists (an extension built before this op was
    added has none: rebuild with ``pip install --no-build-isolation -e .``)."""
    from .kernels import _ext

    if _ext.load() is None or not _op_defined():
        return False
    _register_fakes()
    return True


def _triton_supports(device: torch.device) -> bool:
    return _HAS_TRITON and _kb.triton_supports(device)


def _cuda_built() -> bool:
    from .kernels import _ext

    return load() and _ext.cuda_built()


def available_gather_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends of :func:`topk_gather` that run on ``device`` in this install (always 'reference')."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu" and load():
        out.append("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and _cuda_built():
        out.append("cuda")
    if _triton_supports(device):
        out.append("triton")
    return out


def _pick(backend: str, device: torch.device) -> str:
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"backend: expected one of {GATHER_BACKENDS}, got {backend!r}")
    avail = available_gather_backends(device)
    if backend == "auto":  # never the Triton interpreter on CPU tensors: it is for tests
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(b for b in order if b in avail)
    if backend not in avail:
        raise ValueError(f"backend: {backend!r} is not available for {device.type} tensors in this install; "
                         f"available: {avail}")
    return backend


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
        lower index wins (module docstring).

    Raises:
        TypeError: non-float tokens or scores, non-int ``k``/``num_prefix_tokens``.
        ValueError: wrong shapes, ``k`` outside ``[1, G]``, ``P`` outside ``[0, N)``, non-finite scores,
            tensors on different devices, an unknown or unavailable backend.
    """
    _check(tokens, scores, k, num_prefix_tokens)
    name = _pick(backend, tokens.device)
    s = scores.to(torch.float32)
    if name == "reference":
        return topk_gather_reference(tokens, s, k, num_prefix_tokens)
    if name == "triton":
        from .triton import gather as tg

        return tg.topk_gather_triton(tokens, s, k, num_prefix_tokens)
    return torch.ops.rollout_fast.topk_gather(tokens, s, k, num_prefix_tokens)


# torch imports this module (the C++ library's set_python_module) when it needs the fake kernel.
load()
