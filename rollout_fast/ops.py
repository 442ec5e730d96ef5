"""The public attention-rollout op: validates once, picks a backend, runs it.

This is the only module that knows the backends. Today the registry holds the pure-PyTorch
reference (:mod:`rollout_fast.reference`); fused backends ("cpu", "triton", "cuda") register
themselves in ``_BACKENDS`` with the same calling convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import reference
from .reference import RolloutArgs, check_rollout_args

__all__ = ["BACKENDS", "attention_rollout", "available_backends", "grad_attention_rollout"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _reference_backend(args: RolloutArgs) -> torch.Tensor:
    return reference.attention_rollout(
        args.attentions, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
        num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
        normalize=args.normalize, protect_prefix=args.protect_prefix)


class Backend(NamedTuple):
    """A registry entry: ``available() -> bool``, ``supports(device) -> bool``, ``run(RolloutArgs) ->
    Tensor``, and ``checks_finite(device) -> bool``: True where ``run`` itself raises the reference's
    ValueError on NaN/inf input (then the op skips its separate finiteness pass)."""

    available: Callable[[], bool]
    supports: Callable[[torch.device], bool]
    run: Callable[[RolloutArgs], torch.Tensor]
    checks_finite: Callable[[torch.device], bool]


def _never(device: torch.device) -> bool:
    return False


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


_BACKENDS: dict[str, Backend] = {
    "reference": Backend(lambda: True, lambda device: True, _reference_backend, _never),
}
# "auto" tries these in order for the input's device type and takes the first available one. Triton is
# never chosen for CPU tensors: there it runs in Triton's interpreter, which is for tests, not speed.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def _register_fused_backends() -> None:
    """Add "cpu", "cuda" and "triton" (rollout_fast.kernels.backends); each checks lazily, on first
    query, whether the compiled extension / Triton can run here."""
    try:
        from .kernels import backends as kb
    except ImportError:  # a broken partial install: the reference still works
        return
    # the C++ CPU kernel checks finiteness during its single read of the attention; the CUDA one does not
    _BACKENDS["cpu"] = Backend(kb.cpu_available, _on_cpu, kb.run_compiled, _on_cpu)
    _BACKENDS["cuda"] = Backend(kb.cuda_available, _on_cuda, kb.run_compiled, _never)
    _BACKENDS["triton"] = Backend(kb.triton_available, kb.triton_supports, kb.run_triton, _never)


_register_fused_backends()


def available_backends() -> list[str]:
    """Names of the backends usable in this install (always includes 'reference')."""
    return [name for name, entry in _BACKENDS.items() if entry.available()]


def _entry(backend: str, device: torch.device) -> Backend:
    """The registry entry ``backend`` means for tensors on ``device`` ('auto': the first available in
    ``_AUTO_ORDER``). Raises ValueError for an unknown, unavailable or unsupporting backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            entry = _BACKENDS.get(name)
            if entry is not None and entry.available() and entry.supports(device):
                return entry
        raise RuntimeError("no rollout backend available")  # unreachable: reference always is
    entry = _BACKENDS.get(backend)
    if entry is None or not entry.available():
        raise ValueError(f"backend: {backend!r} is not available in this install; available: "
                         f"{available_backends()} (see `python -m rollout_fast.info`)")
    if not entry.supports(device):
        raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors")
    return entry


def _pick(backend: str, device: torch.device) -> Callable[[RolloutArgs], torch.Tensor]:
    """The run function of :func:`_entry`."""
    return _entry(backend, device).run


