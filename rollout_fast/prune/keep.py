"""Keep ratios: the fraction of patch tokens a pruned model (or a top-k recall) keeps.

Imports nothing of the package, so :mod:`rollout_fast.metrics` (top-k recall) shares this one check.
"""

from __future__ import annotations

import math

__all__ = ["check_keep_ratio", "keep_count"]


def check_keep_ratio(keep_ratio) -> float:
    """``keep_ratio`` as a float in (0, 1]; ``ValueError`` naming it otherwise (bools, NaN, 0, > 1)."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) \
            or not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def keep_count(keep_ratio: float, num_patches: int) -> int:
    """Patch tokens kept: ``round(keep_ratio * G)`` (halves round up), at least 1.

    Raises:
        ValueError: ``keep_ratio`` not a number in (0, 1].
    """
    check_keep_ratio(keep_ratio)
    return max(1, min(num_patches, math.floor(keep_ratio * num_patches + 0.5)))
