"""ATS (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022), training-free,
as an in-network method: ``'ats'``.

At each chosen block (default: three stages at ``floor(s * depth / 4)``, s = 1, 2, 3, as EViT here):

1. **Significance** (:func:`ats_significance`, the paper's eq. 3): ``S_j = a_j ||v_j|| / sum_i a_i ||v_i||``
   over the non-prefix tokens ``j``, with ``a`` the class token's attention in that block averaged over heads
   (the official code sums over heads; the normalisation makes the two equal) and ``||v_j||`` the L2 norm of
   token ``j``'s value vector over all heads. ``a`` is recomputed in float32 from the q, k, mask and scale the
   block's own ``F.scaled_dot_product_attention`` call received, ``v`` is that call's value tensor (read
   through the package's SDPA interception, :class:`~rollout_fast.prune.inner.ReducingBlocks`); timm's blocks
   run unchanged.
2. **Inverse transform sampling** (:func:`ats_sample`), deterministic as ATS at inference: the scores sorted in
   ascending order, their CDF normalised to [0, 1] by its min and max, ``K`` evenly spaced quantiles from the
   smallest non-zero normalised CDF value ``y0`` to 1 (``y_i = y0 + i (1 - y0) / (K - 1)``; ``K = 1``: the
   quantile 1, the most significant token), and each quantile picks the token whose normalised CDF value is
   nearest (the first on a tie).
3. **Duplicates removed**: a token picked by several quantiles is kept once, so an image keeps at most ``K``
   tokens and fewer where its significance is concentrated (the adaptive count). Prefix tokens (class,
   distillation, register) are always kept, first; the kept tokens follow in their original order.

Written after adaptivetokensampling/ATS ``libs/models/transformers/ats_block.py`` (``score_assignment_step``,
``create_ys``, ``inverse_transform_sampling``, ``get_unique_indices``).

``K`` per stage: ``ceil(keep_ratio * n)`` of the ``n`` non-prefix tokens the stage can receive at most (the
model's patch count at the first stage, the previous stage's ``K`` after it), so it never depends on the other
images of a batch. ``keep_ratio=1.0`` is ATS as released for DeiT-S (``NUM_TOKENS`` = every token at each ATS
block): ``K = n`` quantiles, only the tokens no quantile lands on are dropped. The no-reduction setting is
``blocks=[]`` (no ATS stage), which runs the unmodified model.

**Variable token counts in a batch**: padding + attention masking. After a stage, every image's kept tokens
are padded (zero vectors) to the largest count in the batch, and every later block's SDPA call gets an
additive ``attn_mask`` of ``-inf`` on the padded keys (ToMe's proportional-attention path), so no real token
attends to a padded one and a padded token is never sampled at a later stage. The class token's readout is
unaffected; models that pool over the tokens (``global_pool`` other than ``'token'``) are refused, as padded
tokens would enter the average. Batches whose images all keep the same count carry no padding and no mask.
A batch runs at the width of its largest count (batch 1: the image's own count); :meth:`ATS.observed_tokens`
gives the real mean count per block.

Deviations from the paper, shared by every in-network method here: the sampling runs at the block's output
(after its MLP), not between its attention and its MLP (the official block drops attention rows before the
projection), because timm's ``Block.forward`` runs unchanged; so a sampling block's MLP still sees every
token. The official code's minimum of 8 sampled tokens is not applied (``K`` is exactly the setting).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..capture import UnsupportedModelError
from .evit import check_blocks, cls_attention, evit_keep_count
from .inner import TokenReducer, add_attn_mask, register_method
from .keep import check_keep_ratio

__all__ = ["ATS", "ats_gather", "ats_quantiles", "ats_sample", "ats_significance"]


def ats_significance(cls_attn: torch.Tensor, v: torch.Tensor, num_prefix_tokens: int = 1,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """ATS's significance scores of the non-prefix tokens (eq. 3 of the paper).

    Args:
        cls_attn: (B, N) float, the class token's attention over all N tokens (head-averaged or head-summed).
        v: (B, H, N, Dh) float, the block's value vectors; ``||v_j||`` is taken over all heads (H * Dh values).
        num_prefix_tokens: P, the tokens that are never candidates (first in the sequence).
        valid: None, or (B, N - P) bool, False for padded tokens (their score is 0).

    Returns:
        float32 (B, N - P): ``a_j ||v_j||`` normalised to sum 1 per image (all zeros stay zeros).
    """
    P = num_prefix_tokens
    norms = torch.linalg.vector_norm(v[:, :, P:].float(), dim=(1, 3))  # (B, N - P)
    s = cls_attn[:, P:].float() * norms
    if valid is not None:
        s = s.masked_fill(~valid, 0.0)
    return s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def ats_quantiles(y0: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The ``K = num_samples`` sampling points per image: ``y0 + i (1 - y0) / (K - 1)``, i = 0 .. K-1
    (the official ``create_ys``), or ``[1.0]`` for ``K = 1``. ``y0``: (B, 1) float32. Returns (B, K) float32."""
    if num_samples == 1:
        return torch.ones_like(y0)
    steps = torch.arange(num_samples, device=y0.device, dtype=torch.float32) / (num_samples - 1)
    return y0 + steps * (1.0 - y0)


