"""The forward capture: per-layer head-fused attention from one forward pass (see :mod:`rollout_fast.capture`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..ops import attention as attention_ops
from ..reference import HEAD_FUSIONS
from .hooks import Tap, check_complete, plain_sdpa, sdpa_scale, summary
from .model import attention_modules, check_images, eval_mode

__all__ = ["CAPTURES", "CaptureResult", "capture_attention", "resolve_capture"]

CAPTURES = ("auto", "fused-triton", "fused-chunked", "qk-hooks")


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

    ``layer_paths``: the path of each block ('fused-triton' | 'fused-chunked' | 'qk-hooks'); ``path``: the
    one path that ran, or e.g. 'fused-chunked+qk-hooks' when some blocks fell back.
    """

    def __new__(cls, output, attention: torch.Tensor, layer_paths: Sequence[str]):
        self = super().__new__(cls, (output, attention))
        self.layer_paths = tuple(layer_paths)
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
        model: a timm VisionTransformer-family model (any train/eval state; run in eval mode, state
            restored afterwards).
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
        (logits for a classifier; equal to the plain forward's within the dtype's tolerance);
        ``attention`` float32 ``(L, B, 1, N, N)`` head-fused, or ``(L, B, H, N, N)`` with
        ``head_fusion=None``; rows are queries; layers in forward order. ``.path`` says which path ran.

    Raises:
        UnsupportedModelError: see :func:`attention_modules`, or a block's attention neither called SDPA
            in a way the fused path answers nor passed q and k through ``q_norm``/``k_norm``, or an
            attention mask was passed (masked attention is not supported).
        ValueError: unknown ``head_fusion`` or ``capture``, a path that cannot run here, bad ``images``.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS} or None, got {head_fusion!r}")
    check_images(images)
    mods = attention_modules(model)
    path = resolve_capture(capture, images.device, head_fusion)
    captured: list[torch.Tensor | None] = [None] * len(mods)
    paths: list[str | None] = [None] * len(mods)
    buffer: list[torch.Tensor] = []  # (L, B, 1, N, N): each layer's fused matrix is written in place

    def slot(idx, q, k):
        shape = (len(mods), q.shape[0], 1, q.shape[2], k.shape[2])
        if not buffer:
            buffer.append(torch.empty(shape, dtype=torch.float32, device=q.device))
        if buffer[0].shape != shape or buffer[0].device != q.device:
            return None  # not one (B, N) for every block (never in a ViT): stacked at the end instead
        return buffer[0][idx, :, 0]

    def on_qk(idx, attn, q, k):
        out = slot(idx, q, k) if head_fusion is not None else None
        captured[idx] = attention_ops.fused_probs_chunked(q, k, scale=float(attn.scale), head_fusion=head_fusion,
                                               chunk_bytes=chunk_bytes, fused_out=out)
        paths[idx] = "qk-hooks"

    sdpa = None
    if path != "qk-hooks":
        impl = path[len("fused-"):]

        def sdpa(idx, *args, **kwargs):
            if not plain_sdpa(*args, **kwargs):
                return None
            q, k, v = args[:3]
            res, fused = attention_ops.fused_attention(q, k, v, scale=sdpa_scale(args, kwargs),
                                                       head_fusion=head_fusion, impl=impl,
                                                       chunk_bytes=chunk_bytes, fused_out=slot(idx, q, k))
            paths[idx] = path
            captured[idx] = fused.unsqueeze(1)
            tap.answered[idx] = True
            return res

    tap = Tap(mods, sdpa=sdpa, on_qk=on_qk)
    with torch.no_grad(), eval_mode(model), tap:
        output = forward(model, images) if forward is not None else model(images)
    check_complete(tap, captured, "attention did not pass q and k through q_norm/k_norm and its SDPA call "
                                   "could not be answered")
    if buffer and all(c.data_ptr() == buffer[0][i].data_ptr() for i, c in enumerate(captured)):
        return CaptureResult(output, buffer[0], paths)  # type: ignore[arg-type]
    return CaptureResult(output, torch.stack(captured), paths)  # type: ignore[arg-type]
