"""The fused top-k token gather in plain PyTorch: the specification every gather backend is tested against.

Semantics (REFERENCE.md section 6; :func:`rollout_fast.ops.topk_gather` validates and dispatches):

- ``tokens``: ``(B, N, D)`` float16|bfloat16|float32|float64, the token sequence with ``P`` prefix tokens
  (class, distillation, register) first and ``G = N - P`` patch tokens after them.
- ``scores``: ``(B, G)`` floating point, one score per patch token (larger = keep); compared in float32.
- Selection: the ``k`` patches with the largest scores, ``1 <= k <= G``. Ties: the LOWER patch index
  wins. ``-0.0`` equals ``+0.0``. NaN would order by its bit pattern in the op; the public op rejects
  non-finite scores.
- Result: ``kept`` ``(B, P + k, D)`` in the tokens' dtype (contiguous): the P prefix tokens unchanged,
  then the kept patch tokens in ascending patch order (so ``k = G`` returns the input unchanged);
  ``indices`` ``(B, k)`` int64, the kept patch indices in ``[0, G)``, ascending.

This module imports nothing else from the package.
"""

from __future__ import annotations

import torch

__all__ = ["score_keys", "topk_gather_reference"]


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, G)`` keys that order like float32 ``scores`` with ties broken by lower index.

    ``key = s * 2**32 + (2**32 - 1 - i)`` with ``s`` the signed 32-bit order key of the float32 score
    (``-0`` mapped to ``+0``; csrc/common/gather_common.h's order): keys are distinct, a larger score gives
    a larger key, and among equal scores the lower index ``i`` gives the larger key.
    """
    s = scores.to(torch.float32)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0 -> +0
    bits = s.view(torch.int32).to(torch.int64)
    signed = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving signed key (two's complement)
    idx = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return signed * (1 << 32) + ((1 << 32) - 1 - idx)


def topk_gather_reference(tokens: torch.Tensor, scores: torch.Tensor, k: int,
                          num_prefix_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`rollout_fast.topk_gather` in plain PyTorch: ``torch.topk`` + ``torch.gather``.

    ``torch.topk`` runs on :func:`score_keys` (distinct keys, so its own tie order never matters), the
    winners are sorted by index and gathered after the prefix tokens. Shapes, dtypes and the tie rule:
    see the module docstring. No validation beyond what torch does (use :func:`rollout_fast.topk_gather`).
    """
    P = int(num_prefix_tokens)
    _, idx = torch.topk(score_keys(scores), int(k), dim=1, largest=True, sorted=False)
    idx = idx.sort(dim=1).values
    patches = tokens[:, P:]
    kept = torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :P], kept], dim=1).contiguous(), idx
