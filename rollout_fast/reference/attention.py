"""Attention with its head-fused probability matrix, in plain PyTorch: the specification of
:func:`rollout_fast.ops.fused_attention` (REFERENCE.md section 1, step 1, taken inside the attention).

``fused_attention_reference(q, k, v, scale, head_fusion, attn_mask) -> (out, fused)``:
``P = softmax(q k^T * scale + mask)`` in float32 (B, H, Nq, Nk), ``mask`` the additive form of SDPA's
``attn_mask`` (a float mask is added; a bool mask keeps True entries and sets False ones to -inf; either
broadcast to (B, H, Nq, Nk); none: 0); ``out = P v`` (what
``F.scaled_dot_product_attention`` returns; P cast to v's dtype, float32 accumulation, result in q's
dtype) and ``fused = mean | max | min over heads of P``, float32 (B, Nq, Nk). Every backend of the op
(Triton, batch-chunked PyTorch) computes exactly this without holding P for the whole batch.

This module imports nothing else from the package.
"""

from __future__ import annotations

import torch

__all__ = ["additive_mask", "attention_probs", "fuse_probs", "fused_attention_reference"]


def additive_mask(attn_mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` as a float32 additive mask expanded (a view, stride 0 where broadcast) to
    ``shape`` = (B, H, Nq, Nk): bool True -> 0 (take part), False -> -inf; float values as they are."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        m = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        m.masked_fill_(~attn_mask, float("-inf"))
    else:
        m = attn_mask.float()
    return m.expand(shape)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` in float32: q (B, H, Nq, D), k (B, H, Nk, D) -> (B, H, Nq, Nk);
    ``mask``: None or SDPA's ``attn_mask`` (bool or float, broadcastable to (B, H, Nq, Nk))."""
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(scale)
    if mask is not None:
        logits.add_(additive_mask(mask, logits.shape))
    return logits.softmax(dim=-1)


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
                              head_fusion: str = "mean", attn_mask: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale + mask) v, head-fused softmax(q k^T * scale + mask))`` for the whole batch.

    Args:
        q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); float16|bfloat16|float32, one device.
        scale: softmax scale; None: ``D ** -0.5`` (SDPA's default).
        head_fusion: 'mean' | 'max' | 'min' over heads.
        attn_mask: None, or SDPA's ``attn_mask``: bool (True = take part) or float (added to the logits),
            broadcastable to (B, H, Nq, Nk).

    Returns:
        ``(out, fused)``: ``out`` (B, H, Nq, Dv) in q's dtype; ``fused`` float32 (B, Nq, Nk).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    probs = attention_probs(q, k, scale, attn_mask)
    fused = fuse_probs(probs, head_fusion)
    o = torch.matmul(probs if v.dtype == torch.float32 else probs.to(v.dtype), v)
    return o.to(q.dtype), fused
