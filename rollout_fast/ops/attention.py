"""Attention that also returns its head-fused probability matrix, without keeping per-head probabilities.

For rollout, a block's attention is needed only head-fused (section 1 of REFERENCE.md, step 1):
``F[b] = mean | max | min over heads h of softmax(q[b, h] k[b, h]^T * scale + mask[b, h])``, shape
(B, Nq, Nk), H times smaller than the per-head attention; ``mask`` is SDPA's optional ``attn_mask`` (a
relative-position bias, a padding mask) in additive form. :func:`fused_attention` computes the attention
output ``O = softmax(q k^T * scale + mask) v`` (what ``F.scaled_dot_product_attention`` returns) with F
(specification: :func:`rollout_fast.reference.fused_attention_reference`), so the capture in
:mod:`rollout_fast.capture` can stand in for SDPA and rollout costs about one forward pass.

The registered op ``torch.ops.rollout_fast.fused_attention(q, k, v, fused, scale, head_fusion,
chunk_bytes, mask=None) -> out`` (``mask``: float32 additive, (B, H, Nq, Nk) or a broadcast view of it) writes F into ``fused`` (so the capture fills one preallocated (L, B, 1, N, N)
buffer) and returns O. torch.compile and ``torch.library.opcheck`` see it like any op (fake kernel:
:mod:`rollout_fast.ops.meta`). Its kernels, also the backends "triton" and "chunked" of the op
"fused_attention" in :mod:`rollout_fast.ops.registry`:

- "triton" (GPU): one Triton kernel, flash-attention style (:mod:`rollout_fast.triton.attention`; the op
  is a ``triton_op`` there). Runs compiled on CUDA tensors, or in Triton's interpreter on CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the kernel's first use (slow; for tests).
- "chunked" (CPU, or any device without Triton): plain PyTorch over chunks of the batch: per-head float32
  logits and probabilities exist for one chunk at a time (``chunk_bytes`` each, default 1 MiB, at least
  one sample; cache-sized chunks are also the fastest on the CPU), never for the whole (B, H, Nq, Nk).

Both compute the logits and softmax in float32 from the given q, k (float16 / bfloat16 / float32),
multiply the probabilities (cast to v's dtype, as flash attention does) by v with float32
accumulation, and return ``O`` in q's dtype. ``O`` equals SDPA's output within the dtype's tolerance.
"""

import math

import torch

from ..reference import HEAD_FUSIONS
from ..reference.attention import additive_mask, attention_probs, fuse_probs
from . import meta, registry
from .registry import Backend

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "IMPLS",
    "check_mask",
    "check_qkv",
    "fused_attention",
    "fused_attention_chunked",
    "fused_attention_triton",
    "fused_probs_chunked",
    "resolve_impl",
]

