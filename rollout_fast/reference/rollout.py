"""Attention rollout in plain PyTorch: the specification every backend is tested against.

Method: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020), with the head fusion
and discard-ratio refinements popularised by jacobgil/vit-explain, and that project's defects fixed
(keepdim row normalisation, per-sample discard, any number of prefix tokens, any patch grid).
The steps follow section 1 of REFERENCE.md:

1. head fusion  ``F_l = mean|max|min over heads of A_l``                      (B, N, N)
2. discard      ``k = floor(r * N * N)``; if ``k >= 1`` the per-sample threshold ``t_b`` is the
                (k+1)-th smallest entry of ``F_l[b]``; entries strictly below ``t_b`` become 0 (ties
                at ``t_b`` survive); ``F_l[b, 0, 0]`` is protected unless switched off
3. residual     ``M_l = (F_l + I) / rowsum(F_l + I)`` (sum over the last axis, keepdim)
4. rollout      ``R = M_L @ ... @ M_1``                                        (B, N, N)
5. readout      'cls': ``R[:, 0, P:]``; 'mean': mean over rows ``P..N-1`` of ``R[:, i, P:]``; 'full': R
6. per-sample normalisation of the (B, gh, gw) map: 'max', 'minmax' or None (an all-zero map stays 0)

Section 2 (class-specific gradient rollout, :func:`grad_rollout`): per layer
``F_l = relu(mean over heads of A_l * G_l)`` with ``G_l = dy/dA_l``, then steps 2-6 with readout 'cls'
and ``F_l[b, 0, 0]`` not protected from the discard.

Input contract (:mod:`.rollout_args`, shared by every entry point and backend): finite, non-negative
attention (then ``rowsum(F_l + I) >= 1`` and step 3 is well defined); rows summing to 1 within the
dtype's tolerance where asked (``check_rows``: the public ops' default; off here, because the
specification is defined for any non-negative weights, e.g. the gradient-weighted ones of section 2).

Everything is computed in float32 whatever the input dtype. Slow on purpose and obviously correct;
this module imports nothing else from the package (:mod:`rollout_fast.reference` re-exports it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .rollout_args import (
    HEAD_FUSIONS,
    NORMALIZATIONS,
    READOUTS,
    ROW_SUM_TOLERANCE,
    RolloutArgs,
    all_finite,
    bool_flag,
    check_attention_values,
    check_grad_rollout_args,
    check_rollout_args,
    check_row_sums,
    int_scalar,
    real_scalar,
    row_sums,
)

__all__ = [
    "HEAD_FUSIONS",
    "NORMALIZATIONS",
    "READOUTS",
    "ROW_SUM_TOLERANCE",
    "RolloutArgs",
    "all_finite",
    "attention_rollout",
    "bool_flag",
    "check_attention_values",
    "check_grad_rollout_args",
    "check_rollout_args",
    "check_row_sums",
    "discard_lowest",
    "fuse_heads",
    "grad_fuse_heads",
    "grad_rollout",
    "int_scalar",
    "normalize_maps",
    "readout_map",
    "real_scalar",
    "residual_normalize",
    "rollout_matrix",
    "row_sums",
]


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Head fusion: (B, H, N, N) -> (B, N, N) float32 by mean, max or min over heads."""
    a = attention.float()
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    if head_fusion == "min":
        return a.amin(dim=1)
    raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, discard_ratio: float, protect_first: bool = True) -> torch.Tensor:
    """Discard-ratio thresholding, per sample: (B, N, N) -> (B, N, N), a new tensor.

    ``k = floor(discard_ratio * N * N)``; if ``k >= 1``, entries strictly below the (k+1)-th smallest
    entry of each sample (duplicates counted) become 0. With ``protect_first`` the entry [b, 0, 0] keeps
    its value.
    """
    B, N, _ = fused.shape
    k = math.floor(discard_ratio * N * N)
    out = fused.clone()
    if k < 1:
        return out
    flat = out.reshape(B, N * N)
    threshold = flat.kthvalue(k + 1, dim=1, keepdim=True).values  # (B, 1)
    keep0 = flat[:, 0].clone()
    flat.masked_fill_(flat < threshold, 0.0)
    if protect_first:
        flat[:, 0] = keep0
    return out


def residual_normalize(fused: torch.Tensor) -> torch.Tensor:
    """Residual and row normalisation: M = (F + I) / rowsum(F + I), (B, N, N) -> (B, N, N)."""
    N = fused.shape[-1]
    m = fused + torch.eye(N, dtype=fused.dtype, device=fused.device)
    return m / m.sum(dim=-1, keepdim=True)


