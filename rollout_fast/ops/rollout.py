"""The public attention-rollout ops: validate once, pick a backend from the registry, run it.

Backends of the op "rollout" (:mod:`rollout_fast.ops.registry`), each taking the validated
:class:`rollout_fast.reference.RolloutArgs` and returning float32 ``(B, gh, gw)`` maps, or ``(B, N, N)``
for readout 'full', on the input's device, with the semantics of
:func:`rollout_fast.reference.attention_rollout`:

- "reference": :func:`rollout_fast.reference.attention_rollout` (plain PyTorch), always available;
- "cpu" / "cuda": ``torch.ops.rollout_fast.rollout`` from the compiled extension ``rollout_fast._C``
  (C++ kernel on CPU tensors, CUDA kernels on CUDA tensors; ``csrc/``);
- "triton": ``torch.ops.rollout_fast.rollout_triton`` (:mod:`rollout_fast.triton.rollout`), on CUDA
  tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter: slow, for tests).

The input contract (finite, non-negative attention; rows summing to 1 unless ``check_rows=False``) is
checked once per call, with the reference's messages (:mod:`rollout_fast.reference.rollout_args`), so every
backend accepts the same inputs. A backend that checks during its own read of the input says so in the
registry (``checks_values`` / ``checks_rows``: the C++ CPU kernel, both) and the op skips that separate pass;
for the others the op runs it in Python (a min/max pass; a row-sum pass).
"""

from __future__ import annotations

import torch

from .. import reference
from ..reference import RolloutArgs, check_rollout_args
from . import _ext, meta, registry
from .registry import Backend

