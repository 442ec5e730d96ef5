"""The gradient capture: per-head attention and its gradient for class-specific gradient rollout
(REFERENCE.md section 2; see :mod:`rollout_fast.capture`)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..reference import attention_probs
from .hooks import SDPACall, Tap, check_complete, check_probs, model_lock, sdpa_call, summary
from .families import describe_model
from .model import UnsupportedModelError, check_images, eval_mode

__all__ = ["GradCapture", "capture_attention_grad", "check_targets"]


class GradCapture(NamedTuple):
    """What :func:`capture_attention_grad` returns.

    ``output``: the forward's logits (B, C), detached; ``attentions``, ``gradients``: float32
    ``(L, B, H, N, N)`` post-softmax attention ``A_l`` and ``dy/dA_l`` for ``y = sum_b output[b, targets[b]]``
    (layers in forward order, rows are queries); ``targets``: int64 (B,) on the output's device;
    ``path``: 'sdpa-explicit' (SDPA answered explicitly), 'attn-drop' (timm's non-fused path) or both
    joined by '+'.
    """

    output: torch.Tensor
    attentions: torch.Tensor
    gradients: torch.Tensor
    targets: torch.Tensor
    path: str


def check_targets(targets, batch: int, num_classes: int | None = None, device=None) -> torch.Tensor | None:
    """``targets`` as an int64 (B,) tensor (None stays None: the predicted class is used).

    Accepts an int (one class for every sample), a sequence of ints, or an integer tensor of shape
    () or (B,). With ``num_classes`` the values are checked to lie in [0, num_classes).

    Raises:
        TypeError: not an int / sequence of ints / integer tensor (bool and floats are rejected).
        ValueError: wrong shape, or a class index outside [0, num_classes).
    """
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor) and hasattr(targets, "__array__"):  # numpy arrays
        targets = torch.as_tensor(targets)
    if isinstance(targets, torch.Tensor):
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets: expected an integer tensor of class indices, got dtype {targets.dtype}")
        t = targets
    elif isinstance(targets, (list, tuple)):
        if any(isinstance(x, bool) for x in targets):
            raise TypeError(f"targets: expected int class indices, got bools in {targets!r}")
        try:
            t = torch.tensor([operator.index(x) for x in targets], dtype=torch.int64)
        except TypeError:
            raise TypeError(f"targets: expected a sequence of int class indices, got {targets!r}") from None
    elif isinstance(targets, bool):
        raise TypeError("targets: expected an int class index, a sequence of them or an integer tensor, "
                        "got a bool")
    else:
        try:
            t = torch.tensor(operator.index(targets), dtype=torch.int64)
        except TypeError:
            raise TypeError("targets: expected an int class index, a sequence of them or an integer "
                            f"tensor, got {type(targets).__name__}") from None
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"targets: expected one class index per image, shape ({batch},) or a scalar, "
                         f"got shape {tuple(t.shape)}")
    t = t.to(dtype=torch.int64, device=device if device is not None else t.device)
    if num_classes is not None:
        bad = (t < 0) | (t >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"targets: class indices must lie in [0, {num_classes}), got "
                             f"{t[bad][:8].tolist()} at position(s) {bad.nonzero().flatten()[:8].tolist()}")
    return t


def capture_attention_grad(model: nn.Module, images: torch.Tensor, targets=None, *,
                           forward: Callable | None = None) -> GradCapture:
    """Per-head attention and its gradient for class-specific gradient rollout (REFERENCE.md section 2).

    One forward pass (in eval mode; SDPA answered by the explicit float32 ``softmax(q k^T * scale) @ v``
    so that every ``A_l`` is part of the autograd graph) and one ``torch.autograd.grad`` of
    ``y = sum_b logits[b, targets[b]]`` with respect to the ``A_l``. Samples do not interact in a ViT's
    eval forward, so ``gradients[l, b] = d logits[b, targets[b]] / d A_l[b]``. Nothing is kept between
    calls; parameters' ``.grad`` and ``requires_grad`` are untouched; works under ``torch.no_grad()`` and
    with frozen parameters.

    Args:
        model: a timm, Hugging Face (``*ForImageClassification``) or torchvision ViT classifier (output
            (B, num_classes) logits, or a ``ModelOutput`` with ``logits``).
        images: (B, 3, H, W) float tensor on the model's device.
        targets: None (each image's predicted class), an int (the same class for all), or an int
            sequence / integer tensor of shape (B,).
        forward: callable ``forward(model, images)`` returning (B, C) logits; default ``model(images)``.

    Returns:
        :class:`GradCapture`.

    Raises:
        UnsupportedModelError: see :func:`capture_attention`; a model without a classifier (timm
            ``num_classes=0``, a Hugging Face base model, an open_clip image tower) and no ``forward``.
        TypeError, ValueError: bad ``images`` or ``targets`` (wrong type, shape, or class out of range),
            or the forward did not return (B, C) logits.
        RuntimeError: called under ``torch.inference_mode()`` (no autograd there).

    Source: jacobgil/vit-explain ``VITAttentionGradRollout`` (gradients at the attention probabilities),
    with its layer pairing fixed and per-sample targets.
    """
    check_images(images)
    spec = describe_model(model)
    mods = spec.attentions
    if forward is None and not spec.classifier:
        raise UnsupportedModelError(f"model: grad rollout needs class logits, and {type(model).__name__} returns "
                                    "features; use a classifier (e.g. a Hugging Face *ForImageClassification "
                                    "model) or pass forward=(model, images) -> (B, C) logits")
    B = images.shape[0]
    wanted = check_targets(targets, B)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("grad rollout needs autograd; it cannot run under torch.inference_mode()")
    attns: list[torch.Tensor | None] = [None] * len(mods)
    paths: list[str | None] = [None] * len(mods)
    tap = _explicit_attention_tap(mods, attns, paths, spec.probs_at)
    try:
        with model_lock(mods), torch.enable_grad(), eval_mode(model), tap:
            logits = forward(model, images) if forward is not None else spec.logits(model(images))
        check_complete(tap, attns, "attention neither called SDPA (or nn.MultiheadAttention) in a supported "
                                   "way nor ran an explicit softmax the capture reads")
        wanted, att, grad = _target_gradients(logits, attns, wanted, B)
    finally:
        attns.clear()  # free the graph's tensors even when something raised
    return GradCapture(logits.detach(), att, grad, wanted, summary(paths))  # type: ignore[arg-type]


def _explicit_attention_tap(mods, attns: list, paths: list, probs_at: str = "attn_drop") -> Tap:
    """Hooks that make each block's probabilities ``A_l`` a tensor of the autograd graph, stored in
    ``attns[l]`` (and the path in ``paths[l]``): SDPA answered by the explicit float32
    ``softmax(q k^T * scale + mask) @ v`` (the q, k and mask SDPA was given: RoPE and relative-position bias
    included), or timm's non-fused path read at ``attn_drop``."""
    def sdpa(idx, *args, **kwargs):
        call = sdpa_call(args, kwargs)
        if not isinstance(call, SDPACall):
            tap.unsupported[idx] = call
            return None
        q, k, v, mask, scale = call
        probs = attention_probs(q, k, scale, mask)
        if not probs.requires_grad:  # nothing upstream needs grad (frozen model): make it a graph input
            probs.requires_grad_(True)
        attns[idx] = probs
        paths[idx] = "sdpa-explicit"
        tap.captured[idx] = True
        return torch.matmul(probs, v.float()).to(v.dtype)

    def on_probs(idx, probs):
        why = check_probs(probs, idx)
        if why is not None:
            tap.unsupported[idx] = why
            return None
        replaced = None
        if not probs.requires_grad:
            probs = replaced = probs.detach().requires_grad_(True)
        attns[idx] = probs
        paths[idx] = "attn-drop" if probs_at == "attn_drop" else "eager-softmax"
        tap.captured[idx] = probs_at == "softmax"
        return replaced

    tap = Tap(mods, sdpa=sdpa, on_probs=on_probs, probs_at=probs_at)
    return tap


def _target_gradients(logits, attns: list, wanted: torch.Tensor | None, B: int):
    """``(targets, attentions, gradients)``: ``dy/dA_l`` for ``y = sum_b logits[b, targets[b]]`` (targets:
    ``wanted``, or the predicted classes), stacked float32 (L, B, H, N, N); 0 where y does not depend on A_l."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError("model: grad rollout needs (B, num_classes) logits from the forward, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if wanted is None:
        wanted = logits.detach().argmax(dim=-1)
    wanted = check_targets(wanted, B, logits.shape[1], device=logits.device)
    with torch.enable_grad():
        y = logits.float().gather(1, wanted[:, None]).sum()
        grads = torch.autograd.grad(y, attns, allow_unused=True) if y.requires_grad else [None] * len(attns)
    att = torch.stack([a.detach().float() for a in attns])  # type: ignore[union-attr]
    grad = torch.stack([torch.zeros_like(a, dtype=torch.float32) if g is None else g.float()
                        for a, g in zip(attns, grads)])
    return wanted, att, grad