def rollout_matrix(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rollout product R = M_L @ ... @ M_1 of per-layer (B, N, N) matrices (M_1 first in ``mats``)."""
    result = torch.eye(mats[0].shape[-1], dtype=mats[0].dtype, device=mats[0].device).expand_as(mats[0])
    for m in mats:
        result = torch.matmul(m, result)
    return result


def readout_map(rollout: torch.Tensor, readout: str, num_prefix_tokens: int) -> torch.Tensor:
    """Readout of the patch scores from R (B, N, N): 'cls' -> R[:, 0, P:], 'mean' -> mean of rows P.."""
    P = num_prefix_tokens
    if readout == "cls":
        return rollout[:, 0, P:]
    if readout == "mean":
        return rollout[:, P:, P:].mean(dim=1)
    raise ValueError(f"readout: expected 'cls' or 'mean' here, got {readout!r}")


def normalize_maps(maps: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """Per-sample normalisation of (B, ...) maps: 'max', 'minmax' or None; all-zero maps stay 0."""
    if normalize is None:
        return maps
    flat = maps.reshape(maps.shape[0], -1)
    hi = flat.amax(dim=1, keepdim=True)
    if normalize == "max":
        out = torch.where(hi > 0, flat / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.zeros_like(flat))
    elif normalize == "minmax":
        lo = flat.amin(dim=1, keepdim=True)
        span = hi - lo
        out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                          torch.zeros_like(flat))
    else:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    return out.reshape(maps.shape)


def attention_rollout(attentions, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1, grid: tuple[int, int] | None = None,
                      readout: str = "cls", normalize: str | None = "max",
                      protect_prefix: bool = True, check_rows: bool = False) -> torch.Tensor:
    """Attention rollout of a ViT's per-layer attention (reference implementation).

    Args:
        attentions: a non-empty sequence of ``L`` tensors ``(B, H, N, N)`` (e.g. the tuple Hugging Face
            returns with ``output_attentions=True``), or one 5-D ``(L, B, H, N, N)`` tensor (layers
            first); post-softmax attention (finite, >= 0), rows are queries, layers in forward order;
            float16/bfloat16/float32/float64, any device.
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction r in [0, 1) of each fused matrix's N*N entries to discard per sample
            (the k = floor(r N^2) smallest, ties at the threshold kept).
        num_prefix_tokens: P, tokens before the patch tokens (class, distillation, register tokens).
        grid: (gh, gw) patch grid with gh * gw = N - P; inferred as square when None.
        readout: 'cls' (row of the first prefix token), 'mean' (mean over patch-token rows, for
            models without a class token) or 'full' (the whole rollout matrix).
        normalize: per-sample 'max' (m / max m), 'minmax' or None; not applied to 'full'.
        protect_prefix: keep F[b, 0, 0] (first prefix token's self-attention) out of the discard.
        check_rows: also refuse rows that do not sum to 1 within ``ROW_SUM_TOLERANCE[dtype]``
            (:func:`check_row_sums`; the public op's default is True).

    Returns:
        float32 ``(B, gh, gw)`` maps, or ``(B, N, N)`` rollout matrices for readout 'full', on the
        input's device.

    Raises:
        TypeError, ValueError: see :func:`check_rollout_args` (among them NaN/inf or negative values).

    Source: Abnar & Zuidema 2020; head fusion and discard ratio from jacobgil/vit-explain.
    """
    args = check_rollout_args(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=protect_prefix, check_rows=check_rows)
    protect = args.protect_prefix and args.num_prefix_tokens >= 1
    mats = []
    for layer in args.attentions:
        fused = fuse_heads(layer, args.head_fusion)
        fused = discard_lowest(fused, args.discard_ratio, protect_first=protect)
        mats.append(residual_normalize(fused))
    rollout = rollout_matrix(mats)
    if args.readout == "full":
        return rollout
    maps = readout_map(rollout, args.readout, args.num_prefix_tokens)
    maps = maps.reshape(maps.shape[0], *args.grid)
    return normalize_maps(maps, args.normalize)


# --------------------------------------------------------------------- section 2: gradient rollout
def grad_fuse_heads(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted head fusion: (B, H, N, N) x2 -> float32 (B, N, N), ``relu(mean_h(A * G))``.

    Negative entries (and -0.0) become +0.0, as vit-explain's ``fused[fused < 0] = 0`` up to the sign of
    zero.
    """
    fused = (attention.float() * gradient.float()).mean(dim=1)
    return torch.where(fused > 0, fused, torch.zeros_like(fused))


def grad_rollout(attentions, gradients, *, discard_ratio: float = 0.0, num_prefix_tokens: int = 1,
                 grid: tuple[int, int] | None = None, readout: str = "cls",
                 normalize: str | None = "max", check_rows: bool = False) -> torch.Tensor:
    """Class-specific gradient rollout (REFERENCE.md section 2), reference implementation.

    Per layer ``F_l = relu(mean_h(A_l * G_l))`` (:func:`grad_fuse_heads`), then the discard (k = floor(r N^2)
    per sample, ties kept, ``F_l[b, 0, 0]`` *not* protected, as in vit-explain's gradient variant), residual
    and row normalisation, the product ``R = M_L ... M_1``, the readout and the per-sample normalisation
    of :func:`attention_rollout`.

    Args:
        attentions: ``L`` tensors (B, H, N, N) or one (L, B, H, N, N): post-softmax attention ``A_l``, rows
            are queries, layers in forward order (finite, >= 0); float16/bfloat16/float32/float64.
        gradients: ``G_l = dy/dA_l`` in the same layout and layer order as ``attentions`` (layer ``l``'s
            gradient beside layer ``l``'s attention; vit-explain pairs layer i with gradient L-1-i).
        discard_ratio, num_prefix_tokens, grid, normalize: as :func:`attention_rollout`.
        readout: 'cls' (the method's readout, default), 'mean' or 'full'.
        check_rows: refuse attention rows that do not sum to 1 (:func:`check_row_sums`); applied to
            ``attentions`` only, never to the gradient-weighted ``F_l``.

    Returns:
        float32 (B, gh, gw) maps, or (B, N, N) for readout 'full'.

    Raises:
        TypeError, ValueError: see :func:`check_grad_rollout_args`.

    Source: jacobgil/vit-explain ``grad_rollout`` (class-specific rollout), after Abnar & Zuidema 2020.
    """
    args, grads = check_grad_rollout_args(attentions, gradients, discard_ratio=discard_ratio,
                                          num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                                          normalize=normalize, check_rows=check_rows)
    fused = torch.stack([grad_fuse_heads(a, g) for a, g in zip(args.attentions, grads)])
    return attention_rollout(fused.unsqueeze(2), head_fusion="mean", discard_ratio=args.discard_ratio,
                             num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
                             normalize=args.normalize, protect_prefix=False)
