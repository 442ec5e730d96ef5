"""Triton kernel of the fused attention (output + head-fused probabilities) and the op that launches it.

``torch.ops.rollout_fast.fused_attention(q, k, v, fused, scale, head_fusion, chunk_bytes, mask=None) -> out``
(:mod:`rollout_fast.ops.attention`; semantics: :mod:`rollout_fast.reference.attention`): q (B, H, Nq, D),
k (B, H, Nk, D), v (B, H, Nk, Dv) float16|bfloat16|float32, ``mask`` None or a float32 additive mask
broadcastable to (B, H, Nq, Nk) (read through its strides, 0 where it broadcasts: one load and one add per
tile, scaled by log2(e) as the logits are); writes the head-fused float32 (B, Nq, Nk) into
``fused`` and returns ``out`` (B, H, Nq, Dv) in q's dtype, laid out as (B, Nq, H, Dv) in memory.

The kernel is flash-attention style. A program owns one block of query rows of one sample and loops over
the heads; per head it computes the rows' softmax statistics, then the probabilities tile by tile,
accumulates ``O`` in registers and folds the tile into F. Per-head probabilities live only in registers:
memory traffic is q, k, v, O and one float32 (B, Nq, Nk) matrix. With ``Nk <= 256`` a row's keys fit one
tile (one pass per head, F accumulated in registers); beyond, two passes per head (row max and sum, then
probabilities) and F updated in place.

:func:`define_op` makes the op a ``torch.library.triton_op`` (torch.compile sees the kernel through
``wrap_triton``) whose non-CUDA tensors take the given PyTorch fallback. Under ``TRITON_INTERPRET=1`` the
kernel runs on CPU tensors in Triton's interpreter through :func:`launch` (tests); the interpreter has no
bfloat16, so bfloat16 input is upcast to float32 there. Only :mod:`rollout_fast.ops` imports this module.
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "define_op", "launch"]

_FUSION_CODES = {"mean": 0, "max": 1, "min": 2}
_ONE_PASS_MAX_N = 256  # keys per row held in one tile


@triton.jit
def _fused_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, f_ptr, m_ptr, H, NQ, NK, D, DV, qk_scale, inv_h,
                            s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                            s_mb, s_mh, s_mq, s_mk,
                            FUSION: tl.constexpr, ONE_PASS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PRECISION: tl.constexpr):
    """O[b, h, rows] for every head h and F[b, rows, :] = fusion over h of P[b, h, rows, :].

    Grid (cdiv(NQ, BLOCK_M), B). ``qk_scale`` = scale * log2(e) (softmax via exp2); q, k, v, O have unit
    stride in their last dimension; F is a contiguous float32 (B, NQ, NK). FUSION 0 mean, 1 max, 2 min.
    HAS_MASK: the float32 additive mask at ``m_ptr`` (strides s_m*) is added to the scaled logits.
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
    m_rows = m_ptr + b * s_mb + rows[:, None].to(tl.int64) * s_mq
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
            if HAS_MASK:
                s += tl.load(m_rows + h * s_mh + cols0[None, :] * s_mk, mask=rmask[:, None] & cmask[None, :],
                             other=0.0) * 1.4426950408889634
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
                if HAS_MASK:
                    s += tl.load(m_rows + h * s_mh + cols[None, :] * s_mk, mask=rmask[:, None] & cmask[None, :],
                                 other=0.0) * 1.4426950408889634
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
                if HAS_MASK:
                    s += tl.load(m_rows + h * s_mh + cols[None, :] * s_mk, mask=rmask[:, None] & cmask[None, :],
                                 other=0.0) * 1.4426950408889634
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


INTERPRETED = not isinstance(_fused_attention_kernel, JITFunction)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: torch.Tensor, scale: float, head_fusion: str,
           block_m=None, block_n=None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel: ``fused`` (contiguous float32 (B, Nq, Nk)) <- head-fused probabilities; returns O
    (B, H, Nq, Dv) in q's dtype, (B, Nq, H, Dv) in memory. ``block_n`` given forces the two-pass schedule;
    ``mask`` float32 additive, broadcastable to (B, H, Nq, Nk). Arguments are not validated
    (:mod:`rollout_fast.ops.attention` does that)."""
    dtype = q.dtype
    if INTERPRETED and dtype == torch.bfloat16:  # the interpreter has no bfloat16
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[-1]
    out = torch.empty((B, NQ, H, DV), dtype=q.dtype, device=q.device).transpose(1, 2)
    one_pass = block_n is None and triton.next_power_of_2(NK) <= _ONE_PASS_MAX_N
    if one_pass:
        block_n = max(16, triton.next_power_of_2(NK))
        block_m = block_m or (16 if block_n > 128 else 32)
    else:
        block_n = block_n or 64
        block_m = block_m or 64
    grid = (triton.cdiv(NQ, block_m), B)
    if mask is not None:
        mask = mask.float().expand(B, H, NQ, NK)
        m_strides = mask.stride()
    else:
        mask, m_strides = fused, (0, 0, 0, 0)  # never read (HAS_MASK=False)
    kernel = _fused_attention_kernel if INTERPRETED else wrap_triton(_fused_attention_kernel)
    kernel[grid](q, k, v, out, fused, mask, H, NQ, NK, D, DV, scale * math.log2(math.e), 1.0 / H,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                 *m_strides, FUSION=_FUSION_CODES[head_fusion], ONE_PASS=one_pass,
                 HAS_MASK=mask is not fused, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    if out.dtype != dtype:
        out = out.to(dtype)  # strides kept: still (B, Nq, H, Dv) in memory
    return out


def define_op(fallback):
    """Define ``rollout_fast::fused_attention`` as a ``triton_op``: the kernel on CUDA tensors, ``fallback``
    (same signature, plain PyTorch, so torch can trace it) on any other device."""
    def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: torch.Tensor, scale: float,
             head_fusion: str, chunk_bytes: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        if q.device.type == "cuda":
            return launch(q, k, v, fused, scale, head_fusion, mask=mask)
        return fallback(q, k, v, fused, scale, head_fusion, chunk_bytes, mask)

    return torch.library.triton_op("rollout_fast::fused_attention", impl, mutates_args=("fused",))