def ats_sample(significance: torch.Tensor, num_samples: int, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic inverse transform sampling of ``num_samples`` tokens, duplicates removed (see the module
    docstring), for each image independently (padded candidates excluded).

    Args:
        significance: (B, n) float scores (:func:`ats_significance`); only their order and ratios matter.
        num_samples: K >= 1, the quantiles drawn (the most tokens an image keeps).
        valid: None, or (B, n) bool, False for padded candidates; every image needs one valid candidate.

    Returns:
        ``(indices, keep)``: int64 (B, m) candidate indices in ascending order, m the largest kept count in the
        batch, and bool (B, m), False where an image's row is padding (its index there is meaningless).

    Raises:
        ValueError: ``num_samples`` < 1, or an image without a valid candidate.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    s = significance.float()
    B, n = s.shape
    if valid is None:
        valid = torch.ones((B, n), dtype=torch.bool, device=s.device)
    n_valid = valid.sum(dim=1, keepdim=True)
    if bool((n_valid == 0).any()):
        raise ValueError("valid: an image has no valid candidate token")
    # padded candidates sort last (stable: equal scores keep their order), so the valid ones are a prefix
    sorted_s, order = s.masked_fill(~valid, torch.inf).sort(dim=1, stable=True)
    in_prefix = torch.arange(n, device=s.device) < n_valid
    cdf = sorted_s.masked_fill(~in_prefix, 0.0).cumsum(dim=1)
    lo, hi = cdf[:, :1], cdf.gather(1, n_valid - 1)
    span = hi - lo
    ncdf = torch.where(span > 0, (cdf - lo) / span.where(span > 0, torch.ones_like(span)), torch.zeros_like(cdf))
    ncdf = ncdf.masked_fill(~in_prefix, torch.inf)
    y0 = ncdf.masked_fill(ncdf == 0, torch.inf).amin(dim=1, keepdim=True)
    y0 = torch.where(torch.isinf(y0), torch.ones_like(y0), y0)  # no non-zero value: one valid token
    ys = ats_quantiles(y0, num_samples)  # (B, K)
    pos = (ys.unsqueeze(2) - ncdf.unsqueeze(1)).abs().argmin(dim=2)  # nearest CDF value; first on a tie
    chosen = torch.zeros((B, n), dtype=torch.bool, device=s.device).scatter_(1, order.gather(1, pos), True)
    counts = chosen.sum(dim=1, keepdim=True)
    m = int(counts.max())
    indices = chosen.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :m]
    keep = torch.arange(m, device=s.device) < counts
    return indices, keep


def ats_gather(x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor, num_prefix_tokens: int = 1
               ) -> torch.Tensor:
    """``x`` (B, N, D) -> (B, P + m, D): the P prefix tokens, then the candidates at ``indices`` (B, m) (into
    ``x[:, P:]``), zero vectors where ``keep`` (B, m) is False."""
    P = num_prefix_tokens
    kept = x[:, P:].gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    kept = kept.masked_fill(~keep.unsqueeze(-1), 0.0)
    return torch.cat([x[:, :P], kept], dim=1)


