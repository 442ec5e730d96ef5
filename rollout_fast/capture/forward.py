"""The forward capture: per-layer head-fused attention from one forward pass (see :mod:`rollout_fast.capture`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..ops import attention as attention_ops
from ..reference import HEAD_FUSIONS, fuse_probs
from .hooks import SDPACall, Tap, check_complete, check_probs, model_lock, sdpa_call, summary
from .families import describe_model
from .model import check_images, eval_mode

__all__ = ["CAPTURES", "CaptureResult", "capture_attention", "resolve_capture"]

CAPTURES = ("auto", "fused-triton", "fused-chunked", "qk-hooks")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_capture(capture: str, device: torch.device | str, head_fusion: str | None = "mean") -> str:
    """The capture path that ``capture`` means for tensors on ``device``.

    'auto': 'fused-triton' on CUDA when Triton can run there, else 'fused-chunked'; 'qk-hooks' when
    ``head_fusion`` is None (per-head attention cannot come out of a head-fusing path).

    Raises:
        ValueError: ``capture`` not one of :data:`CAPTURES`; 'fused-triton' where the kernel cannot run
            (no Triton, or CPU tensors without ``TRITON_INTERPRET=1``); a fused path with
            ``head_fusion=None``.
    """
    if capture not in CAPTURES:
        raise ValueError(f"capture: expected one of {CAPTURES}, got {capture!r}")
    device = torch.device(device)
    if head_fusion is None:
        if capture in ("fused-triton", "fused-chunked"):
            raise ValueError(f"capture: {capture!r} keeps only head-fused attention; use 'qk-hooks' or "
                             "'auto' for per-head attention (head_fusion=None)")
        return "qk-hooks"
    if capture == "auto":
        return "fused-" + attention_ops.resolve_impl("auto", device)
    if capture == "fused-triton" and attention_ops.resolve_impl("triton", device) is None:
        raise ValueError(f"capture: 'fused-triton' cannot run on {device.type} tensors here (needs Triton "
                         "and a CUDA device, or TRITON_INTERPRET=1 on the CPU); use 'auto'")
    return capture


class CaptureResult(tuple):
    """``(output, attention)`` from :func:`capture_attention`, with the path that ran.

    ``layer_paths``: the path of each block ('fused-triton' | 'fused-chunked' | 'qk-hooks', or 'attn-drop'
    for a block running timm's explicit attention, read at ``attn_drop``, 'eager-softmax' for Hugging Face's
    eager attention, read at its softmax); ``path``: the one path that ran,
    or e.g. 'fused-chunked+attn-drop' when blocks differed; ``source_dtypes``: the dtypes of the q, k (or
    probabilities) the attention was computed from (``{torch.float32}`` for a float32 model without autocast;
    reduced precision means rows sum to 1 only within that dtype's rounding).
    """

    def __new__(cls, output, attention: torch.Tensor, layer_paths: Sequence[str], source_dtypes=()):
        self = super().__new__(cls, (output, attention))
        self.layer_paths = tuple(layer_paths)
        self.source_dtypes = frozenset(source_dtypes)
        return self

    @property
    def output(self):
        return self[0]

    @property
    def attention(self) -> torch.Tensor:
        return self[1]

    @property
    def path(self) -> str:
        return summary(self.layer_paths)


def capture_attention(model: nn.Module, images: torch.Tensor, *, head_fusion: str | None = "mean",
                      forward: Callable | None = None, capture: str = "auto",
                      chunk_bytes: int = attention_ops.DEFAULT_CHUNK_BYTES) -> CaptureResult:
    """Run ``model`` once on ``images`` and return ``(output, attention)``.

    Args:
        model: a timm, Hugging Face, torchvision or open_clip ViT (see
            :func:`rollout_fast.capture.families.describe_model`; any train/eval state; run in eval mode,
            state restored afterwards).
        images: (B, 3, H, W) float tensor on the model's device.
        head_fusion: 'mean' | 'max' | 'min' to keep only the head-fused matrix per layer
            (H times less memory), or None to keep every head (then the path is 'qk-hooks').
        forward: callable ``forward(model, images)`` to run instead of ``model(images)``
            (e.g. ``forward_features``); default ``model(images)``.
        capture: 'auto' | 'fused-triton' | 'fused-chunked' | 'qk-hooks' (see the module docstring and
            :func:`resolve_capture`).
        chunk_bytes: per-head float32 probabilities held at once by the chunked computations.

    Returns:
        :class:`CaptureResult`, unpacking as ``(output, attention)``: ``output`` what the forward returned
        (logits for a timm classifier, a ``ModelOutput`` for Hugging Face; equal to the plain forward's
        within the dtype's tolerance);
        ``attention`` float32 ``(L, B, 1, N, N)`` head-fused, or ``(L, B, H, N, N)`` with
        ``head_fusion=None``; rows are queries; layers in forward order. ``.path`` says which path ran.
        The attention is the model's own: an ``attn_mask`` given to SDPA (timm's relative-position bias,
        BEiT's bias) is in the softmax, q and k are read after q/k norm and rotary embeddings (EVA, RoPE ViTs).

    Raises:
        UnsupportedModelError: see :func:`attention_modules`, or a block's attention neither called SDPA
            as self-attention without dropout or causal masking nor ran timm's explicit path through
            ``attn_drop`` (no map is made from attention the model did not compute).
        ValueError: unknown ``head_fusion`` or ``capture``, a path that cannot run here, bad ``images``.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS} or None, got {head_fusion!r}")
    check_images(images)
    spec = describe_model(model)
    mods = spec.attentions
    path = resolve_capture(capture, images.device, head_fusion)
    captured: list[torch.Tensor | None] = [None] * len(mods)
    paths: list[str | None] = [None] * len(mods)
    buffer: list[torch.Tensor] = []  # (L, B, 1, N, N): each layer's fused matrix is written in place
    dtypes: set = set()
    tap = _capture_tap(mods, path, head_fusion, chunk_bytes, captured, paths, buffer, spec.probs_at, dtypes)
    with model_lock(mods), torch.no_grad(), eval_mode(model), tap:
        output = forward(model, images) if forward is not None else model(images)
    check_complete(tap, captured, "attention neither called SDPA (or nn.MultiheadAttention) in a way that can "
                                  "be reproduced nor ran an explicit softmax the capture reads")
    if buffer and all(c.data_ptr() == buffer[0][i].data_ptr() for i, c in enumerate(captured)):
        return CaptureResult(output, buffer[0], paths, dtypes)  # type: ignore[arg-type]
    return CaptureResult(output, torch.stack(captured), paths, dtypes)  # type: ignore[arg-type]


def _capture_tap(mods, path: str, head_fusion, chunk_bytes: int, captured: list, paths: list, buffer: list,
                 probs_at: str = "attn_drop", dtypes: set | None = None) -> Tap:
    """The hooks of :func:`capture_attention`: each block's attention into ``captured`` (head-fused into one
    (L, B, 1, N, N) ``buffer`` where shapes allow) and its path into ``paths``. An SDPA call is answered by the
    fused op (``path`` 'fused-*'), or runs while its attention is rebuilt from the same q, k, mask and scale
    ('qk-hooks'); the dtype each was computed from goes into ``dtypes``; timm's explicit path is read at ``attn_drop`` ('attn-drop'), Hugging Face's eager attention
    at its softmax ('eager-softmax')."""
    explicit = "attn-drop" if probs_at == "attn_drop" else "eager-softmax"
    def slot(idx, q, k):
        shape = (len(mods), q.shape[0], 1, q.shape[2], k.shape[2])
        if not buffer:
            buffer.append(torch.empty(shape, dtype=torch.float32, device=q.device))
        if buffer[0].shape != shape or buffer[0].device != q.device:
            return None  # not one (B, N) for every block (never in a ViT): stacked at the end instead
        return buffer[0][idx, :, 0]

    def take(idx, fused, how):
        captured[idx], paths[idx], tap.captured[idx] = fused, how, True

    def sdpa(idx, *args, **kwargs):
        call = sdpa_call(args, kwargs)
        if not isinstance(call, SDPACall):
            tap.unsupported[idx] = call
            return None
        q, k, v, mask, scale = call
        if dtypes is not None:
            dtypes.add(q.dtype)
        if path != "qk-hooks" and q.dtype in _FUSED_DTYPES and q.dtype == k.dtype == v.dtype:
            res, fused = attention_ops.fused_attention(q, k, v, scale=scale, head_fusion=head_fusion,
                                                       impl=path[len("fused-"):], chunk_bytes=chunk_bytes,
                                                       fused_out=slot(idx, q, k), attn_mask=mask)
            take(idx, fused.unsqueeze(1), path)
            return res
        out = slot(idx, q, k) if head_fusion is not None else None  # SDPA runs; its attention rebuilt
        take(idx, attention_ops.fused_probs_chunked(q, k, scale=scale, head_fusion=head_fusion, attn_mask=mask,
                                                    chunk_bytes=chunk_bytes, fused_out=out), "qk-hooks")
        return None

    def on_probs(idx, probs):  # the explicit path: the model's exact probabilities, fused here
        why = check_probs(probs, idx)
        if why is not None:
            tap.unsupported[idx] = why
            return
        if dtypes is not None:
            dtypes.add(probs.dtype)
        p = probs.detach().float()
        if head_fusion is None:
            take(idx, p.clone(), explicit)
        else:
            take(idx, fuse_probs(p, head_fusion, out=slot(idx, p, p)).unsqueeze(1), explicit)

    tap = Tap(mods, sdpa=sdpa, on_probs=on_probs, probs_at=probs_at)
    return tap
