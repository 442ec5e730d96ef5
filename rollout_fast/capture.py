"""Getting attention out of timm Vision Transformers without changing the user's model.

timm (>= 0.9) computes attention with ``F.scaled_dot_product_attention`` when ``attn.fused_attn`` is
True, so the attention probabilities never exist as a tensor and hooks on ``attn_drop`` never fire
(vit-explain issue #23). Flipping ``fused_attn`` or ``timm.layers.set_fused_attn`` changes the user's
model. Instead, :func:`capture_attention` registers temporary forward hooks on each block's
``attn.q_norm`` and ``attn.k_norm`` (``nn.Identity`` when q/k norm is off, called in every timm
``Attention.forward`` right before SDPA): they see the exact q and k SDPA receives, after q/k norm,
and the probabilities ``softmax(q k^T * scale)`` are rebuilt from them in float32 and head-fused on
the spot. The forward itself still runs through SDPA, LayerScale and every block unchanged; the hooks
are removed and each module's train/eval flag is restored before returning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .reference import HEAD_FUSIONS

__all__ = [
    "TokenLayout",
    "UnsupportedModelError",
    "attention_modules",
    "capture_attention",
    "token_layout",
]


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


def _fuse(probs: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return probs.mean(dim=1)
    if head_fusion == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


def capture_attention(model: nn.Module, images: torch.Tensor, *, head_fusion: str | None = "mean",
                      forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once on ``images`` and return ``(output, attention)``.

    Args:
        model: a timm VisionTransformer-family model (any train/eval state; run in eval mode, state
            restored afterwards).
        images: (B, 3, H, W) float tensor on the model's device.
        head_fusion: 'mean' | 'max' | 'min' to keep only the head-fused matrix per layer
            (H times less memory), or None to keep every head.
        forward: callable ``forward(model, images)`` to run instead of ``model(images)``
            (e.g. ``forward_features``); default ``model(images)``.

    Returns:
        ``output``: what the forward returned (logits for a classifier).
        ``attention``: float32 ``(L, B, 1, N, N)`` head-fused attention, or ``(L, B, H, N, N)`` with
        ``head_fusion=None``; rows are queries; layers in forward order.

    Raises:
        UnsupportedModelError: see :func:`attention_modules`, or the attention did not run through
            ``q_norm``/``k_norm`` (a timm version or model that computes attention differently), or
            an attention mask was passed (masked attention is not supported).
        ValueError: unknown ``head_fusion``.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS} or None, got {head_fusion!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images: expected a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    mods = attention_modules(model)
    captured: list[torch.Tensor | None] = [None] * len(mods)
    pending_q: dict[int, torch.Tensor] = {}
    masked: list[int] = []
    handles = []

    def pre_hook(idx):
        def hook(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            if mask is not None:
                masked.append(idx)
        return hook

    def q_hook(idx):
        def hook(module, args, output):
            pending_q[idx] = output
        return hook

    def k_hook(idx, attn):
        def hook(module, args, output):
            q = pending_q.pop(idx, None)
            if q is None:
                return
            logits = torch.matmul(q.float(), output.float().transpose(-2, -1)) * float(attn.scale)
            probs = logits.softmax(dim=-1)
            captured[idx] = probs if head_fusion is None else _fuse(probs, head_fusion).unsqueeze(1)
        return hook

    try:
        for i, attn in enumerate(mods):
            handles.append(attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(attn.q_norm.register_forward_hook(q_hook(i)))
            handles.append(attn.k_norm.register_forward_hook(k_hook(i, attn)))
        with _eval_mode(model):
            output = forward(model, images) if forward is not None else model(images)
    finally:
        for h in handles:
            h.remove()
    if masked:
        raise UnsupportedModelError(f"model.blocks{masked}: attention ran with a mask; masked "
                                    "attention is not supported by rollout")
    missing = [i for i, a in enumerate(captured) if a is None]
    if missing:
        raise UnsupportedModelError(
            f"model.blocks{missing}: attention did not pass q and k through q_norm/k_norm; this "
            "model's attention implementation cannot be captured")
    return output, torch.stack(captured)  # type: ignore[arg-type]
