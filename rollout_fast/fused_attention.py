"""Attention that also returns its head-fused probability matrix, without keeping per-head probabilities.

For rollout, a block's attention is needed only head-fused (section 1 of REFERENCE.md, step 1):
``F[b] = mean | max | min over heads h of softmax(q[b, h] k[b, h]^T * scale)``, shape (B, Nq, Nk),
H times smaller than the per-head attention. The functions here compute the attention output
``O = softmax(q k^T * scale) v`` (what ``F.scaled_dot_product_attention`` returns) together with F, so
the capture in :mod:`rollout_fast.capture` can stand in for SDPA and rollout costs about one forward pass:

- :func:`fused_attention_triton` (GPU): one Triton kernel, flash-attention style. A program owns one
  block of query rows of one sample and loops over the heads; per head it computes the rows' softmax
  statistics, then the probabilities tile by tile, accumulates ``O`` in registers and folds the tile
  into F. Per-head probabilities live only in registers: memory traffic is q, k, v, O and one float32
  (B, Nq, Nk) matrix. With ``Nk <= 256`` a row's keys fit one tile (one pass per head, F accumulated in
  registers); beyond, two passes per head (row max and sum, then probabilities) and F updated in place.
  Runs compiled on CUDA tensors, or in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``
  was set before the kernel's first use (slow; for tests).
- :func:`fused_attention_chunked` (CPU, or any device without Triton): plain PyTorch over chunks of the
  batch: per-head float32 logits and probabilities exist for one chunk at a time (``chunk_bytes`` each,
  default 1 MiB, at least one sample; cache-sized chunks are also the fastest on the CPU), never for the
  whole (B, H, Nq, Nk).

Both compute the logits and softmax in float32 from the given q, k (float16 / bfloat16 / float32),
multiply the probabilities (cast to v's dtype, as flash attention does) by v with float32
accumulation, and return ``O`` in q's dtype. ``O`` equals SDPA's output within the dtype's tolerance.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from .reference import HEAD_FUSIONS

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "check_qkv",
    "fused_attention",
    "fused_attention_chunked",
    "fused_attention_triton",
    "fused_probs_chunked",
    "triton_available",
    "triton_interpreted",
    "triton_kernel",
    "triton_supports",
]

DEFAULT_CHUNK_BYTES = 1 << 20  # per-head float32 probabilities held at once (cache-sized: fastest on CPU)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSION_CODES = {"mean": 0, "max": 1, "min": 2}
_ONE_PASS_MAX_N = 256  # keys per row held in one tile by the Triton kernel


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


def _new_output(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """O stored as (B, Nq, H, Dv), returned as its (B, H, Nq, Dv) view: timm's following
    ``x.transpose(1, 2).reshape(B, N, C)`` is then free."""
    B, H, Nq, _ = q.shape
    store = torch.empty((B, Nq, H, v.shape[-1]), dtype=q.dtype, device=q.device)
    return store, store.transpose(1, 2)


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


def _fuse_into(probs: torch.Tensor, head_fusion: str, out: torch.Tensor) -> None:
    if head_fusion == "mean":
        torch.mean(probs, dim=1, out=out)
    elif head_fusion == "max":
        torch.amax(probs, dim=1, out=out)
    else:
        torch.amin(probs, dim=1, out=out)


def _chunk(B: int, per_sample_bytes: int, chunk_bytes: int) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")
    return max(1, min(B, chunk_bytes // max(1, per_sample_bytes)))


# ------------------------------------------------------------------------------------ PyTorch path
def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1))
    return logits.mul_(scale).softmax(dim=-1)


def fused_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                            head_fusion: str = "mean", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            fused_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

    Returns:
        ``(out, fused)``: ``out`` (B, H, Nq, Dv) in q's dtype (memory laid out as (B, Nq, H, Dv)),
        equal to ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` within the dtype's
        tolerance; ``fused`` float32 (B, Nq, Nk), rows sum to 1 for 'mean'.

    Raises:
        TypeError, ValueError: see :func:`check_qkv`; a bad ``chunk_bytes`` or ``fused_out``.
    """
    scale = check_qkv(q, k, v, head_fusion, scale)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    step = _chunk(B, H * Nq * Nk * 4, chunk_bytes)
    fused = _fused_buffer(q, k, fused_out)
    store, out = _new_output(q, v)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        probs = _probs(q[b0:b1], k[b0:b1], scale)
        _fuse_into(probs, head_fusion, fused[b0:b1])
        vc = v[b0:b1]
        o = torch.matmul(probs if vc.dtype == torch.float32 else probs.to(vc.dtype), vc)
        store[b0:b1].copy_(o.transpose(1, 2))
    return out, fused


