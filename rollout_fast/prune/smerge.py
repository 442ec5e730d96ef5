"""Score-guided token merging, ours: ``'smerge'``, a pre-block scorer's scores (the student's) pick the tokens a
ViT keeps, and the tokens it does not keep are merged into their most similar kept token instead of being
discarded. Used after a scorer: ``prune_and_reduce(model, 1.0, "student", "smerge", {"keep_ratio": 0.375})``,
``rollout-fast prune-eval --methods student+smerge:keep=0.375``.

Stages: ``keep_ratio`` is one fraction (a single stage, before the first block) or a list: the first stage runs
on the embedded tokens before the first block, stage ``i >= 1`` at the output of block ``blocks[i - 1]``. Each
ratio is a fraction of the ``G`` patch tokens entering the blocks (the image's patch count, or what a scorer's
own pre-selection left; non-increasing, so ``[0.375, 0.125]`` keeps 24 then 8 of 64): at each stage the ``keep_count(ratio, G)``
candidates with the highest scores stay (the scorer's scores, computed once per image on the full image, carried
with the tokens; a merged token keeps its kept token's score), and each of the others is handled by ``rest``:

- ``'merge'`` (default): added to its most similar kept token (cosine similarity; before the blocks on the
  embedded tokens, inside on the block's keys averaged over heads, ToMe's metric) as a size-weighted average
  (``x <- sum(s x) / sum(s)``, ``s <- sum(s)``, ToMe's ``merge_wavg``), so the kept tokens carry what the
  dropped ones held;
- ``'fuse'``: all of them averaged (size-weighted) into one token appended last (EViT's idea of one fused token,
  its weights the sizes instead of the class-token attention, which a pre-block stage does not have); a fused
  token of an earlier stage is a candidate like any other, with the lowest score;
- ``'drop'``: discarded (plain pruning by score at each stage).

``prop_attn`` (default True): ToMe's proportional attention, ``+ log(size)`` on each key's logits in every
block after the first merge, so a token standing for ``s`` patches weighs as ``s`` of them in the softmax. The
bias goes in through the block's own ``attn_mask`` argument (timm's ``Block``; :meth:`TokenReducer.attn_mask`),
so only the blocks whose keys a merge reads are intercepted: at batch 1 the interception's per-op Python
dispatch in every block costs more than the tokens merged save.
The prefix tokens (class, distillation, registers) are never candidates.

Why: dropping tokens before the blocks throws away what they hold, merging inside the network (ToMe) keeps it
but needs the full token count in the first blocks. Merging the tokens the student drops into the kept ones
before the blocks gets both; on the CIFAR-10 teacher (2,000 test images) keeping 24 of 64 patches this way
keeps the full model's top-1 (0.8025) where dropping them loses 2.7 points (0.7755).

Sources: the merge, the similarity metric and proportional attention are ToMe's (Bolya et al., "Token Merging:
Your ViT But Faster", ICLR 2023; its ``merge_wavg`` and ``prop_attn``); the fused token EViT's (Liang et al.,
ICLR 2022); the scores the package's students' (a thumbnail network distilled from the teacher's gradient
rollout). The in-network stages reduce at a block's output, as every in-network method here
(:mod:`rollout_fast.prune.inner`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .inner import TokenReducer, register_method
from .keep import check_keep_ratio, keep_count
from .stratify import stratified_scores

__all__ = ["ScoredMerge", "scored_merge"]

RESTS = ("merge", "fuse", "drop")


def scored_merge(x: torch.Tensor, scores: torch.Tensor, keep: int, size: torch.Tensor | None = None,
                 metric: torch.Tensor | None = None, num_prefix_tokens: int = 1, rest: str = "merge"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage: keep the ``keep`` best-scored non-prefix tokens of ``x``, merge / fuse / drop the others.

    Args:
        x: (B, N, C) tokens, the ``P = num_prefix_tokens`` prefix tokens first.
        scores: (B, N - P) float scores of the non-prefix tokens (larger = keep); ties: the earlier token.
        keep: non-prefix tokens kept (``>= N - P``: nothing changes).
        size: (B, N, 1) tokens each token stands for (None: all ones).
        metric: (B, N, c) features whose cosine similarity assigns a merged token to a kept one (None: ``x``);
            only for ``rest='merge'``.
        rest: 'merge' | 'fuse' | 'drop' (see the module docstring).

    Returns:
        ``(x, scores, size)``: (B, P + keep [+ 1 fused], C) tokens (prefix, then the kept tokens by descending
        score, then the fused token), their (B, keep [+ 1]) scores (the fused token's: the lowest kept score
        minus 1) and (B, P + keep [+ 1], 1) sizes.
    """
    if rest not in RESTS:
        raise ValueError(f"rest: expected one of {RESTS}, got {rest!r}")
    P = num_prefix_tokens
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    if keep >= N - P:
        return x, scores, size
    order = scores.argsort(dim=1, descending=True, stable=True)
    kidx, didx = order[:, :keep], order[:, keep:]

    def take(t, idx):
        return t[:, P:].gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    kx, ks, ksc = take(x, kidx), take(size, kidx), scores.gather(1, kidx)
    if rest == "drop":
        out, osz = kx, ks
    elif rest == "fuse":
        dx, ds = take(x, didx), take(size, didx)
        total = ds.sum(1, keepdim=True)
        out = torch.cat([kx, (dx * ds).sum(1, keepdim=True) / total], dim=1)
        osz = torch.cat([ks, total], dim=1)
        ksc = torch.cat([ksc, ksc.amin(1, keepdim=True) - 1], dim=1)
    else:
        m = x if metric is None else metric
        m = m / m.norm(dim=-1, keepdim=True)
        dx, ds = take(x, didx), take(size, didx)
        nearest = (take(m, didx) @ take(m, kidx).transpose(1, 2)).argmax(dim=-1, keepdim=True)  # (B, drop, 1)
        osz = ks.scatter_add(1, nearest, ds)
        out = (kx * ks).scatter_add(1, nearest.expand(-1, -1, C), dx * ds) / osz
    return torch.cat([x[:, :P], out], dim=1), ksc, torch.cat([size[:, :P], osz], dim=1)


