"""Triton kernels of the fused top-k token gather and the custom op that launches them.

``torch.ops.rollout_fast.topk_gather_triton(tokens, scores, k, num_prefix_tokens) -> (kept, indices)``:
same arguments, results and semantics as the compiled ``rollout_fast::topk_gather``
(:mod:`rollout_fast.reference.gather`): tokens ``(B, N, D)`` float16|bfloat16|float32|float64, scores ``(B, G)``
float32, ``kept`` ``(B, P + k, D)`` (prefix tokens, then the k best patches in ascending index), ``indices``
int64 ``(B, k)`` ascending; ties go to the lower index.

Kernels: ``_select_kernel`` (one program per sample; the whole score row in registers, G <= 16384): the
k-th largest order key T by a bitwise radix search (32 counting passes, no sort), then keep every key > T
and the first ``k - #(key > T)`` keys equal to T in index order (a cumulative sum), and write each
winner's index at its rank among the winners (another cumulative sum); ``_copy_kernel`` (grid (B, P + k))
copies one token row per program.

On CUDA the op is a ``torch.library.triton_op``; under ``TRITON_INTERPRET=1`` (CPU tensors) it is an
opaque ``torch.library.custom_op``, as in :mod:`rollout_fast.triton.rollout`; its fake kernel and
autograd formula are registered by :mod:`rollout_fast.ops.meta`, the only importer of this module. The
interpreter has no bfloat16, so bfloat16 tokens are moved as their int16 bit patterns there (exact).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "MAX_G", "topk_gather_triton"]

MAX_G = 16384


@triton.jit
def _score_key(x):
    """Order key of float32 x as int64 in [0, 2**32) (-0 counts as +0); csrc/gather_common.h's key."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    s = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return s.to(tl.int64) + 2147483648


@triton.jit
def _select_kernel(s_ptr, idx_ptr, G, k, s_b, BLOCK_G: tl.constexpr):
    """idx[b, :k] = the k best patch indices of row b, ascending; grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_G)
    m = i < G
    key = tl.where(m, _score_key(tl.load(s_ptr + b * s_b + i, mask=m, other=0.0)), -1)
    zero = (tl.program_id(0) * 0).to(tl.int64)
    # T = the largest x with #(key >= x) >= k: the k-th largest key
    t = zero
    for step in range(32):
        cand = t + ((zero + 1) << (31 - step))
        count = tl.sum((key >= cand).to(tl.int64), axis=0)
        t = tl.where(count >= k, cand, t)
    gt = key > t
    eq = key == t
    need = k - tl.sum(gt.to(tl.int64), axis=0)
    eq_rank = tl.cumsum(eq.to(tl.int64), axis=0)  # 1-based rank among the ties, in index order
    kept = gt | (eq & (eq_rank <= need))
    pos = tl.cumsum(kept.to(tl.int64), axis=0) - 1
    tl.store(idx_ptr + b * k + pos, i.to(tl.int64), mask=kept & m)


@triton.jit
def _copy_kernel(t_ptr, idx_ptr, o_ptr, k, P, D, t_b, t_n, BLOCK_D: tl.constexpr):
    """out[b, r] = tokens[b, r] for r < P, tokens[b, P + idx[b, r - P]] otherwise; grid (B, P + k)."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    j = tl.maximum(r - P, 0)
    src = tl.where(r < P, r, P + tl.load(idx_ptr + b * k + j))
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = d < D
        x = tl.load(t_ptr + b * t_b + src * t_n + d, mask=m)
        tl.store(o_ptr + (b * (P + k) + r) * D + d, x, mask=m)


INTERPRETED = not isinstance(_select_kernel, JITFunction)


def _check(tokens: torch.Tensor, scores: torch.Tensor, k: int, num_prefix_tokens: int) -> None:
    torch._check(tokens.dim() == 3, lambda: f"rollout_fast: tokens must be (B, N, D), got {tuple(tokens.shape)}")
    torch._check(scores.dim() == 2 and scores.dtype == torch.float32,
                 lambda: "rollout_fast: scores must be float32 (B, G)")
    torch._check(tokens.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 lambda: f"rollout_fast: unsupported dtype {tokens.dtype}")
    B, N, _ = tokens.shape
    torch._check(0 <= num_prefix_tokens < N, lambda: f"rollout_fast: need 0 <= num_prefix_tokens < N = {N}")
    G = N - num_prefix_tokens
    torch._check(tuple(scores.shape) == (B, G), lambda: f"rollout_fast: scores must be ({B}, {G})")
    torch._check(1 <= k <= G, lambda: f"rollout_fast: need 1 <= k <= G = {G}, got {k}")
    torch._check(G <= MAX_G, lambda: f"rollout_fast: the Triton gather handles G <= {MAX_G}, got {G}")


def _topk_gather(tokens: torch.Tensor, scores: torch.Tensor, k: int,
                 num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(tokens, scores, k, num_prefix_tokens)
    B, N, D = tokens.shape
    P = num_prefix_tokens
    G = N - P
    tok = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    sc = scores if scores.stride(-1) == 1 else scores.contiguous()
    out = torch.empty((B, P + k, D), device=tok.device, dtype=tok.dtype)
    idx = torch.empty((B, k), device=tok.device, dtype=torch.int64)
    if B == 0:
        return out, idx
    wrap_triton(_select_kernel)[(B,)](sc, idx, G, k, sc.stride(0), BLOCK_G=triton.next_power_of_2(G))
    if D == 0:  # nothing to copy; the indices are an output too
        return out, idx
    src, dst = tok, out
    if INTERPRETED and tok.dtype == torch.bfloat16:  # the interpreter has no bfloat16: move the bits
        src, dst = tok.view(torch.int16), out.view(torch.int16)
    wrap_triton(_copy_kernel)[(B, P + k)](src, idx, dst, k, P, D, src.stride(0), src.stride(1),
                                          BLOCK_D=min(1024, triton.next_power_of_2(D)))
    return out, idx


if INTERPRETED:  # interpreted kernels run eagerly only: an opaque custom op (fake: rollout_fast.ops.meta)
    topk_gather_triton = torch.library.custom_op("rollout_fast::topk_gather_triton", _topk_gather, mutates_args=())
else:
    topk_gather_triton = torch.library.triton_op("rollout_fast::topk_gather_triton", _topk_gather,
                                                 mutates_args=())
