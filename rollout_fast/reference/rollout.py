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

Everything is computed in float32 whatever the input dtype. Slow on purpose and obviously correct;
this module imports nothing else from the package (:mod:`rollout_fast.reference` re-exports it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "HEAD_FUSIONS",
    "NORMALIZATIONS",
    "READOUTS",
    "RolloutArgs",
    "all_finite",
    "attention_rollout",
    "check_grad_rollout_args",
    "check_rollout_args",
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
]

HEAD_FUSIONS = ("mean", "max", "min")
READOUTS = ("cls", "mean", "full")
NORMALIZATIONS = ("max", "minmax", None)


class RolloutArgs(NamedTuple):
    """Validated arguments of a rollout call (see :func:`check_rollout_args`)."""

    attentions: torch.Tensor  # (L, B, H, N, N), the caller's dtype and device, maybe non-contiguous
    head_fusion: str
    discard_ratio: float
    num_prefix_tokens: int
    grid: tuple[int, int] | None  # None for readout 'full'
    readout: str
    normalize: str | None
    protect_prefix: bool


def _stack(attentions) -> torch.Tensor:
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() != 5:
            raise ValueError("attentions: expected a (L, B, H, N, N) tensor or a sequence of "
                             f"(B, H, N, N) tensors, got a tensor of shape {tuple(attentions.shape)}")
        return attentions
    if not isinstance(attentions, Sequence) or isinstance(attentions, (str, bytes)):
        raise TypeError("attentions: expected a tensor or a sequence (list/tuple) of tensors, got "
                        f"{type(attentions).__name__}")
    if len(attentions) == 0:
        raise ValueError("attentions: the sequence is empty (need at least one layer). Hugging Face models "
                         "return an empty tuple for output_attentions under SDPA: load the model with "
                         "attn_implementation='eager', or use rollout_fast.AttentionRollout on a timm model")
    for i, a in enumerate(attentions):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"attentions[{i}]: expected a tensor, got {type(a).__name__}")
        if a.dim() != 4:
            raise ValueError(f"attentions[{i}]: expected shape (B, H, N, N), got {tuple(a.shape)}")
        if a.shape != attentions[0].shape:
            raise ValueError(f"attentions[{i}]: shape {tuple(a.shape)} differs from attentions[0]'s "
                             f"{tuple(attentions[0].shape)}")
        if a.device != attentions[0].device:
            raise ValueError(f"attentions[{i}]: on {a.device}, attentions[0] on {attentions[0].device}")
        if a.dtype != attentions[0].dtype:
            raise ValueError(f"attentions[{i}]: dtype {a.dtype} differs from attentions[0]'s "
                             f"{attentions[0].dtype}")
    return torch.stack(list(attentions))


