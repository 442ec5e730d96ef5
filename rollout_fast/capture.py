"""Getting attention out of timm Vision Transformers without changing the user's model.

timm (>= 0.9) computes attention with ``F.scaled_dot_product_attention`` (SDPA) when ``attn.fused_attn``
is True, so the attention probabilities never exist as a tensor and hooks on ``attn_drop`` never fire
(vit-explain issue #23). Flipping ``fused_attn`` or ``timm.layers.set_fused_attn`` changes the user's
model. Nothing here does either; every path uses temporary hooks, removed (and each module's
train/eval flag restored) before returning, and timm's own ``Attention.forward`` runs unchanged:

- ``'fused-triton'`` / ``'fused-chunked'`` (the fast paths, :func:`capture_attention` picks one with
  ``capture='auto'``): while a block's ``attn`` runs (forward pre-hook to forward hook), a
  ``TorchFunctionMode`` intercepts its SDPA call and answers it with
  :mod:`rollout_fast.fused_attention`, which returns the attention output *and* the head-fused (B, N, N)
  probabilities in one pass (a Triton kernel on CUDA; batch-chunked PyTorch elsewhere). Per-head
  probabilities are never stored; the model's output equals its SDPA output within the dtype's tolerance.
- ``'qk-hooks'`` (the foundation path, and the per-layer fallback of the fast paths when a block's SDPA
  call cannot be answered, e.g. ``fused_attn=False`` or an unusual call): forward hooks on
  ``attn.q_norm`` / ``attn.k_norm`` (``nn.Identity`` without q/k norm, called by every timm
  ``Attention.forward`` right before SDPA) see the exact q and k, and ``softmax(q k^T * scale)`` is rebuilt
  from them in float32 and head-fused at once, chunk by chunk; SDPA itself runs as usual.
- gradients (:func:`capture_attention_grad`, REFERENCE.md section 2): the intercepted SDPA call is answered
  with the explicit ``softmax(q k^T * scale) @ v`` in float32, so the probabilities ``A_l`` are tensors
  of the autograd graph; ``dy/dA_l`` for ``y = sum_b logits[b, target_b]`` comes from one
  ``torch.autograd.grad`` call. Models running timm's non-fused path are read at ``attn_drop``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import fused_attention as fa
from .reference import HEAD_FUSIONS

__all__ = [
    "CAPTURES",
    "CaptureResult",
    "GradCapture",
    "TokenLayout",
    "UnsupportedModelError",
    "attention_modules",
    "capture_attention",
    "capture_attention_grad",
    "check_targets",
    "resolve_capture",
    "token_layout",
]

CAPTURES = ("auto", "fused-triton", "fused-chunked", "qk-hooks")
_SDPA = F.scaled_dot_product_attention


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer-family model that rollout_fast can capture from."""


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of a ViT for one input size: ``N = num_prefix_tokens + gh * gw``.

    ``has_class_token`` says whether the first prefix token is a class token ('cls' readout).
    """

    num_prefix_tokens: int
    grid: tuple[int, int]
    has_class_token: bool

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]


def _require_vit(model: nn.Module) -> None:
    missing = [a for a in ("blocks", "patch_embed", "num_prefix_tokens") if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise UnsupportedModelError(
            f"model: expected a timm VisionTransformer-family model (with .blocks, .patch_embed and "
            f".num_prefix_tokens), got {type(model).__name__}"
            + (f" missing {missing}" if isinstance(model, nn.Module) else ""))


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """Prefix-token count and patch grid of ``model`` for images of ``image_size`` = (H, W) pixels.

    Read from the model (``num_prefix_tokens``, ``patch_embed``), never assumed.

    Raises:
        UnsupportedModelError: ``model`` is not a timm ViT.
        ValueError: a fixed-size model given another input size.
    """
    _require_vit(model)
    pe = model.patch_embed
    H, W = int(image_size[0]), int(image_size[1])
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False)
    if dynamic and hasattr(pe, "dynamic_feat_size"):
        grid = tuple(int(g) for g in pe.dynamic_feat_size((H, W)))
    else:
        grid = tuple(int(g) for g in pe.grid_size)
        img = getattr(pe, "img_size", None)
        if img is not None and tuple(img) != (H, W) and getattr(pe, "strict_img_size", True):
            raise ValueError(f"images: model expects {tuple(img)} pixels (H, W), got {(H, W)}; build "
                             "the model with that img_size or dynamic_img_size=True")
    has_cls = getattr(model, "cls_token", None) is not None
    return TokenLayout(int(model.num_prefix_tokens), grid, has_cls)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of each block, checked to be a capturable timm attention.

    Raises:
        UnsupportedModelError: not a timm ViT, or a block's attention lacks ``q_norm``/``k_norm``/
            ``num_heads``/``scale`` (e.g. a custom or fused-qkv attention rollout_fast cannot read).
    """
    _require_vit(model)
    mods = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        need = ("q_norm", "k_norm", "num_heads", "scale")
        if attn is None or not all(hasattr(attn, a) for a in need):
            raise UnsupportedModelError(
                f"model.blocks[{i}]: attention {type(attn).__name__} has no {need}; only timm's "
                "standard Attention (vit_*, deit_*, register, q/k-norm, LayerScale models) is supported")
        mods.append(attn)
    if not mods:
        raise UnsupportedModelError("model: has no transformer blocks")
    return mods


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
        return "fused-triton" if device.type == "cuda" and fa.triton_supports(device) else "fused-chunked"
    if capture == "fused-triton" and not fa.triton_supports(device):
        raise ValueError(f"capture: 'fused-triton' cannot run on {device.type} tensors here (needs Triton "
                         "and a CUDA device, or TRITON_INTERPRET=1 on the CPU); use 'auto'")
    return capture