DEFAULT_CHUNK_BYTES = 1 << 20  # per-head float32 probabilities held at once (cache-sized: fastest on CPU)
IMPLS = ("auto", "triton", "chunked")
_OP = "fused_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- validation
def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_fusion: str,
              scale: float | None) -> float:
    """Validate q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) and return the softmax scale.

    Raises:
        TypeError: not tensors, or a dtype other than float16/bfloat16/float32, or mixed dtypes.
        ValueError: wrong ranks or mismatched shapes/devices, an empty dimension, unknown
            ``head_fusion``, a non-positive or non-finite ``scale``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape (B, H, N, D), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name}: empty dimension in shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not "
                         "form (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv)")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")
    return float(scale)


def check_mask(attn_mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` validated and made float32 additive, expanded to (B, H, Nq, Nk) (a view where it
    broadcasts); None stays None.

    Raises:
        TypeError: not a tensor, or neither bool nor floating point.
        ValueError: not broadcastable to (B, H, Nq, Nk), or on another device than q.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected a bool or floating-point tensor, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask: on {attn_mask.device}, q on {q.device}")
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Nq, Nk) = {shape}")
    return additive_mask(attn_mask, shape)


def _fused_buffer(q: torch.Tensor, k: torch.Tensor, fused_out: torch.Tensor | None) -> torch.Tensor:
    shape = (q.shape[0], q.shape[2], k.shape[2])
    if fused_out is None:
        return torch.empty(shape, dtype=torch.float32, device=q.device)
    if not isinstance(fused_out, torch.Tensor) or tuple(fused_out.shape) != shape \
            or fused_out.dtype != torch.float32 or fused_out.device != q.device or not fused_out.is_contiguous():
        raise ValueError(f"fused_out: expected a contiguous float32 tensor of shape {shape} on {q.device}, got "
                         + (f"{fused_out.dtype} {tuple(fused_out.shape)} on {fused_out.device}"
                            if isinstance(fused_out, torch.Tensor) else type(fused_out).__name__))
    return fused_out


def _check_chunk_bytes(chunk_bytes) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")


def _chunk(B: int, per_sample_bytes: int, chunk_bytes: int) -> int:
    return max(1, min(B, chunk_bytes // max(1, per_sample_bytes)))


# ---------------------------------------------------------------------------------- "chunked" kernel
def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    return attention_probs(q, k, scale, mask)


def _chunked_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: torch.Tensor, scale: float,
                  head_fusion: str, chunk_bytes: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The op's PyTorch kernel (arguments already validated; ``mask`` float32 additive, broadcastable to
    (B, H, Nq, Nk)): F into ``fused``, O returned."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    step = _chunk(B, H * Nq * Nk * 4, chunk_bytes)
    # O stored as (B, Nq, H, Dv), returned as its (B, H, Nq, Dv) view: timm's following
    # x.transpose(1, 2).reshape(B, N, C) is then free
    store = torch.empty((B, Nq, H, v.shape[-1]), dtype=q.dtype, device=q.device)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        probs = _probs(q[b0:b1], k[b0:b1], scale, None if mask is None else _rows(mask, q, k)[b0:b1])
        fuse_probs(probs, head_fusion, out=fused[b0:b1])
        vc = v[b0:b1]
        o = torch.matmul(probs if vc.dtype == torch.float32 else probs.to(vc.dtype), vc)
        store[b0:b1].copy_(o.transpose(1, 2))
    return store.transpose(1, 2)


def _rows(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


# ---------------------------------------------------------------------------------- the registered op
def _define_op():
    """``rollout_fast::fused_attention``: a ``triton_op`` (Triton on CUDA, the chunked kernel elsewhere) where
    a GPU and compiled Triton kernels exist, else an opaque custom op running the chunked kernel."""
    if torch.cuda.is_available() and registry.triton_installed() and not registry.triton_interpret():
        from ..triton import attention as ta

        op, is_triton_op = ta.define_op(_chunked_into), True
    else:
        op = torch.library.custom_op("rollout_fast::fused_attention", _chunked_into, mutates_args=("fused",))
        is_triton_op = False
    meta.register_fused_attention(is_triton_op)
    return op, is_triton_op


_fused_attention_op, _OP_IS_TRITON = _define_op()


def _triton():
    from ..triton import attention as ta

    return ta


def _run_triton(q, k, v, fused, scale, head_fusion, chunk_bytes, mask=None, block_m=None, block_n=None):
    if _OP_IS_TRITON and q.device.type == "cuda" and block_m is None and block_n is None:
        return torch.ops.rollout_fast.fused_attention(q, k, v, fused, scale, head_fusion, chunk_bytes, mask)
    return _triton().launch(q, k, v, fused, scale, head_fusion, block_m, block_n, mask=mask)


def _run_chunked(q, k, v, fused, scale, head_fusion, chunk_bytes, mask=None):
    if q.device.type == "cpu" or not _OP_IS_TRITON:  # the op's kernel there is the chunked one
        return torch.ops.rollout_fast.fused_attention(q, k, v, fused, scale, head_fusion, chunk_bytes, mask)
    return _chunked_into(q, k, v, fused, scale, head_fusion, chunk_bytes, mask)


registry.register(_OP, "triton", Backend(registry.triton_usable, registry.triton_usable, _run_triton))
registry.register(_OP, "chunked", Backend(lambda: True, lambda device: True, _run_chunked))


# ---------------------------------------------------------------------------------------- public API
def resolve_impl(impl: str, device: torch.device | str) -> str | None:
    """The backend ('triton' | 'chunked') that ``impl`` means for tensors on ``device``: 'auto' is Triton on
    CUDA where it can run, else chunked; None when ``impl`` cannot run there.

    Raises:
        ValueError: ``impl`` not one of :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected 'auto', 'triton' or 'chunked', got {impl!r}")
    found = registry.pick(_OP, impl, torch.device(device))
    return None if found is None else found[0]


