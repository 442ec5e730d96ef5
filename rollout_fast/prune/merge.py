"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) as an in-network method: ``'tome'``.

Per block ``l`` with ``r_l > 0``: the keys of the block's own SDPA call, averaged over heads, ``(B, N, Dh)``,
are the matching metric. Bipartite soft matching (:func:`bipartite_soft_matching`): tokens alternate into
sets A (even positions) and B (odd positions), every A token's most cosine-similar B token is its edge, the
``r_l`` strongest edges merge their A token into its B token; prefix tokens (class, distillation, register)
are protected (never merged). Merging is size-weighted (:func:`merge_wavg`): ``x <- sum(s x) / sum(s)``,
``s <- sum(s)``; and every later attention adds ``log s_j`` of each key token ``j`` to its logits
(proportional attention), passed to SDPA as an additive ``attn_mask``, so the fused attention carries it.

Written after facebookresearch/ToMe ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``); the prefix
handling generalises its ``class_token`` / ``distill_token`` flags to any number of prefix tokens (for one
class token, and for a class + distillation token, the output order is exactly ToMe's).

The one deviation from the paper: ToMe merges between a block's attention and its MLP (its patch copies
timm's ``Block.forward``); here timm's blocks run unchanged and the merge runs on the block's *output*, with
the keys that block's attention saw. The MLP of a merging block therefore still runs on all its tokens (a
little less speed-up per ``r``), and the merged features are post-MLP rather than post-attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .inner import TokenReducer, register_method

__all__ = ["ToMe", "TokenMerge", "bipartite_soft_matching", "max_merge", "merge_wavg", "tome_schedule"]


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Most tokens one bipartite matching can merge: ``(N - P) // 2`` (ToMe: "max 50% of tokens")."""
    return max(0, (int(num_tokens) - int(num_protected)) // 2)


class TokenMerge:
    """One block's matching: ``merge(x (B, N, C), mode) -> (B, N - r, C)``.

    Output order: the prefix tokens in their original order, then the unmerged A tokens in ascending position
    (ToMe sorts them only when there is a class token; the order changes no output), then the B tokens. ``mode``: a ``scatter_reduce`` reduction
    ('sum' | 'mean' | 'amax' ...), applied over each B token and the A tokens merged into it.
    """

    def __init__(self, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, num_protected: int):
        self.unm_idx, self.src_idx, self.dst_idx = unm_idx, src_idx, dst_idx  # (B, *, 1) int64
        self.r = src_idx.shape[1]
        self.num_protected = num_protected

    def __call__(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=self.unm_idx.expand(n, t1 - self.r, c))
        src = src.gather(dim=-2, index=self.src_idx.expand(n, self.r, c))
        dst = dst.scatter_reduce(-2, self.dst_idx.expand(n, self.r, c), src, reduce=mode)
        P = self.num_protected
        if P == 0:
            return torch.cat([unm, dst], dim=1)
        # prefix token i sits at A[i // 2] (even i: first unmerged, kept in order) or B[i // 2] (odd i)
        parts = [(unm if i % 2 == 0 else dst)[:, i // 2:i // 2 + 1] for i in range(P)]
        return torch.cat(parts + [unm[:, (P + 1) // 2:], dst[:, P // 2:]], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> TokenMerge:
    """ToMe's balanced bipartite soft matching on ``metric`` (B, N, C) (the head-averaged keys).

    The first ``num_protected`` tokens are never merged (their A rows and B columns score ``-inf``).

    Raises:
        ValueError: ``r`` negative or more than :func:`max_merge` ``(N, num_protected)``.
    """
    N = metric.shape[1]
    if not 0 <= r <= max_merge(N, num_protected):
        raise ValueError(f"r: cannot merge {r} of {N} tokens with {num_protected} protected; at most "
                         f"{max_merge(N, num_protected)} (half the unprotected tokens)")
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores[..., :(num_protected + 1) // 2, :] = -torch.inf  # protected A tokens are never sources
        scores[..., :, :num_protected // 2] = -torch.inf        # protected B tokens are never destinations
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        unm_idx = unm_idx.sort(dim=1)[0]  # positional order (protected A tokens first); ToMe sorts with a class token
    return TokenMerge(unm_idx, src_idx, dst_idx, num_protected)


def merge_wavg(merge: TokenMerge, x: torch.Tensor, size: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: ``(sum(s x) / sum(s), sum(s))`` over each merged group; ``size`` (B, N, 1),
    None meaning all ones. Returns the merged ``x`` (B, N - r, C) and sizes (B, N - r, 1)."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_schedule(r, depth: int) -> list[int]:
    """Tokens merged at each of ``depth`` blocks: an int (the same ``r`` at every block, as ToMe) or a
    list/tuple of ``depth`` non-negative ints.

    Raises:
        ValueError: a negative or non-integer ``r``, or a list of another length.
    """
    def bad(v):
        return isinstance(v, bool) or not isinstance(v, int) or v < 0
    if isinstance(r, (list, tuple)):
        if len(r) != depth or any(bad(v) for v in r):
            raise ValueError(f"r: expected {depth} non-negative ints (one per block), got {r!r}")
        return [int(v) for v in r]
    if bad(r):
        raise ValueError(f"r: expected a non-negative int (tokens merged per block) or a list of them, got {r!r}")
    return [int(r)] * depth


@register_method("tome")
class ToMe(TokenReducer):
    """ToMe: merge ``r`` tokens per block (see the module docstring).

    Settings: ``r`` (int, or one int per block); ``prop_attn`` (proportional attention, default True as
    ToMe off the shelf). ``r=0`` runs the unmodified model (no interception at all). ``prune-eval --methods
    tome`` evaluates r = 2, 4, 6, 8 unless told (a constant r must fit every block: 65 tokens over 6 blocks
    allow r <= 9; larger totals need one r per block, e.g. ``r=[16,12,8,4,2,1]``).
    """

    operating_points: ClassVar[dict[str, tuple]] = {"r": (2, 4, 6, 8)}

    def __init__(self, r=8, prop_attn: bool = True):
        super().__init__()
        self.r = r
        self.prop_attn = bool(prop_attn)
        self.schedule: list[int] = []

    def extra_repr(self) -> str:
        return f"r={self.r!r}, prop_attn={self.prop_attn}"

    def bind(self, model, layout) -> None:
        self.schedule = tome_schedule(self.r, len(model.blocks))
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.plan(layout.num_tokens)

    def plan(self, num_tokens: int) -> list[int]:
        counts = [int(num_tokens)]
        for i, r in enumerate(self.schedule):
            n = counts[-1]
            if r > max_merge(n, self.num_prefix_tokens):
                raise ValueError(
                    f"r: {r} tokens to merge at block {i}, but its {n} tokens ({self.num_prefix_tokens} "
                    f"protected) allow at most {max_merge(n, self.num_prefix_tokens)}; lower r")
            counts.append(n - r)
        return counts

    def uses_sdpa(self, block: int, state: dict) -> bool:
        return self.schedule[block] > 0 or (self.prop_attn and state.get("size") is not None)

    def sdpa(self, block: int, q, k, v, mask, scale, state: dict):
        if self.schedule[block] > 0:
            state["metric"] = k.mean(1)
        size = state.get("size")
        if self.prop_attn and size is not None:
            return size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N): + log s_j on key j
        return None

    def after(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        r = self.schedule[block]
        if r == 0:
            return x
        merge = bipartite_soft_matching(self.take(state, "metric", block), r, self.num_prefix_tokens)
        x, state["size"] = merge_wavg(merge, x, state.get("size"))
        return x