@register_method("ats")
class ATS(TokenReducer):
    """ATS, training-free (see the module docstring).

    Settings: ``keep_ratio`` in (0, 1] (one for every stage, or one per stage): quantiles ``K`` as a fraction of
    the tokens a stage can receive; ``blocks`` (increasing block indices, default three stages at depth/4 steps;
    ``[]``: no stage, the unmodified model). ``prune-eval --methods ats`` evaluates keep_ratio = 1.0, 0.7, 0.5,
    0.3 unless told.

    Raises (at :func:`~rollout_fast.prune.reduce_tokens`): ValueError for a keep ratio outside (0, 1], a block
    index out of range or a ratio list of another length; UnsupportedModelError for a model without a class
    token or one that pools over the tokens.
    """

    operating_points: ClassVar[dict[str, tuple]] = {"keep_ratio": (1.0, 0.7, 0.5, 0.3)}

    def __init__(self, keep_ratio=0.7, blocks=None):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.blocks = blocks
        self.keep: dict[int, float] = {}
        self.depth = 0
        self.reset_observed()

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio!r}, blocks={self.blocks!r}"

    def bind(self, model, layout) -> None:
        if not layout.has_class_token:
            raise UnsupportedModelError("model: ATS samples tokens by the class token's attention, and this model "
                                        "has no class token")
        pool = getattr(model, "global_pool", "token")
        if pool != "token":
            raise UnsupportedModelError(f"model: ATS pads each image's kept tokens to the batch's largest count and "
                                        f"needs the class-token readout (global_pool='token'), not {pool!r}")
        stages = check_blocks(self.blocks, len(model.blocks))
        if not isinstance(self.keep_ratio, (list, tuple)):
            check_keep_ratio(self.keep_ratio)
        ratios = self.keep_ratio if isinstance(self.keep_ratio, (list, tuple)) else [self.keep_ratio] * len(stages)
        if len(ratios) != len(stages):
            raise ValueError(f"keep_ratio: {len(ratios)} ratios for {len(stages)} blocks {stages}")
        self.keep = {b: check_keep_ratio(kr) for b, kr in zip(stages, ratios)}
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.depth = len(model.blocks)
        self.plan(layout.num_tokens)

    def plan(self, num_tokens: int) -> list[int]:
        """The most tokens entering each block (an image keeps at most ``K`` per stage), then leaving the last."""
        P = self.num_prefix_tokens
        counts = [int(num_tokens)]
        for i in range(self.depth):
            n = counts[-1]
            counts.append(P + evit_keep_count(self.keep[i], n - P) if i in self.keep else n)
        return counts

    def uses_sdpa(self, block: int, state: dict) -> bool:
        return block in self.keep or state.get("valid") is not None

    def sdpa(self, block: int, q, k, v, mask, scale, state: dict):
        valid = state.get("valid")
        bias = None
        if valid is not None:  # -inf on the padded keys: (B, 1, 1, N)
            keys = torch.cat([valid.new_ones(valid.shape[0], self.num_prefix_tokens), valid], dim=1)
            bias = torch.zeros(keys.shape, dtype=q.dtype, device=q.device).masked_fill(~keys, -torch.inf)
            bias = bias[:, None, None, :]
        if block in self.keep:
            attn = cls_attention(q, k, scale, add_attn_mask(mask, bias, q.dtype))
            state["significance"] = ats_significance(attn, v, self.num_prefix_tokens, valid)
        return bias

    def after(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        valid = state.get("valid")
        self._observe(block, x, valid)
        if block not in self.keep:
            return x
        if "plan" not in state:
            state["plan"] = self.plan(state["num_tokens"])
        samples = state["plan"][block + 1] - self.num_prefix_tokens
        indices, keep = ats_sample(self.take(state, "significance", block), samples, valid)
        state["valid"] = None if bool(keep.all()) else keep
        return ats_gather(x, indices, keep, self.num_prefix_tokens)

    def _observe(self, block: int, x: torch.Tensor, valid) -> None:
        """Add the tokens entering ``block`` (the real counts, padding excluded) to the running sums."""
        if len(self._sums) != self.depth:
            self._sums = [0] * self.depth
        count = x.shape[1] * x.shape[0] if valid is None else self.num_prefix_tokens * x.shape[0] + valid.sum()
        self._sums[block] = self._sums[block] + count
        if block == 0:
            self._images += x.shape[0]

    def observed_tokens(self) -> list[float] | None:
        if not self._images:
            return None
        return [float(s) / self._images for s in self._sums]

    def reset_observed(self) -> None:
        self._sums: list = []
        self._images = 0

    def observed_state(self) -> dict:
        return {"sums": [int(s) for s in self._sums], "images": int(self._images)}

    def load_observed(self, state: dict | None) -> None:
        if state is not None:
            self._sums, self._images = list(state["sums"]), int(state["images"])