class _SDPAIntercept(TorchFunctionMode):
    """Answers ``F.scaled_dot_product_attention`` calls with ``handler(layer, *args, **kwargs)`` while
    active (a handler returning None lets SDPA run); every other function passes through."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.layer = -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            out = self.handler(self.layer, *args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _plain_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    """An unmasked, dropout-free self-attention call of equal-shaped float16/bfloat16/float32 q, k, v."""
    return (attn_mask is None and not is_causal and not dropout_p and not enable_gqa
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype in (torch.float16, torch.bfloat16,
                                                                                  torch.float32) for t in (q, k, v))
            and q.shape == k.shape and k.shape[:3] == v.shape[:3] and q.dtype == k.dtype == v.dtype)


class _Tap:
    """Temporary hooks on every block's attention (a context manager; all removed on exit).

    ``sdpa(layer, q, k, v, **sdpa_kwargs) -> Tensor | None`` answers the block's SDPA call (None: SDPA runs);
    ``on_qk(layer, attn, q, k)`` runs after a block whose SDPA call was not answered, with the q and k seen
    by ``q_norm``/``k_norm``; ``on_probs(layer, probs) -> Tensor | None`` is a forward hook on ``attn_drop``
    (timm's non-fused path), whose result replaces the probabilities. Masked attention is recorded in
    ``masked`` (the caller raises).
    """

    def __init__(self, mods: Sequence[nn.Module], *, sdpa=None, on_qk=None, on_probs=None):
        self.mods = list(mods)
        self.mode = _SDPAIntercept(sdpa) if sdpa is not None else None
        self.on_qk = on_qk
        self.on_probs = on_probs
        self.answered = [False] * len(self.mods)
        self.masked: list[int] = []
        self._mode_on = False
        self._q = self._k = None
        self._handles = []

    def _pre(self, idx):
        def hook(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            if mask is not None or kwargs.get("is_causal", False):
                self.masked.append(idx)
            self._q = self._k = None
            if self.mode is not None and not self._mode_on:
                self.mode.layer = idx
                self.mode.__enter__()
                self._mode_on = True
        return hook

    def _post(self, idx, attn):
        def hook(module, args, output):
            self._exit_mode()
            q, k = self._q, self._k
            self._q = self._k = None
            if not self.answered[idx] and self.on_qk is not None and q is not None and k is not None:
                self.on_qk(idx, attn, q, k)
        return hook

    def _exit_mode(self):
        if self._mode_on:
            self._mode_on = False
            self.mode.__exit__(None, None, None)

    def _set_q(self, module, args, output):
        self._q = output

    def _set_k(self, module, args, output):
        self._k = output

    def _probs(self, idx):
        def hook(module, args, output):
            return self.on_probs(idx, output)
        return hook

    def __enter__(self):
        try:
            for i, attn in enumerate(self.mods):
                self._handles.append(attn.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._post(i, attn)))
                if self.on_qk is not None:
                    self._handles.append(attn.q_norm.register_forward_hook(self._set_q))
                    self._handles.append(attn.k_norm.register_forward_hook(self._set_k))
                if self.on_probs is not None and isinstance(getattr(attn, "attn_drop", None), nn.Module):
                    self._handles.append(attn.attn_drop.register_forward_hook(self._probs(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._exit_mode()  # a forward that raised inside an attention block left the mode pushed
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._q = self._k = None
        return False


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images: expected a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")


def _check_complete(tap: _Tap, got: Sequence, what: str) -> None:
    if tap.masked:
        raise UnsupportedModelError(f"model.blocks{tap.masked}: attention ran with a mask; masked "
                                    "attention is not supported by rollout")
    missing = [i for i, a in enumerate(got) if a is None]
    if missing:
        raise UnsupportedModelError(f"model.blocks{missing}: {what}; this model's attention implementation "
                                    "cannot be captured")


def _summary(paths: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(paths))
    return distinct[0] if len(distinct) == 1 else "+".join(distinct)


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
        return _summary(self.layer_paths)


def capture_attention(model: nn.Module, images: torch.Tensor, *, head_fusion: str | None = "mean",
                      forward: Callable | None = None, capture: str = "auto",
                      chunk_bytes: int = fa.DEFAULT_CHUNK_BYTES) -> CaptureResult:
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
    _check_images(images)
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
        captured[idx] = fa.fused_probs_chunked(q, k, scale=float(attn.scale), head_fusion=head_fusion,
                                               chunk_bytes=chunk_bytes, fused_out=out)
        paths[idx] = "qk-hooks"

    sdpa = None
    if path != "qk-hooks":
        def sdpa(idx, *args, **kwargs):
            if not _plain_sdpa(*args, **kwargs):
                return None
            q, k, v = args[:3]
            scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
            out = slot(idx, q, k)
            if path == "fused-triton":
                res, fused = fa.fused_attention_triton(q, k, v, scale=scale, head_fusion=head_fusion, fused_out=out)
                paths[idx] = "fused-triton"
            else:
                res, fused = fa.fused_attention_chunked(q, k, v, scale=scale, head_fusion=head_fusion,
                                                        chunk_bytes=chunk_bytes, fused_out=out)
                paths[idx] = "fused-chunked"
            captured[idx] = fused.unsqueeze(1)
            tap.answered[idx] = True
            return res

    tap = _Tap(mods, sdpa=sdpa, on_qk=on_qk)
    with torch.no_grad(), _eval_mode(model), tap:
        output = forward(model, images) if forward is not None else model(images)
    _check_complete(tap, captured, "attention did not pass q and k through q_norm/k_norm and its SDPA call "
                                   "could not be answered")
    if buffer and all(c.data_ptr() == buffer[0][i].data_ptr() for i, c in enumerate(captured)):
        return CaptureResult(output, buffer[0], paths)  # type: ignore[arg-type]
    return CaptureResult(output, torch.stack(captured), paths)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- gradients
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
        model: a timm VisionTransformer-family classifier (output (B, num_classes)).
        images: (B, 3, H, W) float tensor on the model's device.
        targets: None (each image's predicted class), an int (the same class for all), or an int
            sequence / integer tensor of shape (B,).
        forward: callable ``forward(model, images)`` returning (B, C) logits; default ``model(images)``.

    Returns:
        :class:`GradCapture`.

    Raises:
        UnsupportedModelError: see :func:`capture_attention`.
        TypeError, ValueError: bad ``images`` or ``targets`` (wrong type, shape, or class out of range),
            or the forward did not return (B, C) logits.
        RuntimeError: called under ``torch.inference_mode()`` (no autograd there).

    Source: jacobgil/vit-explain ``VITAttentionGradRollout`` (gradients at the attention probabilities),
    with its layer pairing fixed and per-sample targets.
    """
    _check_images(images)
    mods = attention_modules(model)
    B = images.shape[0]
    wanted = check_targets(targets, B)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("grad rollout needs autograd; it cannot run under torch.inference_mode()")
    attns: list[torch.Tensor | None] = [None] * len(mods)
    paths: list[str | None] = [None] * len(mods)

    def sdpa(idx, *args, **kwargs):
        if not _plain_sdpa(*args, **kwargs):
            return None
        q, k, v = args[:3]
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        probs = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul(scale).softmax(dim=-1)
        if not probs.requires_grad:  # nothing upstream needs grad (frozen model): make it a graph input
            probs.requires_grad_(True)
        attns[idx] = probs
        paths[idx] = "sdpa-explicit"
        tap.answered[idx] = True
        return torch.matmul(probs, v.float()).to(v.dtype)

    def on_probs(idx, probs):
        if tap.answered[idx] or not isinstance(probs, torch.Tensor):
            return None
        replaced = None
        if not probs.requires_grad:
            probs = replaced = probs.detach().requires_grad_(True)
        attns[idx] = probs
        paths[idx] = "attn-drop"
        return replaced

    tap = _Tap(mods, sdpa=sdpa, on_probs=on_probs)
    try:
        with torch.enable_grad(), _eval_mode(model), tap:
            logits = forward(model, images) if forward is not None else model(images)
        _check_complete(tap, attns, "attention neither called SDPA in a supported way nor ran timm's "
                                    "explicit path through attn_drop")
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
    finally:
        attns.clear()  # free the graph's tensors even when something raised
    return GradCapture(logits.detach(), att, grad, wanted, _summary(paths))  # type: ignore[arg-type]
