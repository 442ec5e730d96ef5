"""Attention with its head-fused probability matrix, in plain PyTorch: the specification of
:func:`rollout_fast.ops.fused_attention` (REFERENCE.md section 1, step 1, taken inside the attention).

``fused_attention_reference(q, k, v, scale, head_fusion) -> (out, fused)``:
``P = softmax(q k^T * scale)`` in float32 (B, H, Nq, Nk); ``out = P v`` (what
``F.scaled_dot_product_attention`` returns; P cast to v's dtype, float32 accumulation, result in q's
dtype) and ``fused = mean | max | min over heads of P``, float32 (B, Nq, Nk). Every backend of the op
(Triton, batch-chunked PyTorch) computes exactly this without holding P for the whole batch.

This module imports nothing else from the package.
"""

from __future__ import annotations

import torch

__all__ = ["attention_probs", "fuse_probs", "fused_attention_reference"]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale)`` in float32: q (B, H, Nq, D), k (B, H, Nk, D) -> (B, H, Nq, Nk)."""
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1))
    return logits.mul_(scale).softmax(dim=-1)


def fuse_probs(probs: torch.Tensor, head_fusion: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Head fusion of (B, H, Nq, Nk) probabilities over dim 1 ('mean' | 'max' | 'min'), into ``out`` if given."""
    if head_fusion == "mean":
        return torch.mean(probs, dim=1, out=out)
    if head_fusion == "max":
        return torch.amax(probs, dim=1, out=out)
    if head_fusion == "min":
        return torch.amin(probs, dim=1, out=out)
    raise ValueError(f"head_fusion: expected 'mean', 'max' or 'min', got {head_fusion!r}")


def fused_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                              head_fusion: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale) v, head-fused softmax(q k^T * scale))`` for the whole batch at once.

    Args:
        q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); float16|bfloat16|float32, one device.
        scale: softmax scale; None: ``D ** -0.5`` (SDPA's default).
        head_fusion: 'mean' | 'max' | 'min' over heads.

    Returns:
        ``(out, fused)``: ``out`` (B, H, Nq, Dv) in q's dtype; ``fused`` float32 (B, Nq, Nk).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    probs = attention_probs(q, k, scale)
    fused = fuse_probs(probs, head_fusion)
    o = torch.matmul(probs if v.dtype == torch.float32 else probs.to(v.dtype), v)
    return o.to(q.dtype), fused
