"""The input contract of attention rollout: argument checks and the checks of the attention values.

Every rollout entry point (:func:`rollout_fast.reference.attention_rollout`, the public ops
:func:`rollout_fast.ops.attention_rollout` / :func:`~rollout_fast.ops.grad_attention_rollout`) validates
through :func:`check_rollout_args`, so all backends accept and refuse the same inputs with the same messages.

Attention values (post-softmax probabilities, rows = queries):

- finite (:func:`check_attention_values`): NaN or +-inf raise ValueError;
- non-negative (:func:`check_attention_values`): a negative value raises ValueError. The rollout step
  ``M = (F + I) / rowsum(F + I)`` needs ``rowsum(F + I) >= 1`` (true for any non-negative ``F``); with
  negative entries the sum can be ~0 and the backends' different rounding turns that into different
  answers (issue 12). -0.0 is not negative;
- rows summing to 1 within :data:`ROW_SUM_TOLERANCE` of the dtype (:func:`check_row_sums`), where
  asked (``check_rows``: the public ops' default).

Scalar arguments take any real number of the right kind: Python numbers, numpy scalars and 0-d tensors
(:func:`real_scalar`, :func:`int_scalar`, :func:`bool_flag`); a bool is refused where a number is expected.
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
    "ROW_SUM_TOLERANCE",
    "RolloutArgs",
    "all_finite",
    "bool_flag",
    "check_attention_values",
    "check_grad_rollout_args",
    "check_rollout_args",
    "check_row_sums",
    "int_scalar",
    "real_scalar",
    "row_sums",
]

HEAD_FUSIONS = ("mean", "max", "min")
READOUTS = ("cls", "mean", "full")
NORMALIZATIONS = ("max", "minmax", None)

# Largest allowed |sum_j A[l, b, h, i, j] - 1| per attention dtype (the sum taken in float32, float64 for
# float64 input). The check exists to catch inputs that are not attention probabilities at all: logits or
# unnormalised scores, heads already fused by max/min, a column-stochastic (transposed) stack, dropout
# applied in training mode; all of them miss 1 by 0.1 or more. The bounds only have to stay clear of
# rounding in correctly computed softmax rows:
# - float32 / float64: 1e-3. A float32 softmax row sums to 1 within about N * 2**-24 in the worst case
#   (rounding of N exponentials and of their sum; 1.2e-5 at N = 197, 2.4e-4 at N = 4096, typically
#   sqrt(N) * 2**-24 ~ 1e-6), and the float32 sum taken here adds as much again: 1e-3 covers both up to
#   N ~ 8000 tokens, and attention stored at reduced fixed-point precision (e.g. the tests' 2**-16 grid:
#   |error| <= N * 2**-17, ~5e-4 observed at N = 577).
# - float16 / bfloat16: 1e-2. Rounding each probability to the dtype moves the row sum by at most the unit
#   roundoff times the sum, 2**-11 = 4.9e-4 (float16) or 2**-8 = 3.9e-3 (bfloat16), whether the softmax
#   ran in float32 and was cast (PyTorch's eager and SDPA paths) or ran in the low dtype; 1e-2 is 20
#   float16 and 2.5 bfloat16 roundoffs.
# The tolerance goes by the tensor's dtype: attention computed in bfloat16 (autocast) but handed over as
# float32 sums to 1 only within the bfloat16 bound (e.g. 1.0016 seen on the CIFAR-10 teacher), so it needs
# check_rows=False (the error message says so); the dtype it was computed in cannot be seen here.
ROW_SUM_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


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
    check_rows: bool = False  # rows must sum to 1 (checked by check_rollout_args, or by the backend)


# ------------------------------------------------------------------------------------------ scalars
def _describe(x) -> str:
    """A one-line description of a bad argument for an error message."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if type(x).__name__ == "ndarray":
        return f"a numpy array of shape {tuple(x.shape)} and dtype {x.dtype}"
    text = " ".join(repr(x).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _is_bool(x) -> bool:
    """A Python or numpy bool (numpy's type is ``bool_``, named ``bool`` since numpy 2)."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool"))


_NARROW_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _as_written(value: float, dtype: torch.dtype) -> float:
    """The shortest decimal that rounds to the same ``dtype`` value as ``value`` (a float32 0.9 is
    0.89999998; this gives 0.9, the number that was written)."""
    target = torch.tensor(value, dtype=dtype)
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if bool(torch.tensor(candidate, dtype=dtype) == target):
            return candidate
    return value


def real_scalar(x, name: str, what: str = "a real number") -> float:
    """``x`` as a float: any real number (int, float, numpy scalar, 0-d real tensor); bools are rejected.

    A float16/bfloat16/float32 scalar (numpy or 0-d tensor) counts as the shortest decimal that rounds to
    it: ``np.float32(0.9)`` and ``torch.tensor(0.9)`` give 0.9, like the Python float, so results such as
    the discard count ``floor(r * N * N)`` do not depend on the scalar's type.

    Raises:
        TypeError: not a real number (the message names ``name``)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_complex and x.dtype != torch.bool:
        value = float(x.item())
        narrow = x.dtype if x.dtype in _NARROW_FLOATS.values() else None
    elif _is_bool(x) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {_describe(x)}")
    else:
        value = float(x)
        narrow = _NARROW_FLOATS.get(str(getattr(x, "dtype", "")))
    return value if narrow is None or not math.isfinite(value) else _as_written(value, narrow)


def int_scalar(x, name: str) -> int:
    """``x`` as an int: any integer (int, numpy integer, 0-d integer tensor); bools are rejected.

    Raises:
        TypeError: not an integer (the message names ``name``)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return int(x.item())
    if _is_bool(x) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {_describe(x)}")
    return int(x)


def bool_flag(x, name: str) -> bool:
    """``x`` as a bool: a bool, numpy bool or 0-d bool tensor (not 0/1, strings or None).

    Raises:
        TypeError: not a bool (the message names ``name``)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.bool:
        return bool(x.item())
    if not _is_bool(x):
        raise TypeError(f"{name}: expected True or False, got {_describe(x)}")
    return bool(x)


# ---------------------------------------------------------------------------------- attention values
def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN and no +-inf: one min/max pass (NaN propagates through both), about a
    read of ``x``, where ``torch.isfinite(x).all()`` writes and reads a mask as large as ``x``."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _index(flat: int, shape) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def check_attention_values(att: torch.Tensor) -> None:
    """Refuse NaN, +-inf and negative values of ``att`` (L, B, H, N, N): one min/max pass.

    Values of float64 input beyond the float32 range count as infinite (rollout computes in float32).

    Raises:
        ValueError: ``"attentions: contains NaN or infinite values"``, checked first; else
            ``"attentions: contains negative values (...)"`` naming the first one (in memory order of
            the logical (L, B, H, N, N) index) and its position.
    """
    lo, hi = torch.aminmax(att)
    if not bool(torch.isfinite(lo.float()) & torch.isfinite(hi.float())):
        raise ValueError("attentions: contains NaN or infinite values")
    if bool(lo < 0):
        first = int(torch.argmax((att < 0).flatten().to(torch.uint8)))
        pos = _index(first, att.shape)
        raise ValueError(f"attentions: contains negative values (the first: {att[pos].item():.6g} at "
                         f"(layer, batch, head, query, key) = {pos}); rollout needs post-softmax attention "
                         "probabilities, which are >= 0")


def row_sums(att: torch.Tensor) -> torch.Tensor:
    """Row sums ``sum_j A[l, b, h, i, j]``: (L, B, H, N, N) -> (L, B, H, N), float32 (float64 for float64
    input); low-precision layers are upcast one at a time (a whole float32 copy would cost more than the
    sum)."""
    acc = torch.float64 if att.dtype == torch.float64 else torch.float32
    if att.dtype == acc:
        return att.sum(dim=-1)
    return torch.stack([layer.to(acc).sum(dim=-1) for layer in att])


def check_row_sums(att: torch.Tensor) -> None:
    """Refuse attention whose rows do not sum to 1 within ``ROW_SUM_TOLERANCE[att.dtype]``: one pass.

    Raises:
        ValueError: the errors of :func:`check_attention_values` when the input has NaN, +-inf or
            negative values (checked on failure only, so every backend reports those first), else
            ``"attentions: row (layer, batch, head, query) = (...) sums to ..."`` naming the worst row.
    """
    tol = ROW_SUM_TOLERANCE[att.dtype]
    sums = row_sums(att)
    dev = (sums - 1).abs()
    if bool(dev.amax() <= tol):  # False for NaN too
        return
    check_attention_values(att)
    pos = _index(int(torch.argmax(torch.nan_to_num(dev, nan=math.inf).flatten())), dev.shape)
    total = sums[pos].item()
    raise ValueError(f"attentions: row (layer, batch, head, query) = {pos} sums to {total:.6g}, not 1 "
                     f"(|sum - 1| > {tol:g}, the {str(att.dtype)[6:]} tolerance); rollout needs post-softmax "
                     "attention probabilities. Pass check_rows=False for non-negative weights whose rows are "
                     "not normalised (e.g. heads already fused by max or min), or for attention computed in "
                     "float16/bfloat16 and stored in a wider dtype (its rows sum to 1 within 1e-2 only)")


# ------------------------------------------------------------------------------------------ arguments
def _stack(attentions) -> torch.Tensor:
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() != 5:
            raise ValueError("attentions: expected a (L, B, H, N, N) tensor or a sequence of "
                             f"(B, H, N, N) tensors, got a tensor of shape {tuple(attentions.shape)} (one "
                             "layer: pass [attention]; one image's (L, H, N, N): attentions.unsqueeze(1))")
        return attentions
    if not isinstance(attentions, Sequence) or isinstance(attentions, (str, bytes)):
        raise TypeError("attentions: expected a tensor or a sequence (list/tuple) of tensors, got "
                        f"{type(attentions).__name__}")
    if len(attentions) == 0:
        raise ValueError("attentions: the sequence is empty (need at least one layer). Hugging Face models "
                         "return an empty tuple for outputs.attentions when they run SDPA attention: load the "
                         "model with attn_implementation=\"eager\", or use rollout_fast.AttentionRollout, "
                         "which captures the attention from any attention implementation")
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


def _check_grid(grid, G: int, N: int, P: int) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid: expected (gh, gw), two positive ints, got {_describe(grid)}")
    gh, gw = (int_scalar(g, "grid") for g in grid)
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid: expected (gh, gw), two positive ints, got {(gh, gw)}")
    if gh * gw != G:
        raise ValueError(f"grid: {(gh, gw)} holds {gh * gw} patches but N - num_prefix_tokens = {N} - {P} = {G}")
    return gh, gw


def _patch_grid(grid, readout: str, N: int, P: int) -> tuple[int, int] | None:
    G = N - P
    if readout == "full":
        if grid is not None:
            _check_grid(grid, G, N, P)
        return None
    if grid is not None:
        return _check_grid(grid, G, N, P)
    side = math.isqrt(G)
    if side * side != G:
        raise ValueError(f"grid: N - num_prefix_tokens = {N} - {P} = {G} patch tokens is not a square number; "
                         "pass grid=(gh, gw)")
    return side, side


def check_rollout_args(attentions, *, head_fusion="mean", discard_ratio=0.0, num_prefix_tokens=1,
                       grid=None, readout="cls", normalize="max", protect_prefix=True, check_rows=False,
                       check_values=True) -> RolloutArgs:
    """Validate the arguments of :func:`rollout_fast.reference.attention_rollout`; return them normalised.

    The grid is inferred as square when ``grid`` is None and the readout is not 'full'. With
    ``check_values`` the attention is checked too (:func:`check_attention_values`, and with
    ``check_rows`` :func:`check_row_sums`); without, the caller (or its backend) checks it.

    Raises:
        TypeError: ``attentions`` is not a tensor / sequence of tensors, or not floating point; a scalar
            argument of the wrong type (``discard_ratio`` not a real number, ``num_prefix_tokens`` or a
            ``grid`` entry not an integer, ``protect_prefix`` / ``check_rows`` not a bool).
        ValueError: wrong rank or shape, an empty sequence (Hugging Face under SDPA: the message says
            what to do), non-square attention, ``N - P`` not matching ``grid``, ``discard_ratio``
            outside [0, 1), unknown ``head_fusion``/``readout``/``normalize``, ``num_prefix_tokens``
            outside [0, N), readout 'cls' without a prefix token; NaN/inf or negative attention values,
            rows not summing to 1 (``check_rows``).
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
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {_describe(head_fusion)}")
    if readout not in READOUTS:
        raise ValueError(f"readout: expected one of {READOUTS}, got {_describe(readout)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {_describe(normalize)}")
    discard_ratio = real_scalar(discard_ratio, "discard_ratio", "a float in [0, 1)")
    if not (0.0 <= discard_ratio < 1.0):
        raise ValueError(f"discard_ratio: expected a value in [0, 1), got {discard_ratio}")
    num_prefix_tokens = int_scalar(num_prefix_tokens, "num_prefix_tokens")
    if not (0 <= num_prefix_tokens < N):
        raise ValueError(f"num_prefix_tokens: expected 0 <= P < N = {N}, got {num_prefix_tokens}")
    if readout == "cls" and num_prefix_tokens < 1:
        raise ValueError("readout: 'cls' needs a class token (num_prefix_tokens >= 1); "
                         "use readout='mean' for models without one")
    grid_t = _patch_grid(grid, readout, N, num_prefix_tokens)
    args = RolloutArgs(att, head_fusion, discard_ratio, num_prefix_tokens, grid_t, readout, normalize,
                       bool_flag(protect_prefix, "protect_prefix"), bool_flag(check_rows, "check_rows"))
    if check_values:
        check_attention_values(att)
        if args.check_rows:
            check_row_sums(att)
    return args


def check_grad_rollout_args(attentions, gradients, *, discard_ratio=0.0, num_prefix_tokens=1, grid=None,
                            readout="cls", normalize="max", check_rows=False,
                            check_values=True) -> tuple[RolloutArgs, torch.Tensor]:
    """Validate the arguments of :func:`rollout_fast.reference.grad_rollout`; return the attention's
    :class:`RolloutArgs` (head fusion 'mean', ``protect_prefix=False``) and the gradients as one
    (L, B, H, N, N) tensor. ``check_rows`` / ``check_values`` apply to the attention (as in
    :func:`check_rollout_args`), never to the gradients, which may have any sign.

    Raises:
        TypeError: ``gradients`` not a tensor / sequence of tensors, or not floating point; and the
            errors of :func:`check_rollout_args` for ``attentions`` and the other arguments.
        ValueError: ``gradients`` of another shape or device than ``attentions``, or non-finite.
    """
    args = check_rollout_args(attentions, head_fusion="mean", discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=False, check_rows=check_rows,
                              check_values=check_values)
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
        if len(gradients) == 0:
            raise ValueError("gradients: the sequence is empty")
        grads = torch.stack([g.to(gradients[0].dtype) for g in gradients])
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
    if not all_finite(grads):
        raise ValueError("gradients: contains NaN or infinite values")
    return args, grads