def fused_probs_chunked(q: torch.Tensor, k: torch.Tensor, *, scale: float, head_fusion: str | None = "mean",
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        fused_out: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale)`` in float32, head-fused over chunks of the batch.

    q (B, H, Nq, D), k (B, H, Nk, D) -> float32 (B, 1, Nq, Nk) (written into ``fused_out`` (B, Nq, Nk) when
    given), or (B, H, Nq, Nk) when ``head_fusion`` is None (then nothing is saved by chunking). Used where
    SDPA runs anyway and only q, k are seen.
    """
    if head_fusion is None:
        return _probs(q, k, scale)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    step = _chunk(B, H * Nq * Nk * 4, chunk_bytes)
    fused = _fused_buffer(q, k, fused_out)
    for b0 in range(0, B, step):
        _fuse_into(_probs(q[b0:b0 + step], k[b0:b0 + step], scale), head_fusion, fused[b0:b0 + step])
    return fused.unsqueeze(1)


# ------------------------------------------------------------------------------------- Triton path
# The kernel is defined as a plain function and turned into a Triton kernel on first use
# (:func:`triton_kernel`), so importing this module imports no Triton and TRITON_INTERPRET is read then.
# ``tl`` is bound to triton.language at that moment; annotations stay strings (postponed evaluation).
tl = None
_TRITON: dict = {}


def _fused_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, f_ptr, H, NQ, NK, D, DV, qk_scale, inv_h,
                            s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                            FUSION: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PRECISION: tl.constexpr):
    """O[b, h, rows] for every head h and F[b, rows, :] = fusion over h of P[b, h, rows, :].

    Grid (cdiv(NQ, BLOCK_M), B). ``qk_scale`` = scale * log2(e) (softmax via exp2); q, k, v, O have unit
    stride in their last dimension; F is a contiguous float32 (B, NQ, NK). FUSION 0 mean, 1 max, 2 min.
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < NQ
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    cols0 = tl.arange(0, BLOCK_N)
    q_rows = q_ptr + b * s_qb + rows[:, None] * s_qn + d[None, :]
    q_mask = rmask[:, None] & (d[None, :] < D)
    o_rows = o_ptr + b * s_ob + rows[:, None] * s_on + dv[None, :]
    o_mask = rmask[:, None] & (dv[None, :] < DV)
    f_rows = f_ptr + b * NQ * NK + rows[:, None].to(tl.int64) * NK
    if ONE_PASS:  # every key of a row in one tile: exact softmax per head, F in registers
        cmask = cols0 < NK
        k_cols = k_ptr + b * s_kb + cols0[:, None] * s_kn + d[None, :]
        k_mask = cmask[:, None] & (d[None, :] < D)
        v_cols = v_ptr + b * s_vb + cols0[:, None] * s_vn + dv[None, :]
        v_mask = cmask[:, None] & (dv[None, :] < DV)
        if FUSION == 2:
            f_acc = tl.full([BLOCK_M, BLOCK_N], float("inf"), tl.float32)
        else:
            f_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for h in range(H):
            q = tl.load(q_rows + h * s_qh, mask=q_mask, other=0.0)
            kt = tl.load(k_cols + h * s_kh, mask=k_mask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
            s = tl.where(cmask[None, :], s, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            if FUSION == 0:
                f_acc = f_acc + p
            elif FUSION == 1:
                f_acc = tl.maximum(f_acc, p)
            else:
                f_acc = tl.minimum(f_acc, p)
            vt = tl.load(v_cols + h * s_vh, mask=v_mask, other=0.0)
            o = tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            tl.store(o_rows + h * s_oh, o.to(o_ptr.dtype.element_ty), mask=o_mask)
        if FUSION == 0:
            f_acc = f_acc * inv_h
        tl.store(f_rows + cols0[None, :], f_acc, mask=rmask[:, None] & cmask[None, :])
    else:  # key tiles: per head, pass 1 row max and sum, pass 2 probabilities, O and F in place
        for start in range(0, NK, BLOCK_N):
            cols = start + cols0
            fm = rmask[:, None] & (cols[None, :] < NK)
            if FUSION == 2:
                tl.store(f_rows + cols[None, :], tl.full([BLOCK_M, BLOCK_N], float("inf"), tl.float32), mask=fm)
            else:
                tl.store(f_rows + cols[None, :], tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=fm)
        tl.debug_barrier()  # F's rows are re-read below, possibly by other threads of this program
        for h in range(H):
            q = tl.load(q_rows + h * s_qh, mask=q_mask, other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, NK, BLOCK_N):
                cols = start + cols0
                cmask = cols < NK
                kt = tl.load(k_ptr + b * s_kb + h * s_kh + cols[:, None] * s_kn + d[None, :],
                             mask=cmask[:, None] & (d[None, :] < D), other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
                s = tl.where(cmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
                m_i = m_new
            inv_l = 1.0 / l_i
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for start in range(0, NK, BLOCK_N):
                cols = start + cols0
                cmask = cols < NK
                kt = tl.load(k_ptr + b * s_kb + h * s_kh + cols[:, None] * s_kn + d[None, :],
                             mask=cmask[:, None] & (d[None, :] < D), other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
                s = tl.where(cmask[None, :], s, float("-inf"))
                p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
                vt = tl.load(v_ptr + b * s_vb + h * s_vh + cols[:, None] * s_vn + dv[None, :],
                             mask=cmask[:, None] & (dv[None, :] < DV), other=0.0)
                acc += tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
                fp = f_rows + cols[None, :]
                fm = rmask[:, None] & cmask[None, :]
                f = tl.load(fp, mask=fm, other=0.0)
                if FUSION == 0:
                    f = f + p * inv_h
                elif FUSION == 1:
                    f = tl.maximum(f, p)
                else:
                    f = tl.minimum(f, p)
                tl.store(fp, f, mask=fm)
            tl.store(o_rows + h * s_oh, acc.to(o_ptr.dtype.element_ty), mask=o_mask)
            tl.debug_barrier()  # the next head re-reads F's rows


def triton_kernel():
    """The Triton kernel (built on first call: compiled, or interpreted under ``TRITON_INTERPRET=1``).

    Raises:
        ImportError: Triton is not installed.
    """
    if "kernel" not in _TRITON:
        global tl
        import triton
        from triton import language
        from triton.runtime.jit import JITFunction

        tl = language
        kernel = triton.jit(_fused_attention_kernel)
        _TRITON.update(kernel=kernel, interpreted=not isinstance(kernel, JITFunction), triton=triton)
    return _TRITON["kernel"]


def triton_interpreted() -> bool:
    """True when the kernel was built for Triton's interpreter (builds it on first call)."""
    triton_kernel()
    return _TRITON["interpreted"]


def triton_available() -> bool:
    """Triton is installed and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU)."""
    if "installed" not in _TRITON:
        _TRITON["installed"] = importlib.util.find_spec("triton") is not None
    if not _TRITON["installed"]:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_supports(device: torch.device | str) -> bool:
    """The Triton kernel runs on tensors of ``device``: CUDA, or CPU with an interpreted kernel."""
    device = torch.device(device)
    if not triton_available():
        return False
    if device.type == "cuda":
        return not triton_interpreted()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1" and triton_interpreted()


def _launch(q, k, v, scale: float, head_fusion: str, block_m: int | None = None,
            block_n: int | None = None, fused_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = triton_kernel()
    triton = _TRITON["triton"]
    dtype = q.dtype
    if _TRITON["interpreted"] and dtype == torch.bfloat16:  # the interpreter has no bfloat16
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[-1]
    fused = _fused_buffer(q, k, fused_out)
    _, out = _new_output(q, v)
    one_pass = block_n is None and triton.next_power_of_2(NK) <= _ONE_PASS_MAX_N
    if one_pass:
        block_n = max(16, triton.next_power_of_2(NK))
        block_m = block_m or (16 if block_n > 128 else 32)
    else:
        block_n = block_n or 64
        block_m = block_m or 64
    grid = (triton.cdiv(NQ, block_m), B)
    kernel[grid](q, k, v, out, fused, H, NQ, NK, D, DV, scale * math.log2(math.e), 1.0 / H,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                 FUSION=_FUSION_CODES[head_fusion], ONE_PASS=one_pass, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    if out.dtype != dtype:
        out = out.to(dtype)  # strides kept: still (B, Nq, H, Dv) in memory
    return out, fused


def fused_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                           head_fusion: str = "mean", block_m: int | None = None, block_n: int | None = None,
                           fused_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and head-fused attention in one Triton kernel (per-head probabilities stay in
    registers).

    Args: as :func:`fused_attention_chunked` (``fused_out`` too); ``block_m``/``block_n`` override the
    tile sizes (``block_n`` given forces the two-pass schedule; powers of two >= 16).

    Returns:
        ``(out, fused)`` as :func:`fused_attention_chunked`.

    Raises:
        TypeError, ValueError: see :func:`check_qkv`; tensors on a device the kernel cannot run on
            (CPU without ``TRITON_INTERPRET=1``).
        ImportError: Triton is not installed.
    """
    scale = check_qkv(q, k, v, head_fusion, scale)
    if not triton_supports(q.device):
        raise ValueError(f"q: the Triton kernel does not run on {q.device.type} tensors here (CUDA, or the "
                         "CPU with TRITON_INTERPRET=1 set before first use)")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (not isinstance(blk, int) or blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name}: expected a power of two >= 16, got {blk!r}")
    return _launch(q, k, v, scale, head_fusion, block_m, block_n, fused_out)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    head_fusion: str = "mean", impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale) v, head-fused softmax(q k^T * scale))``: the best path for the device.

    ``impl``: 'auto' (Triton on CUDA when available, else chunked PyTorch), 'triton' or 'chunked'.
    Shapes, dtypes, results and errors as :func:`fused_attention_chunked`.
    """
    if impl not in ("auto", "triton", "chunked"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'chunked', got {impl!r}")
    if impl == "auto":
        on_cuda = isinstance(q, torch.Tensor) and q.device.type == "cuda"
        impl = "triton" if on_cuda and triton_supports(q.device) else "chunked"
    if impl == "triton":
        return fused_attention_triton(q, k, v, scale=scale, head_fusion=head_fusion)
    return fused_attention_chunked(q, k, v, scale=scale, head_fusion=head_fusion)