def check_rollout_args(attentions, *, head_fusion="mean", discard_ratio=0.0, num_prefix_tokens=1,
                       grid=None, readout="cls", normalize="max", protect_prefix=True,
                       check_finite=True) -> RolloutArgs:
    """Validate the arguments of :func:`attention_rollout`; return them normalised.

    The grid is inferred as square when ``grid`` is None and the readout is not 'full'.

    Raises:
        TypeError: ``attentions`` is not a tensor / sequence of tensors, or not floating point.
        ValueError: wrong rank or shape, non-square attention, ``N - P`` not matching ``grid``,
            ``discard_ratio`` outside [0, 1), unknown ``head_fusion``/``readout``/``normalize``,
            ``num_prefix_tokens`` outside [0, N), readout 'cls' without a prefix token, or
            non-finite attention values.
    """
    att = _stack(attentions)
    if not att.is_floating_point():
        raise TypeError(f"attentions: expected a floating-point dtype, got {att.dtype}")
    L, B, H, N, N2 = att.shape
    if N != N2:
        raise ValueError(f"attentions: the last two dimensions must be equal (N, N), got ({N}, {N2})")
    if min(L, B, H, N) == 0:
        raise ValueError(f"attentions: empty dimension in shape (L, B, H, N, N) = {tuple(att.shape)}")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if readout not in READOUTS:
        raise ValueError(f"readout: expected one of {READOUTS}, got {readout!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    discard_ratio = real_scalar(discard_ratio, "discard_ratio", "a float in [0, 1)")
    if not (0.0 <= discard_ratio < 1.0):
        raise ValueError(f"discard_ratio: expected a value in [0, 1), got {discard_ratio}")
    num_prefix_tokens = int_scalar(num_prefix_tokens, "num_prefix_tokens")
    if not (0 <= num_prefix_tokens < N):
        raise ValueError(f"num_prefix_tokens: expected 0 <= P < N = {N}, got {num_prefix_tokens}")
    if readout == "cls" and num_prefix_tokens < 1:
        raise ValueError("readout: 'cls' needs a class token (num_prefix_tokens >= 1); "
                         "use readout='mean' for models without one")
    G = N - num_prefix_tokens
    if readout == "full":
        if grid is not None:
            _check_grid(grid, G, N, num_prefix_tokens)
        grid_t = None
    elif grid is None:
        side = math.isqrt(G)
        if side * side != G:
            raise ValueError(f"grid: N - num_prefix_tokens = {N} - {num_prefix_tokens} = {G} patch "
                             "tokens is not a square number; pass grid=(gh, gw)")
        grid_t = (side, side)
    else:
        grid_t = _check_grid(grid, G, N, num_prefix_tokens)
    if check_finite and not all_finite(att):
        raise ValueError("attentions: contains NaN or infinite values")
    return RolloutArgs(att, head_fusion, float(discard_ratio), num_prefix_tokens, grid_t, readout,
                       normalize, bool(protect_prefix))


def real_scalar(x, name: str, what: str = "a real number") -> float:
    """``x`` as a float: any real number (int, float, numpy scalar, 0-d real tensor); bools are rejected.

    Raises:
        TypeError: not a real number."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_complex and x.dtype != torch.bool:
        return float(x.item())
    if isinstance(x, bool) or type(x).__name__ == "bool_" or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {x!r}")
    return float(x)


def int_scalar(x, name: str) -> int:
    """``x`` as an int: any integer (int, numpy integer, 0-d integer tensor); bools are rejected.

    Raises:
        TypeError: not an integer."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return int(x.item())
    if isinstance(x, bool) or type(x).__name__ == "bool_" or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {x!r}")
    return int(x)


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN and no +-inf: one min/max pass (NaN propagates through both), about a
    read of ``x``, where ``torch.isfinite(x).all()`` writes and reads a mask as large as ``x``."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_grid(grid, G: int, N: int, P: int) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid: expected (gh, gw), two positive ints, got {grid!r}")
    if grid[0] * grid[1] != G:
        raise ValueError(f"grid: {tuple(grid)} holds {grid[0] * grid[1]} patches but N - "
                         f"num_prefix_tokens = {N} - {P} = {G}")
    return int(grid[0]), int(grid[1])


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
                      protect_prefix: bool = True) -> torch.Tensor:
    """Attention rollout of a ViT's per-layer attention (reference implementation).

    Args:
        attentions: ``L`` tensors ``(B, H, N, N)`` (e.g. the tuple Hugging Face returns with
            ``output_attentions=True``), or one ``(L, B, H, N, N)`` tensor; post-softmax attention,
            rows are queries, layers in forward order; float16/bfloat16/float32/float64, any device.
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction r in [0, 1) of each fused matrix's N*N entries to discard per sample
            (the k = floor(r N^2) smallest, ties at the threshold kept).
        num_prefix_tokens: P, tokens before the patch tokens (class, distillation, register tokens).
        grid: (gh, gw) patch grid with gh * gw = N - P; inferred as square when None.
        readout: 'cls' (row of the first prefix token), 'mean' (mean over patch-token rows, for
            models without a class token) or 'full' (the whole rollout matrix).
        normalize: per-sample 'max' (m / max m), 'minmax' or None; not applied to 'full'.
        protect_prefix: keep F[b, 0, 0] (first prefix token's self-attention) out of the discard.

    Returns:
        float32 ``(B, gh, gw)`` maps, or ``(B, N, N)`` rollout matrices for readout 'full', on the
        input's device.

    Raises:
        TypeError, ValueError: see :func:`check_rollout_args`.

    Source: Abnar & Zuidema 2020; head fusion and discard ratio from jacobgil/vit-explain.
    """
    args = check_rollout_args(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=protect_prefix)
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


