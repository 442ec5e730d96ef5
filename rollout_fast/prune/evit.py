"""EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022), off the shelf (no fine-tuning), as an in-network method: ``'evit'``.

At each chosen block (default: three stages at ``floor(s * depth / 4)``, s = 1, 2, 3; blocks 3, 6, 9 of a
12-block ViT, the official ``drop_loc``), the class token's attention in that block, averaged over heads, is
read from the block's own SDPA call (``softmax(q_cls k^T * scale + mask)``, recomputed in float32 from the q, k,
mask and scale SDPA received: one row, not the N x N matrix). Of the ``n`` non-prefix tokens, the
``ceil(keep_ratio * n)`` with the largest class-token attention are kept (in descending attention order, as
the official ``torch.topk(..., sorted=True)``), and with ``fuse=True`` the others are fused into one token,
their sum weighted by that attention (the official code and the paper's eq.: raw attention weights, not
renormalised), appended last. A fused token of an earlier stage is a candidate like any other token.

Written after youweiliang/evit ``evit.py`` (``Attention.forward``, ``Block.forward``). Differences: prefix
tokens beyond the class token (distillation, register) are protected too (the official code treats a
distillation token as a candidate); the count is ``ceil(keep_ratio * n - 1e-9)`` so that float error does not
keep an extra token (0.7 * 10 keeps 7); and, shared with every in-network method here, the reduction runs at
the block's output (after its MLP), not between its attention and its MLP (timm's ``Block.forward`` runs
unchanged), so the reducing block's MLP still sees every token and the fused token is built from post-MLP
features.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..capture import UnsupportedModelError
from .inner import TokenReducer, register_method
from .keep import check_keep_ratio

__all__ = ["EViT", "check_blocks", "cls_attention", "evit_keep_count", "evit_reduce"]


def evit_keep_count(keep_ratio: float, num_tokens: int) -> int:
    """Tokens EViT keeps of ``num_tokens`` candidates: ``ceil(keep_ratio * n)`` (at least 1)."""
    return max(1, min(num_tokens, math.ceil(keep_ratio * num_tokens - 1e-9)))


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of query token 0: ``softmax(q[:, :, 0] k^T * scale + mask[..., 0, :]).mean(heads)``.

    q, k: (B, H, N, Dh); mask: None, bool or additive, broadcastable to (B, H, N, N). Returns float32 (B, N).
    """
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale  # (B, H, 1, N)
    if mask is not None:
        row = mask[..., :1, :] if mask.dim() >= 2 and mask.shape[-2] > 1 else mask
        logits = logits.masked_fill(~row, -torch.inf) if row.dtype == torch.bool else logits + row.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def evit_reduce(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_prefix_tokens: int = 1,
                fuse: bool = True) -> torch.Tensor:
    """EViT's token reorganisation: ``x`` (B, N, D) -> (B, P + keep [+ 1], D).

    ``cls_attn``: (B, N) class-token attention over all N tokens; the P prefix tokens stay first, the
    ``keep`` non-prefix tokens with the largest attention follow (descending), then (``fuse``) the sum of
    the other non-prefix tokens weighted by their attention. ``keep`` equal to ``N - P`` returns ``x``.
    """
    P = num_prefix_tokens
    rest = x[:, P:]
    n = rest.shape[1]
    if keep >= n:
        return x
    attn = cls_attn[:, P:].to(x.dtype)
    idx = attn.topk(keep, dim=1, largest=True, sorted=True).indices  # (B, keep)
    kept = rest.gather(1, idx.unsqueeze(-1).expand(-1, -1, rest.shape[-1]))
    parts = [x[:, :P], kept]
    if fuse:
        weights = attn.scatter(1, idx, 0.0)  # the dropped tokens' attention; the kept ones weigh 0
        parts.append(torch.bmm(weights.unsqueeze(1), rest))
    return torch.cat(parts, dim=1)


def check_blocks(blocks, depth: int) -> list[int]:
    """The stage blocks: ``blocks`` as a list of increasing ints in [0, depth), or (None) three stages at
    ``floor(s * depth / 4)``, s = 1, 2, 3. Raises ValueError naming ``blocks`` otherwise."""
    if blocks is None:
        return sorted({max(0, s * depth // 4) for s in (1, 2, 3)})
    try:
        out = [int(b) for b in blocks]
        ok = all(not isinstance(b, bool) and float(b) == int(b) for b in blocks)
    except (TypeError, ValueError):
        ok = False
    if not ok or not all(0 <= b < depth for b in out) or out != sorted(set(out)):
        raise ValueError(f"blocks: expected increasing block indices in [0, {depth}), got {blocks!r}")
    return out


@register_method("evit")
class EViT(TokenReducer):
    """EViT off the shelf (see the module docstring).

    Settings: ``keep_ratio`` in (0, 1] (one for every stage, or one per stage); ``blocks`` (block indices,
    default three stages at depth/4 steps); ``fuse`` (fuse the inattentive tokens, default True).
    ``keep_ratio=1.0`` runs the unmodified model (no interception at all). ``prune-eval --methods evit``
    evaluates keep_ratio = 0.9, 0.7, 0.5 unless told.
    """

    operating_points: ClassVar[dict[str, tuple]] = {"keep_ratio": (0.9, 0.7, 0.5)}

    def __init__(self, keep_ratio=0.7, blocks=None, fuse: bool = True):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.blocks = blocks
        self.fuse = bool(fuse)
        self.keep: dict[int, float] = {}
        self.depth = 0

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio!r}, blocks={self.blocks!r}, fuse={self.fuse}"

    def bind(self, model, layout) -> None:
        if not layout.has_class_token:
            raise UnsupportedModelError("model: EViT ranks tokens by the class token's attention, and this model "
                                        "has no class token")
        stages = check_blocks(self.blocks, len(model.blocks))
        ratios = self.keep_ratio if isinstance(self.keep_ratio, (list, tuple)) else [self.keep_ratio] * len(stages)
        if len(ratios) != len(stages):
            raise ValueError(f"keep_ratio: {len(ratios)} ratios for {len(stages)} blocks {stages}")
        self.keep = {b: check_keep_ratio(kr) for b, kr in zip(stages, ratios)}
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.depth = len(model.blocks)
        self.plan(layout.num_tokens)

    def _count(self, block: int, num_tokens: int) -> int:
        """Non-prefix tokens kept at ``block`` (all of them when it does not reduce)."""
        n = num_tokens - self.num_prefix_tokens
        return evit_keep_count(self.keep[block], n) if block in self.keep else n

    def plan(self, num_tokens: int) -> list[int]:
        counts = [int(num_tokens)]
        for i in range(self.depth):
            n = counts[-1]
            keep = self._count(i, n)
            counts.append(n if keep >= n - self.num_prefix_tokens else
                          self.num_prefix_tokens + keep + int(self.fuse))
        return counts

    def uses_sdpa(self, block: int, state: dict) -> bool:
        return block in self.keep and self.keep[block] < 1.0

    def sdpa(self, block: int, q, k, v, mask, scale, state: dict):
        state["cls_attn"] = cls_attention(q, k, scale, mask)

    def after(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        if not self.uses_sdpa(block, state):
            return x
        keep = self._count(block, x.shape[1])
        return evit_reduce(x, self.take(state, "cls_attn", block), keep, self.num_prefix_tokens, self.fuse)