__all__ = ["BACKENDS", "attention_rollout", "available_backends", "grad_attention_rollout"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_OP = "rollout"
_KERNEL_VALUE_ERROR = "rollout_fast: attentions contains"  # the CPU kernel's contract errors (values, rows)
_KERNEL_ROW_ERROR = "rollout_fast: attentions contains a row that does not sum to 1"


# -------------------------------------------------------------------------------------------- backends
def _run_reference(args: RolloutArgs) -> torch.Tensor:
    # checks the values itself (checks_values); rows were checked by the op
    return reference.attention_rollout(
        args.attentions, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
        num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
        normalize=args.normalize, protect_prefix=args.protect_prefix, check_rows=False)


def _finish(out: torch.Tensor, args: RolloutArgs) -> torch.Tensor:
    if args.readout == "full":
        return out
    return out.reshape(out.shape[0], *args.grid)


def kernel_row_tolerance(dtype: torch.dtype, n_tokens: int) -> float | None:
    """The tolerance the CPU kernel checks its float32 row sums against: ``ROW_SUM_TOLERANCE[dtype]`` less
    ``N * 2**-22``, so that every row the kernel accepts, :func:`rollout_fast.reference.check_row_sums`
    accepts too. Each of the two float32 sums of N non-negative terms (the kernel's, in its own order, of
    values rounded to float32; the reference's) is within about ``N * 2**-24 * sum`` of the exact sum, so
    they differ by less than ``2 * N * 2**-24 * 1.01``, half the margin. None when the margin would take
    more than half the tolerance (N > 2097 tokens for float32, 20971 for float16/bfloat16): then the op
    checks the rows in Python instead."""
    tol = reference.ROW_SUM_TOLERANCE[dtype]
    margin = n_tokens * 2.0 ** -22
    return tol - margin if margin <= tol / 2 else None


def _compiled_op(args: RolloutArgs, row_tolerance: float | None) -> torch.Tensor:
    return torch.ops.rollout_fast.rollout(args.attentions, args.head_fusion, args.discard_ratio,
                                          args.num_prefix_tokens, args.protect_prefix, args.readout,
                                          args.normalize, row_tolerance)


def run_compiled(args: RolloutArgs) -> torch.Tensor:
    """Rollout with the C++/CUDA kernels of ``rollout_fast._C`` (the tensor's device picks which).

    On CPU tensors the kernel checks the input contract during its single read of the attention: NaN/inf
    and negative values, and with ``args.check_rows`` the row sums (against :func:`kernel_row_tolerance`;
    for more tokens than that allows, one Python pass first). When it finds a violation, the reference's
    checks run on that error path only, for the reference's message; a row the kernel refused within the
    rounding margin of the tolerance but the reference accepts makes the op run again without the row check
    (the backends then accept exactly the same inputs). The CUDA kernels check nothing: the op checks in
    Python first (and with ``args.check_rows``, this function does).

    Raises:
        ValueError: NaN, infinite or negative attention values, rows not summing to 1 (``check_rows``), with
            the reference's messages.
        RuntimeError: the extension is not built (the message says how to build it), or a CUDA
            launch failed.
    """
    _ext.require()
    row_tolerance = None
    if args.check_rows:
        if args.attentions.device.type == "cpu":
            row_tolerance = kernel_row_tolerance(args.attentions.dtype, args.attentions.shape[-1])
        if row_tolerance is None:
            reference.check_row_sums(args.attentions)
    try:
        return _finish(_compiled_op(args, row_tolerance), args)
    except RuntimeError as e:
        if _KERNEL_VALUE_ERROR not in str(e):
            raise
        kernel_error = e
    if args.check_rows:
        reference.check_row_sums(args.attentions)  # the reference's ValueError (NaN/inf, negative, or the row)
    reference.check_attention_values(args.attentions)
    if _KERNEL_ROW_ERROR in str(kernel_error):  # refused within the rounding margin: the reference accepts it
        return _finish(_compiled_op(args, None), args)
    raise kernel_error  # the kernel found a bad value the reference does not see: a bug, say so


def triton_ops():
    """:mod:`rollout_fast.triton.rollout` (imports Triton on first call), its fakes registered."""
    from ..triton import rollout as tr

    meta.register_triton_rollout(tr.INTERPRETED)
    return tr


def run_triton(args: RolloutArgs) -> torch.Tensor:
    """Rollout with the Triton kernels of :mod:`rollout_fast.triton.rollout`."""
    out = triton_ops().rollout_triton(args.attentions, args.head_fusion, args.discard_ratio,
                                      args.num_prefix_tokens, args.protect_prefix, args.readout, args.normalize)
    return _finish(out, args)


def _never(device: torch.device) -> bool:
    return False


def _always(device: torch.device) -> bool:
    return True


def _on(kind: str):
    return lambda device: device.type == kind


# the reference checks the values itself; the C++ CPU kernel checks values and rows during its single read
# of the attention (the CUDA kernels do not)
registry.register(_OP, "reference", Backend(lambda: True, lambda device: True, _run_reference, _always))
registry.register(_OP, "cpu", Backend(lambda: meta.load_compiled() is not None, _on("cpu"), run_compiled,
                                      _on("cpu"), _on("cpu")))
registry.register(_OP, "cuda", Backend(lambda: torch.cuda.is_available() and meta.load_compiled() is not None
                                       and _ext.cuda_built(), _on("cuda"), run_compiled, _never))
registry.register(_OP, "triton", Backend(registry.triton_usable, registry.triton_usable, run_triton, _never))


# ---------------------------------------------------------------------------------------- public ops
def available_backends() -> list[str]:
    """Names of the rollout backends usable in this install (always includes 'reference')."""
    return registry.available(_OP)


def _entry(backend: str, device: torch.device) -> Backend:
    """The registry entry ``backend`` means for tensors on ``device``. Raises ValueError for an unknown,
    unavailable or unsupporting backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    found = registry.pick(_OP, backend, device)
    if found is not None:
        return found[1]
    if backend not in available_backends():
        raise ValueError(f"backend: {backend!r} is not available in this install; available: "
                         f"{available_backends()} (see `python -m rollout_fast.info`)")
    raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors")


def attention_rollout(attentions, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1, grid: tuple[int, int] | None = None,
                      readout: str = "cls", normalize: str | None = "max",
                      protect_prefix: bool = True, check_rows: bool = True, backend: str = "auto") -> torch.Tensor:
    """Attention rollout: per-layer attention -> patch-relevance maps (the fast public entry point).

    Args:
        attentions: post-softmax attention, rows are queries, layers in forward order, as either
            a non-empty sequence (list/tuple) of ``L`` tensors ``(B, H, N, N)``, e.g. Hugging Face's
            ``outputs.attentions``, or one 5-D tensor ``(L, B, H, N, N)``, layers first;
            float16/bfloat16/float32/float64, one device. Nothing else is accepted: a 4-D tensor is refused
            (one layer: pass ``[attention]``; one image's ``(L, H, N, N)``: ``attentions.unsqueeze(1)``),
            and a batch-first ``(B, L, H, N, N)`` stack must be ``.transpose(0, 1)``-ed first (the shape
            alone cannot tell the two apart, so it is not guessed). Values must be finite and >= 0; with
            ``check_rows`` each row must sum to 1 within ``reference.ROW_SUM_TOLERANCE[dtype]`` (1e-3 for
            float32/float64, 1e-2 for float16/bfloat16).
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction in [0, 1) of each fused (N, N) matrix to zero per sample; any real number
            (Python, numpy scalar, 0-d tensor; a float32 0.9 counts as 0.9), not a bool.
        num_prefix_tokens: P, prefix tokens (class, distillation, registers) before the patches; any
            integer (Python, numpy, 0-d integer tensor), not a bool.
        grid: (gh, gw), integers, with gh * gw = N - P; inferred as square when None.
        readout: 'cls' | 'mean' | 'full'.
        normalize: 'max' | 'minmax' | None, per sample (not applied to 'full').
        protect_prefix: keep the first prefix token's self-attention out of the discard (a bool).
        check_rows: refuse attention whose rows do not sum to 1 (a bool). Pass False for non-negative weights
            that are not row-normalised, e.g. heads already fused by max or min.
        backend: 'auto' (fastest available for the input's device) or one of
            :func:`available_backends`.

    Returns:
        float32 ``(B, gh, gw)``, or ``(B, N, N)`` for readout 'full', on the input's device; the same
        result (to float32 rounding) from every backend. Semantics: section 1 of REFERENCE.md, implemented
        by :func:`rollout_fast.reference.attention_rollout`.

    Raises:
        TypeError: an argument of the wrong type (attentions not a tensor or sequence of floating-point
            tensors; a scalar argument of the wrong kind, e.g. a bool for ``num_prefix_tokens``).
        ValueError: a bad shape or value (each message names the argument): an empty sequence (Hugging
            Face under SDPA: the message says to load the model with ``attn_implementation="eager"`` or use
            :class:`rollout_fast.AttentionRollout`); NaN/inf attention; negative attention (the message
            names the first); a row off 1 by more than the tolerance (the message names the worst) unless
            ``check_rows=False``; an unknown or unavailable backend.

    Source: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020); head fusion and
    discard ratio from jacobgil/vit-explain.
    """
    args = check_rollout_args(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=protect_prefix, check_rows=check_rows,
                              check_values=False)
    entry = _entry(backend, args.attentions.device)
    return entry.run(_check_attention(args, entry))


def _check_attention(args: RolloutArgs, entry: Backend) -> RolloutArgs:
    """The checks ``entry`` does not make itself during its run (reference messages); ``args`` with
    ``check_rows`` still True only where the backend checks the rows. The row check runs first, but looks
    for NaN/inf/negative values before it reports a row, so every backend reports those first."""
    device = args.attentions.device
    if args.check_rows and not entry.checks_rows(device):
        reference.check_row_sums(args.attentions)
        args = args._replace(check_rows=False)
    if not entry.checks_values(device):
        reference.check_attention_values(args.attentions)
    return args


def grad_attention_rollout(attentions, gradients, *, discard_ratio: float = 0.0, num_prefix_tokens: int = 1,
                           grid: tuple[int, int] | None = None, readout: str = "cls",
                           normalize: str | None = "max", check_rows: bool = True,
                           backend: str = "auto") -> torch.Tensor:
    """Class-specific gradient rollout from attention and its gradient (REFERENCE.md section 2).

    Per layer ``F_l = relu(mean over heads of A_l * G_l)`` (float32, computed here one layer at a time),
    then the rollout of the fused ``F`` through the same backends as :func:`attention_rollout` (H = 1,
    readout 'cls', ``F[b, 0, 0]`` not protected from the discard).

    Args:
        attentions: post-softmax attention ``A_l`` in the layouts of :func:`attention_rollout` (a sequence
            of ``L`` tensors ``(B, H, N, N)`` or one ``(L, B, H, N, N)``, layers first and in forward
            order); float16/bfloat16/float32/float64; finite and >= 0, rows summing to 1 with ``check_rows``.
        gradients: ``G_l = dy/dA_l`` for the target score y, same shape, device and layer order as
            ``attentions`` (e.g. :func:`rollout_fast.capture.capture_attention_grad`); finite, any sign.
        discard_ratio, num_prefix_tokens, grid, normalize, backend: as :func:`attention_rollout`.
        readout: 'cls' (the method's readout), 'mean' or 'full'.
        check_rows: refuse ``attentions`` whose rows do not sum to 1 (as :func:`attention_rollout`). The
            gradient-weighted ``F_l`` is never row-checked: its rows are not normalised.

    Returns:
        float32 ``(B, gh, gw)``, or ``(B, N, N)`` for readout 'full', on the input's device; equal to
        :func:`rollout_fast.reference.grad_rollout`.

    Raises:
        TypeError, ValueError: bad arguments (each message names the argument): see
            :func:`rollout_fast.reference.check_grad_rollout_args` and :func:`attention_rollout`; an unknown
            or unavailable backend.

    Source: jacobgil/vit-explain's ``grad_rollout`` with its layer pairing fixed (layer l's attention
    with layer l's gradient) and per-sample discard; Abnar & Zuidema 2020 for the rollout.
    """
    args, grads = reference.check_grad_rollout_args(
        attentions, gradients, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens, grid=grid,
        readout=readout, normalize=normalize, check_rows=check_rows)
    _entry(backend, args.attentions.device)  # an unknown backend fails before any work
    L, B, _, N, _ = args.attentions.shape
    fused = torch.empty((L, B, 1, N, N), dtype=torch.float32, device=args.attentions.device)
    for layer in range(L):
        fused[layer, :, 0] = reference.grad_fuse_heads(args.attentions[layer], grads[layer])
    return attention_rollout(fused, head_fusion="mean", discard_ratio=args.discard_ratio,
                             num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
                             normalize=args.normalize, protect_prefix=False, check_rows=False, backend=backend)