def check_grad_rollout_args(attentions, gradients, *, discard_ratio=0.0, num_prefix_tokens=1, grid=None,
                            readout="cls", normalize="max") -> tuple[RolloutArgs, torch.Tensor]:
    """Validate the arguments of :func:`grad_rollout`; return the attention's :class:`RolloutArgs`
    (head fusion 'mean', ``protect_prefix=False``) and the gradients as one (L, B, H, N, N) tensor.

    Raises:
        TypeError: ``gradients`` not a tensor / sequence of tensors, or not floating point; and the
            errors of :func:`check_rollout_args` for ``attentions`` and the other arguments.
        ValueError: ``gradients`` of another shape or device than ``attentions``, or non-finite.
    """
    args = check_rollout_args(attentions, head_fusion="mean", discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=False)
    if isinstance(gradients, torch.Tensor):
        grads = gradients
    elif isinstance(gradients, Sequence) and not isinstance(gradients, (str, bytes)):
        for i, g in enumerate(gradients):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"gradients[{i}]: expected a tensor, got {type(g).__name__}")
            if g.shape != args.attentions.shape[1:]:
                raise ValueError(f"gradients[{i}]: shape {tuple(g.shape)} differs from the attention's "
                                 f"{tuple(args.attentions.shape[1:])}")
            if g.device != args.attentions.device:
                raise ValueError(f"gradients[{i}]: on {g.device}, attentions on {args.attentions.device}")
        grads = torch.stack([g.to(gradients[0].dtype) for g in gradients]) if len(gradients) else None
        if grads is None:
            raise ValueError("gradients: the sequence is empty")
    else:
        raise TypeError("gradients: expected a tensor or a sequence (list/tuple) of tensors, got "
                        f"{type(gradients).__name__}")
    if not grads.is_floating_point():
        raise TypeError(f"gradients: expected a floating-point dtype, got {grads.dtype}")
    if grads.shape != args.attentions.shape:
        raise ValueError(f"gradients: shape {tuple(grads.shape)} differs from attentions' "
                         f"{tuple(args.attentions.shape)} (one gradient per attention, same layout)")
    if grads.device != args.attentions.device:
        raise ValueError(f"gradients: on {grads.device}, attentions on {args.attentions.device}")
    if not bool(torch.isfinite(grads).all()):
        raise ValueError("gradients: contains NaN or infinite values")
    return args, grads


def grad_rollout(attentions, gradients, *, discard_ratio: float = 0.0, num_prefix_tokens: int = 1,
                 grid: tuple[int, int] | None = None, readout: str = "cls",
                 normalize: str | None = "max") -> torch.Tensor:
    """Class-specific gradient rollout (REFERENCE.md section 2), reference implementation.

    Per layer ``F_l = relu(mean_h(A_l * G_l))`` (:func:`grad_fuse_heads`), then the discard (k = floor(r N^2)
    per sample, ties kept, ``F_l[b, 0, 0]`` *not* protected, as in vit-explain's gradient variant), residual
    and row normalisation, the product ``R = M_L ... M_1``, the readout and the per-sample normalisation
    of :func:`attention_rollout`.

    Args:
        attentions: ``L`` tensors (B, H, N, N) or one (L, B, H, N, N): post-softmax attention ``A_l``, rows
            are queries, layers in forward order; float16/bfloat16/float32/float64.
        gradients: ``G_l = dy/dA_l`` in the same layout and layer order as ``attentions`` (layer ``l``'s
            gradient beside layer ``l``'s attention; vit-explain pairs layer i with gradient L-1-i).
        discard_ratio, num_prefix_tokens, grid, normalize: as :func:`attention_rollout`.
        readout: 'cls' (the method's readout, default), 'mean' or 'full'.

    Returns:
        float32 (B, gh, gw) maps, or (B, N, N) for readout 'full'.

    Raises:
        TypeError, ValueError: see :func:`check_grad_rollout_args`.

    Source: jacobgil/vit-explain ``grad_rollout`` (class-specific rollout), after Abnar & Zuidema 2020.
    """
    args, grads = check_grad_rollout_args(attentions, gradients, discard_ratio=discard_ratio,
                                          num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                                          normalize=normalize)
    fused = torch.stack([grad_fuse_heads(a, g) for a, g in zip(args.attentions, grads)])
    return attention_rollout(fused.unsqueeze(2), head_fusion="mean", discard_ratio=args.discard_ratio,
                             num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
                             normalize=args.normalize, protect_prefix=False)
