"""Triton kernels of the fused attention rollout and the custom ops that launch them.

Ops (same arguments, results and semantics as the compiled ``rollout_fast::rollout`` /
``fused_layers``; section 1 of REFERENCE.md, :mod:`rollout_fast.reference`):

``torch.ops.rollout_fast.rollout_triton(attentions, head_fusion, discard_ratio, num_prefix_tokens,
protect_prefix, readout, normalize) -> Tensor``
    attentions ``(L, B, H, N, N)`` float16|bfloat16|float32|float64, any strides; float32
    ``(B, N - P)`` normalised maps for readout 'cls'/'mean', ``(B, N, N)`` for 'full'.
``torch.ops.rollout_fast.fused_layers_triton(attentions, head_fusion, discard_ratio, protect_first)``
    float32 ``(L, B, N, N)`` per-layer ``M_l = (discard(F_l) + I) / rowsum``.

Kernels, one launch each: ``_fuse_kernel`` (head fusion, float32), ``_select_kernel`` (per (layer,
sample) discard threshold: a bitwise radix select of the (k+1)-th smallest over order-preserving
integer keys, 32 counting passes, no sort), ``_normalize_kernel`` (discard, residual, row
normalisation), then for 'cls'/'mean' the row-vector chain ``_vecmat_kernel`` (one launch per layer,
last to first) and ``_finalize_kernel`` (readout and per-sample normalisation); 'full' multiplies the
stored ``M_l`` with ``torch.bmm``.

On CUDA the ops are ``torch.library.triton_op`` s (torch.compile sees the kernels through
``wrap_triton``). Under ``TRITON_INTERPRET=1`` (CPU tensors, Triton's interpreter) they are opaque
``torch.library.custom_op`` s with fake kernels (registered by :mod:`rollout_fast.ops.meta`, the only
importer of this module), because interpreted kernels cannot be traced; the
interpreter has no bfloat16, so bfloat16 input is upcast (exactly) to float32 first.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

__all__ = ["rollout_triton", "fused_layers_triton", "INTERPRETED"]

_FUSIONS = {"mean": 0, "max": 1, "min": 2}
_READOUTS = ("cls", "mean", "full")
_NORMALIZE = {None: 0, "max": 1, "minmax": 2}


@triton.jit
def _float_key(x):
    """Order-preserving integer key of float32 x, in [0, 2**32) as int64 (csrc/rollout_common.h's key)."""
    bits = x.to(tl.int32, bitcast=True)
    s = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return s.to(tl.int64) + 2147483648


@triton.jit
def _key_float(key):
    s = (key - 2147483648).to(tl.int32)
    bits = s ^ ((s >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fuse_kernel(att_ptr, f_ptr, B, H, N, s_l, s_b, s_h, s_i, FUSION: tl.constexpr, BLOCK: tl.constexpr):
    """F[l, b] = mean|max|min over heads of A[l, b] in float32; grid (L*B, cdiv(N*N, BLOCK))."""
    lb = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N * N
    i = offs // N
    j = offs % N
    ptr = att_ptr + (lb // B) * s_l + (lb % B) * s_b + i * s_i + j
    acc = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    for h in range(1, H):
        x = tl.load(ptr + h * s_h, mask=mask, other=0.0).to(tl.float32)
        if FUSION == 0:
            acc = acc + x
        elif FUSION == 1:
            acc = tl.maximum(acc, x)
        else:
            acc = tl.minimum(acc, x)
    if FUSION == 0:
        acc = acc / H
    tl.store(f_ptr + lb * N * N + offs, acc, mask=mask)


@triton.jit
def _select_kernel(f_ptr, t_ptr, NN, k, BLOCK: tl.constexpr):
    """t[lb] = the (k+1)-th smallest of F[lb] (NN entries); grid (L*B,).

    Bitwise radix select: the answer's key is the largest key x with #(keys < x) <= k, built from the
    most significant bit down, one counting pass over F[lb] per bit.
    """
    lb = tl.program_id(0).to(tl.int64)
    base = f_ptr + lb * NN
    zero = (tl.program_id(0) * 0).to(tl.int64)
    prefix = zero
    for step in range(32):
        cand = prefix + ((zero + 1) << (31 - step))
        count = zero
        for start in range(0, NN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < NN
            key = _float_key(tl.load(base + offs, mask=m, other=0.0))
            count += tl.sum(((key < cand) & m).to(tl.int64), axis=0)
        prefix = tl.where(count <= k, cand, prefix)
    tl.store(t_ptr + lb, _key_float(prefix))


@triton.jit
def _normalize_kernel(f_ptr, t_ptr, N, HAS_T: tl.constexpr, PROTECT: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Rows i of F[lb] <- (discard(row) + e_i) / rowsum, in place, ROWS rows per program;
    grid (L*B, cdiv(N, ROWS))."""
    lb = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_N)
    mask = (i[:, None] < N) & (j[None, :] < N)
    ptrs = f_ptr + lb * N * N + i[:, None].to(tl.int64) * N + j[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_T:
        t = tl.load(t_ptr + lb)
        drop = x < t
        if PROTECT:
            drop = drop & ((i[:, None] != 0) | (j[None, :] != 0))
        x = tl.where(drop, 0.0, x)
    x = tl.where(i[:, None] == j[None, :], x + 1.0, x)
    x = tl.where(mask, x, 0.0)
    s = tl.sum(x, axis=1)
    s = tl.where(i < N, s, 1.0)
    tl.store(ptrs, x / s[:, None], mask=mask)


@triton.jit
def _vecmat_kernel(m_ptr, v_in, v_out, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """v_out[b] = v_in[b]^T M_l[b] for one layer (m_ptr = M_l, (B, N, N)); grid (B, cdiv(N, BLOCK_J))."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mj = j < N
    base = m_ptr + b * N * N
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < N
        v = tl.load(v_in + b * N + i, mask=mi, other=0.0)
        m = tl.load(base + i[:, None] * N + j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
        acc += tl.sum(v[:, None] * m, axis=0)
    tl.store(v_out + b * N + j, acc, mask=mj)


@triton.jit
def _finalize_kernel(v_ptr, out_ptr, N, P, G, MEAN: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[b] = normalised readout v[b, P:] (/ G for 'mean'); grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    m = g < G
    x = tl.load(v_ptr + b * N + P + g, mask=m, other=0.0)
    if MEAN:
        x = x / G
    if NORM == 1:
        hi = tl.max(tl.where(m, x, -float("inf")), axis=0)
        x = tl.where(hi > 0, x / tl.where(hi > 0, hi, 1.0), 0.0)
    elif NORM == 2:
        hi = tl.max(tl.where(m, x, -float("inf")), axis=0)
        lo = tl.min(tl.where(m, x, float("inf")), axis=0)
        span = hi - lo
        x = tl.where(span > 0, (x - lo) / tl.where(span > 0, span, 1.0), 0.0)
    tl.store(out_ptr + b * G + g, x, mask=m)


INTERPRETED = not isinstance(_fuse_kernel, JITFunction)
_BLOCK = 1024
_SELECT_BLOCK = 4096


def _check(attentions: torch.Tensor, head_fusion: str, discard_ratio: float) -> None:
    torch._check(attentions.dim() == 5,
                 lambda: f"rollout_fast: attentions must be (L, B, H, N, N), got {tuple(attentions.shape)}")
    torch._check(attentions.shape[3] == attentions.shape[4],
                 lambda: f"rollout_fast: attentions must be square, got {tuple(attentions.shape)}")
    torch._check(attentions.numel() > 0, lambda: "rollout_fast: attentions has an empty dimension")
    torch._check(attentions.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 lambda: f"rollout_fast: unsupported dtype {attentions.dtype}")
    torch._check(head_fusion in _FUSIONS, lambda: f"rollout_fast: unknown head_fusion {head_fusion!r}")
    torch._check(0.0 <= discard_ratio < 1.0,
                 lambda: f"rollout_fast: discard_ratio must be in [0, 1), got {discard_ratio}")


def _layers(attentions: torch.Tensor, head_fusion: str, discard_ratio: float, protect00: bool) -> torch.Tensor:
    """Steps 1-3: float32 (L, B, N, N) M_l."""
    att = attentions
    if INTERPRETED and att.dtype == torch.bfloat16:
        att = att.float()  # exact; the interpreter has no bfloat16
    if att.stride(-1) != 1:
        att = att.contiguous()
    L, B, H, N, _ = att.shape
    NN = N * N
    k = int(math.floor(discard_ratio * N * N))  # as the reference: floor(r * N * N) in double
    M = torch.empty((L, B, N, N), device=att.device, dtype=torch.float32)
    wrap_triton(_fuse_kernel)[(L * B, triton.cdiv(NN, _BLOCK))](
        att, M, B, H, N, att.stride(0), att.stride(1), att.stride(2), att.stride(3),
        FUSION=_FUSIONS[head_fusion], BLOCK=_BLOCK)
    thresh = M  # placeholder pointer when there is no discard (HAS_T=False never reads it)
    if k >= 1:
        thresh = torch.empty((L * B,), device=att.device, dtype=torch.float32)
        wrap_triton(_select_kernel)[(L * B,)](M, thresh, NN, k, BLOCK=min(_SELECT_BLOCK, triton.next_power_of_2(NN)))
    block_n = triton.next_power_of_2(N)
    rows = max(1, min(16, 4096 // block_n))
    wrap_triton(_normalize_kernel)[(L * B, triton.cdiv(N, rows))](
        M, thresh, N, HAS_T=k >= 1, PROTECT=protect00, ROWS=rows, BLOCK_N=block_n)
    return M


def _rollout(attentions: torch.Tensor, head_fusion: str, discard_ratio: float, num_prefix_tokens: int,
             protect_prefix: bool, readout: str, normalize: Optional[str]) -> torch.Tensor:
    _check(attentions, head_fusion, discard_ratio)
    torch._check(readout in _READOUTS, lambda: f"rollout_fast: unknown readout {readout!r}")
    torch._check(normalize in _NORMALIZE, lambda: f"rollout_fast: unknown normalize {normalize!r}")
    L, B, _, N, _ = attentions.shape
    P = num_prefix_tokens
    torch._check(0 <= P < N, lambda: f"rollout_fast: need 0 <= num_prefix_tokens < N = {N}, got {P}")
    torch._check(readout != "cls" or P >= 1, lambda: "rollout_fast: readout 'cls' needs num_prefix_tokens >= 1")
    M = _layers(attentions, head_fusion, discard_ratio, protect_prefix and P >= 1)
    if readout == "full":
        R = M[0]
        for layer in range(1, L):
            R = torch.bmm(M[layer], R)
        return R.contiguous()
    G = N - P
    v = torch.zeros((2, B, N), device=M.device, dtype=torch.float32)
    if readout == "cls":
        v[0, :, 0] = 1.0
    else:
        v[0, :, P:] = 1.0
    block_j = min(128, triton.next_power_of_2(N))
    src, dst = 0, 1
    for layer in range(L - 1, -1, -1):
        wrap_triton(_vecmat_kernel)[(B, triton.cdiv(N, block_j))](M[layer], v[src], v[dst], N, BLOCK_I=32,
                                                                   BLOCK_J=block_j)
        src, dst = dst, src
    out = torch.empty((B, G), device=M.device, dtype=torch.float32)
    wrap_triton(_finalize_kernel)[(B,)](v[src], out, N, P, G, MEAN=readout == "mean", NORM=_NORMALIZE[normalize],
                                        BLOCK_G=triton.next_power_of_2(G))
    return out


def _fused_layers(attentions: torch.Tensor, head_fusion: str, discard_ratio: float,
                  protect_first: bool) -> torch.Tensor:
    _check(attentions, head_fusion, discard_ratio)
    return _layers(attentions, head_fusion, discard_ratio, protect_first)


if INTERPRETED:
    # interpreted kernels run eagerly only: opaque custom ops (their fakes: rollout_fast.ops.meta)
    rollout_triton = torch.library.custom_op("rollout_fast::rollout_triton", _rollout, mutates_args=())
    fused_layers_triton = torch.library.custom_op("rollout_fast::fused_layers_triton", _fused_layers,
                                                  mutates_args=())
else:
    rollout_triton = torch.library.triton_op("rollout_fast::rollout_triton", _rollout, mutates_args=())
    fused_layers_triton = torch.library.triton_op("rollout_fast::fused_layers_triton", _fused_layers,
                                                  mutates_args=())