@register_method("smerge")
class ScoredMerge(TokenReducer):
    """Score-guided merging (see the module docstring); needs a pre-block scorer (``SCORER+smerge``).

    Settings: ``keep_ratio`` (a fraction of the patch tokens in (0, 1], or a non-increasing list: the first
    before the blocks, the others after ``blocks``); ``blocks`` (increasing block indices, one per later
    stage, default none); ``rest`` ('merge' | 'fuse' | 'drop'); ``prop_attn`` (default True); ``stratify``
    (default False: plain top-k; True: the pre-block stage keeps the stratified top-k of the scores,
    :mod:`~rollout_fast.prune.stratify`, so the kept tokens cover the patch grid, and the tokens carry the
    stratified ranking, reserved patches first, into the later stages). ``keep_ratio=1.0``
    runs the unmodified model (no interception at all). ``prune-eval --methods student+smerge`` evaluates
    keep_ratio = 0.625, 0.5, 0.375, 0.25, 0.1875 unless told.
    """

    uses_scores = True
    operating_points: ClassVar[dict[str, tuple]] = {"keep_ratio": (0.625, 0.5, 0.375, 0.25, 0.1875)}

    def __init__(self, keep_ratio=0.375, blocks=(), rest: str = "merge", prop_attn: bool = True,
                 stratify: bool = False):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.blocks = blocks
        self.rest = rest
        self.prop_attn = bool(prop_attn)
        self.stratify = stratify
        self.grid: tuple[int, int] | None = None
        self.ratios: list[float] = []
        self.stages: dict[int, float] = {}
        self.depth = 0

    def extra_repr(self) -> str:
        return (f"keep_ratio={self.keep_ratio!r}, blocks={self.blocks!r}, rest={self.rest!r}, prop_attn={self.prop_attn}"
                + (", stratify=True" if self.stratify else ""))

    def bind(self, model, layout) -> None:
        if self.rest not in RESTS:
            raise ValueError(f"rest: expected one of {RESTS}, got {self.rest!r}")
        if not isinstance(self.stratify, bool):
            raise ValueError(f"stratify: expected true or false, got {self.stratify!r}")  # noqa: TRY004
        self.grid = tuple(layout.grid)
        ratios = list(self.keep_ratio) if isinstance(self.keep_ratio, (list, tuple)) else [self.keep_ratio]
        ratios = [check_keep_ratio(r) for r in ratios]
        if not ratios or any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"keep_ratio: expected one ratio or a non-empty non-increasing list, got {self.keep_ratio!r}")
        depth = len(model.blocks)
        try:
            blocks = [int(b) for b in self.blocks]
            ok = all(not isinstance(b, bool) and float(b) == int(b) for b in self.blocks)
        except (TypeError, ValueError):
            ok = False
        if not ok or not all(0 <= b < depth for b in blocks) or blocks != sorted(set(blocks)):
            raise ValueError(f"blocks: expected increasing block indices in [0, {depth}), got {self.blocks!r}")
        if len(blocks) != len(ratios) - 1:
            raise ValueError(f"keep_ratio: {len(ratios)} ratio(s) for a pre-block stage and blocks {blocks}; "
                             f"expected {len(blocks) + 1} (the first before the blocks, one per block)")
        self.ratios = ratios
        self.stages = dict(zip(blocks, ratios[1:]))
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.depth = depth
        self.plan(layout.num_tokens)

    def _after_stage(self, n: int, ratio: float, G: int) -> int:
        """Tokens after a stage keeping ``ratio`` of ``G`` patches, from ``n`` tokens."""
        P = self.num_prefix_tokens
        k = keep_count(ratio, G)
        if k >= n - P:
            return n
        return P + k + (self.rest == "fuse")

    def plan(self, num_tokens: int) -> list[int]:
        G = int(num_tokens) - self.num_prefix_tokens
        counts = [self._after_stage(int(num_tokens), self.ratios[0], G)]
        for i in range(self.depth):
            n = counts[-1]
            counts.append(self._after_stage(n, self.stages[i], G) if i in self.stages else n)
        return counts

    def _reduces(self, block: int, state: dict) -> bool:
        return block in self.stages and self._after_stage(state["x_tokens"], self.stages[block], state["G"]) \
            < state["x_tokens"]

    def before(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        G = x.shape[1] - self.num_prefix_tokens
        state["G"] = G
        k, scores = keep_count(self.ratios[0], G), state.get("scores")
        if self.stratify and scores is not None and k < G:
            if self.grid is None or self.grid[0] * self.grid[1] != G:
                raise ValueError(f"stratify: {G} patch tokens enter the blocks, not the {self.grid} patch grid "
                                 "(a scorer's own pre-selection, or another image size)")
            scores = stratified_scores(scores, self.grid, k)
        x, state["scores"], size = scored_merge(x, scores, k, None, None, self.num_prefix_tokens, self.rest)
        if x.shape[1] < G + self.num_prefix_tokens and self.rest != "drop":  # 'drop': every size stays 1
            state["size"] = size
        state["x_tokens"] = x.shape[1]
        return x

    def uses_sdpa(self, block: int, state: dict) -> bool:
        return self.rest == "merge" and self._reduces(block, state)  # the keys: the merge metric

    def attn_mask(self, block: int, state: dict):
        size = state.get("size")
        if self.prop_attn and size is not None:
            return size.log()[:, None, None, :, 0]  # (B, 1, 1, N): + log s_j on key j
        return None

    def sdpa(self, block: int, q, k, v, mask, scale, state: dict):
        if self.rest == "merge" and self._reduces(block, state):
            state["metric"] = k.mean(1)
        size = state.get("size")
        if self.prop_attn and size is not None:
            return size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N): + log s_j on key j
        return None

    def after(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        if not self._reduces(block, state):
            return x
        metric = self.take(state, "metric", block) if self.rest == "merge" else None
        x, state["scores"], size = scored_merge(x, state["scores"], keep_count(self.stages[block], state["G"]),
                                                state.get("size"), metric, self.num_prefix_tokens, self.rest)
        if self.rest != "drop":
            state["size"] = size
        state["x_tokens"] = x.shape[1]
        return x