def fused_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                            head_fusion: str = "mean", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            fused_out: torch.Tensor | None = None,
                            attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and head-fused attention in PyTorch, over chunks of the batch.

    Args:
        q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); float16|bfloat16|float32, any strides,
            one device (any).
        scale: softmax scale; None: ``D ** -0.5`` (SDPA's default).
        head_fusion: 'mean' | 'max' | 'min' over heads.
        chunk_bytes: upper bound of the per-head float32 probabilities held at once (at least one
            sample's ``H * Nq * Nk * 4`` bytes).
        fused_out: optional contiguous float32 (B, Nq, Nk) tensor to write ``fused`` into (e.g. one layer
            of a preallocated (L, B, 1, N, N) buffer), returned as ``fused``.
        attn_mask: None, or SDPA's ``attn_mask``: bool (True = take part) or float (added to the scaled
            logits, e.g. a relative-position bias), broadcastable to (B, H, Nq, Nk).

    Returns:
        ``(out, fused)``: ``out`` (B, H, Nq, Dv) in q's dtype (memory laid out as (B, Nq, H, Dv)),
        equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)`` within the
        dtype's tolerance; ``fused`` float32 (B, Nq, Nk), rows sum to 1 for 'mean'.

    Raises:
        TypeError, ValueError: see :func:`check_qkv` and :func:`check_mask`; a bad ``chunk_bytes`` or
            ``fused_out``.
    """
    return fused_attention(q, k, v, scale=scale, head_fusion=head_fusion, impl="chunked",
                           chunk_bytes=chunk_bytes, fused_out=fused_out, attn_mask=attn_mask)


def fused_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                           head_fusion: str = "mean", block_m: int | None = None, block_n: int | None = None,
                           fused_out: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and head-fused attention in one Triton kernel (per-head probabilities stay in
    registers).

    Args: as :func:`fused_attention_chunked` (``fused_out``, ``attn_mask`` too: the mask is one load and add
    per tile); ``block_m``/``block_n`` override the
    tile sizes (``block_n`` given forces the two-pass schedule; powers of two >= 16).

    Returns:
        ``(out, fused)`` as :func:`fused_attention_chunked`.

    Raises:
        TypeError, ValueError: see :func:`check_qkv`; tensors on a device the kernel cannot run on
            (CPU without ``TRITON_INTERPRET=1``).
    """
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (not isinstance(blk, int) or blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name}: expected a power of two >= 16, got {blk!r}")
    return fused_attention(q, k, v, scale=scale, head_fusion=head_fusion, impl="triton", fused_out=fused_out,
                           attn_mask=attn_mask, _blocks=(block_m, block_n))


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    head_fusion: str = "mean", impl: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    fused_out: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                    _blocks=(None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale + mask) v, head-fused softmax(q k^T * scale + mask))``: the best kernel for
    the device.

    ``impl``: 'auto' (Triton on CUDA when available, else chunked PyTorch), 'triton' or 'chunked'.
    Shapes, dtypes, results, ``chunk_bytes`` (chunked kernel only), ``fused_out``, ``attn_mask`` and errors
    as :func:`fused_attention_chunked`; 'triton' where the kernel cannot run raises ValueError.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected 'auto', 'triton' or 'chunked', got {impl!r}")
    scale = check_qkv(q, k, v, head_fusion, scale)
    _check_chunk_bytes(chunk_bytes)
    name = resolve_impl(impl, q.device)
    if name is None:
        raise ValueError(f"q: the Triton kernel does not run on {q.device.type} tensors here (CUDA, or the "
                         "CPU with TRITON_INTERPRET=1 set before first use)")
    fused = _fused_buffer(q, k, fused_out)
    mask = check_mask(attn_mask, q, k)
    if name == "triton":
        out = _run_triton(q, k, v, fused, scale, head_fusion, chunk_bytes, mask, *_blocks)
    else:
        out = _run_chunked(q, k, v, fused, scale, head_fusion, chunk_bytes, mask)
    return out, fused


def fused_probs_chunked(q: torch.Tensor, k: torch.Tensor, *, scale: float, head_fusion: str | None = "mean",
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        fused_out: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` in float32, head-fused over chunks of the batch (``attn_mask``:
    None or SDPA's, see :func:`check_mask`).

    q (B, H, Nq, D), k (B, H, Nk, D) -> float32 (B, 1, Nq, Nk) (written into ``fused_out`` (B, Nq, Nk) when
    given), or (B, H, Nq, Nk) when ``head_fusion`` is None (then nothing is saved by chunking). Used where
    SDPA runs anyway and only q, k are seen.
    """
    mask = check_mask(attn_mask, q, k)
    if head_fusion is None:
        return _probs(q, k, scale, mask)
    _check_chunk_bytes(chunk_bytes)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    step = _chunk(B, H * Nq * Nk * 4, chunk_bytes)
    fused = _fused_buffer(q, k, fused_out)
    for b0 in range(0, B, step):
        m = None if mask is None else mask[b0:b0 + step]
        fuse_probs(_probs(q[b0:b0 + step], k[b0:b0 + step], scale, m), head_fusion, out=fused[b0:b0 + step])
    return fused.unsqueeze(1)