def attention_rollout(attentions, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1, grid: tuple[int, int] | None = None,
                      readout: str = "cls", normalize: str | None = "max",
                      protect_prefix: bool = True, backend: str = "auto") -> torch.Tensor:
    """Attention rollout: per-layer attention -> patch-relevance maps (the fast public entry point).

    Args:
        attentions: ``L`` tensors ``(B, H, N, N)`` or one ``(L, B, H, N, N)`` tensor of post-softmax
            attention (rows are queries, layers in forward order); float16/bfloat16/float32.
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction in [0, 1) of each fused (N, N) matrix to zero per sample.
        num_prefix_tokens: P, prefix tokens (class, distillation, registers) before the patches.
        grid: (gh, gw) with gh * gw = N - P; inferred as square when None.
        readout: 'cls' | 'mean' | 'full'.
        normalize: 'max' | 'minmax' | None, per sample (not applied to 'full').
        protect_prefix: keep the first prefix token's self-attention out of the discard.
        backend: 'auto' (fastest available for the input's device) or one of
            :func:`available_backends`.

    Returns:
        float32 ``(B, gh, gw)``, or ``(B, N, N)`` for readout 'full', on the input's device.
        Semantics: section 1 of REFERENCE.md, implemented by :func:`rollout_fast.reference.attention_rollout`.

    Raises:
        TypeError, ValueError: bad arguments (each message names the argument), an unknown or
            unavailable backend.

    Source: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020); head fusion and
    discard ratio from jacobgil/vit-explain.
    """
    args = check_rollout_args(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                              num_prefix_tokens=num_prefix_tokens, grid=grid, readout=readout,
                              normalize=normalize, protect_prefix=protect_prefix, check_finite=False)
    entry = _entry(backend, args.attentions.device)
    if not entry.checks_finite(args.attentions.device) and not reference.all_finite(args.attentions):
        raise ValueError("attentions: contains NaN or infinite values")
    return entry.run(args)


def grad_attention_rollout(attentions, gradients, *, discard_ratio: float = 0.0, num_prefix_tokens: int = 1,
                           grid: tuple[int, int] | None = None, readout: str = "cls",
                           normalize: str | None = "max", backend: str = "auto") -> torch.Tensor:
    """Class-specific gradient rollout from attention and its gradient (REFERENCE.md section 2).

    Per layer ``F_l = relu(mean over heads of A_l * G_l)`` (float32, computed here one layer at a time),
    then the rollout of the fused ``F`` through the same backends as :func:`attention_rollout` (H = 1,
    readout 'cls', ``F[b, 0, 0]`` not protected from the discard).

    Args:
        attentions: ``L`` tensors ``(B, H, N, N)`` or one ``(L, B, H, N, N)`` tensor of post-softmax
            attention ``A_l`` (rows are queries, layers in forward order); float16/bfloat16/float32.
        gradients: ``G_l = dy/dA_l`` for the target score y, same shape, device and layer order as
            ``attentions`` (e.g. :func:`rollout_fast.capture.capture_attention_grad`).
        discard_ratio, num_prefix_tokens, grid, normalize, backend: as :func:`attention_rollout`.
        readout: 'cls' (the method's readout), 'mean' or 'full'.

    Returns:
        float32 ``(B, gh, gw)``, or ``(B, N, N)`` for readout 'full', on the input's device; equal to
        :func:`rollout_fast.reference.grad_rollout`.

    Raises:
        TypeError, ValueError: bad arguments (each message names the argument): see
            :func:`rollout_fast.reference.check_grad_rollout_args`; an unknown or unavailable backend.

    Source: jacobgil/vit-explain's ``grad_rollout`` with its layer pairing fixed (layer l's attention
    with layer l's gradient) and per-sample discard; Abnar & Zuidema 2020 for the rollout.
    """
    args, grads = reference.check_grad_rollout_args(
        attentions, gradients, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens, grid=grid,
        readout=readout, normalize=normalize)
    _pick(backend, args.attentions.device)  # an unknown backend fails before any work
    L, B, _, N, _ = args.attentions.shape
    fused = torch.empty((L, B, 1, N, N), dtype=torch.float32, device=args.attentions.device)
    for layer in range(L):
        fused[layer, :, 0] = reference.grad_fuse_heads(args.attentions[layer], grads[layer])
    return attention_rollout(fused, head_fusion="mean", discard_ratio=args.discard_ratio,
                             num_prefix_tokens=args.num_prefix_tokens, grid=args.grid, readout=args.readout,
                             normalize=args.normalize, protect_prefix=False, backend=backend)
