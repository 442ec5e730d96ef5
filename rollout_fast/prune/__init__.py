"""Pruned ViT inference: run a timm ViT on the prefix tokens plus the patch tokens that matter.

``pruned = prune_tokens(model, keep_ratio, scorer)`` returns a module whose forward scores the
``G = gh * gw`` patch tokens of each image, keeps the prefix tokens (class, distillation, register) and the
top ``k = keep_count(keep_ratio, G)`` patches right after the position embedding (before ``norm_pre`` and
the blocks), and runs every block unchanged on the shorter sequence. The pruning point is timm's
``model.patch_drop`` (REFERENCE.md section 4): a shallow copy of the model gets its own ``patch_drop``, a
:class:`TokenPruner` that calls the fused :func:`rollout_fast.topk_gather`; parameters and every
other submodule are shared with the original, which is not modified. SDPA stays on, LayerScale and q/k norm
run as timm wrote them, and the shapes are static for a fixed ratio.

Scorers (``scorer=`` a registered name, a :class:`PatchScorer`, or a callable ``images -> (B, G)`` scores;
a new name is one :func:`register_scorer` entry in :mod:`rollout_fast.prune.scorers`):

- ``'random'`` (:class:`RandomScorer`): uniform random scores from a seeded generator (the baseline).
- ``'rollout'`` (:class:`RolloutScorer`): the model's own attention rollout of the full image. An oracle
  needing a full forward pass first: an upper-bound reference, not a speed-up.
- ``'grad-rollout'`` (:class:`GradRolloutScorer`): the model's own gradient rollout (Chefer et al. 2021)
  for its predicted class: a stronger oracle (a forward and a backward pass), which keeps the tokens that
  carry the full model's decision.
- ``'cls-attention'`` (:class:`ClsAttentionScorer`): the class token's attention (mean over heads) in an
  early block on the full token sequence, training-free, EViT-style (Liang et al., "Not All Patches are
  What You Need: Expediting Vision Transformers via Token Reorganizations", ICLR 2022). Block 0 (default)
  costs one LayerNorm and the q/k projections of block 0, computed inside the pruned forward from the same
  embedded tokens (no second patch embedding).
- ``'student'`` (:class:`StudentScorer`): a small trained model mapping the (thumbnail of the) image to a
  ``(B, gh, gw)`` relevance map (issue 5's students; the seeds' ResNet/DeiT-tiny students).
- ``'model-rollout'`` / ``'model-grad-rollout'`` (:class:`ModelRolloutScorer`, :mod:`~rollout_fast.prune.cross`):
  another, smaller ViT's attention rollout / gradient rollout of the same image (``scorer_model=``; the
  seeds' DeiT-tiny rollout pruning ViT-B); its input resized to that model's size, its grid must match.
- ``'ltpa'`` (:class:`LTPAScorer`, :mod:`~rollout_fast.prune.cross`): a Learn to Pay Attention CNN's own
  attention (Jetley et al., ICLR 2018; ``scorer_model=``), on the image resized to its input size: the full
  image (an oracle-like cross-architecture scorer) or the students' thumbnail (a teacher-free scorer).

Sources: EViT (Liang et al. 2022) and DynamicViT (Rao et al., NeurIPS 2021) prune inside the network with
trained or attention-based selection; the seeds dropped patches before the blocks by a (student's) rollout
map (REFERENCE.md section 5). Here selection happens once, before the blocks, for any timm ViT.

In-network baselines (tokens reduced between blocks): ``reduce_tokens(model, 'tome', r=8)`` (ToMe, Bolya et al.
2023), ``reduce_tokens(model, 'evit', keep_ratio=0.7)`` (EViT off the shelf) and ``reduce_tokens(model, 'ats',
keep_ratio=1.0)`` (ATS, Fayyaz et al. ECCV 2022, training-free: an adaptive count per image), a
:func:`register_method` registry in :mod:`~rollout_fast.prune.inner`, methods in :mod:`~rollout_fast.prune.merge`,
:mod:`~rollout_fast.prune.evit` and :mod:`~rollout_fast.prune.ats`.
Ours, after a scorer: ``prune_and_reduce(model, 1.0, 'student', 'smerge', {'keep_ratio': 0.375})``, the student's
best tokens kept and the others merged into their most similar kept token before the blocks
(:mod:`~rollout_fast.prune.smerge`).

Modules: :mod:`~rollout_fast.prune.keep` (keep ratios), :mod:`~rollout_fast.prune.scorers` (scorers and
their registry), :mod:`~rollout_fast.prune.model` (:class:`TokenPruner`, :class:`PrunedViT`,
:func:`prune_tokens`), :mod:`~rollout_fast.prune.timing` (images/s), :mod:`~rollout_fast.prune.study`
(:func:`prune_eval`, the evaluation study) and :mod:`~rollout_fast.prune.report` (its tables, files, plot).
"""

from __future__ import annotations

from ..data import load_eval_data
from .ats import ATS
from .cross import LTPAScorer, ModelRolloutScorer
from .evit import EViT
from .inner import METHODS, ReducedViT, TokenReducer, method_names, reduce_tokens, register_method
from .keep import check_keep_ratio, keep_count
from .merge import ToMe
from .model import PrunedViT, TokenPruner, prune_tokens
from .report import format_table, plot_prune_eval, write_prune_eval
from .scorers import (
    SCORERS,
    ClsAttentionScorer,
    GradRolloutScorer,
    PatchScorer,
    RandomScorer,
    RolloutScorer,
    StudentScorer,
    check_scores,
    make_scorer,
    register_scorer,
    scorer_names,
)
from .smerge import ScoredMerge
from .stratify import stratified_scores
from .study import prune_eval
from .timing import measure_speedup, measure_throughput

__all__ = [
    "ATS",
    "METHODS",
    "SCORERS",
    "ClsAttentionScorer",
    "EViT",
    "GradRolloutScorer",
    "LTPAScorer",
    "ModelRolloutScorer",
    "PatchScorer",
    "PrunedViT",
    "RandomScorer",
    "ReducedViT",
    "RolloutScorer",
    "ScoredMerge",
    "StudentScorer",
    "ToMe",
    "TokenPruner",
    "TokenReducer",
    "check_keep_ratio",
    "check_scores",
    "format_table",
    "keep_count",
    "load_eval_data",
    "make_scorer",
    "measure_speedup",
    "measure_throughput",
    "method_names",
    "plot_prune_eval",
    "prune_eval",
    "prune_tokens",
    "reduce_tokens",
    "register_method",
    "register_scorer",
    "scorer_names",
    "stratified_scores",
    "write_prune_eval",
]
