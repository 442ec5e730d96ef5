"""The specifications, in plain PyTorch: every backend is tested against these. Imports nothing else from
the package.

- :mod:`.rollout`: attention rollout and class-specific gradient rollout (REFERENCE.md sections 1-2)
  (re-exported here: ``rollout_fast.reference.attention_rollout`` and friends);
- :mod:`.rollout_args`: the rollout input contract, the argument and attention-value checks every rollout
  entry point and backend shares (finite, non-negative, rows summing to 1).
- :mod:`.gather`: the fused top-k token gather (REFERENCE.md section 6).
- :mod:`.attention`: attention output together with its head-fused probabilities.
"""

from __future__ import annotations

from .attention import additive_mask, attention_probs, fuse_probs, fused_attention_reference
from .gather import score_keys, topk_gather_reference
from .rollout import (
    HEAD_FUSIONS,
    NORMALIZATIONS,
    READOUTS,
    ROW_SUM_TOLERANCE,
    RolloutArgs,
    all_finite,
    attention_rollout,
    check_attention_values,
    check_grad_rollout_args,
    check_rollout_args,
    check_row_sums,
    discard_lowest,
    fuse_heads,
    grad_fuse_heads,
    grad_rollout,
    normalize_maps,
    readout_map,
    residual_normalize,
    rollout_matrix,
)

__all__ = [
    "HEAD_FUSIONS",
    "NORMALIZATIONS",
    "READOUTS",
    "ROW_SUM_TOLERANCE",
    "RolloutArgs",
    "additive_mask",
    "all_finite",
    "attention_probs",
    "attention_rollout",
    "check_attention_values",
    "check_grad_rollout_args",
    "check_rollout_args",
    "check_row_sums",
    "discard_lowest",
    "fuse_heads",
    "fuse_probs",
    "fused_attention_reference",
    "grad_fuse_heads",
    "grad_rollout",
    "normalize_maps",
    "readout_map",
    "residual_normalize",
    "rollout_matrix",
    "score_keys",
    "topk_gather_reference",
]
