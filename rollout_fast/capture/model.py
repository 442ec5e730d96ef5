"""Which models the capture reads, and their token layout (no hooks here; the families are in :mod:`.families`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TokenLayout", "UnsupportedModelError", "check_images", "eval_mode", "timm_attention_modules",
           "timm_layout"]


class UnsupportedModelError(TypeError):
    """The model is not a ViT rollout_fast can capture from exactly (the message says why)."""


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


def timm_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """:func:`token_layout` of a timm ViT (``num_prefix_tokens``, ``patch_embed``; dynamic image size)."""
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


def timm_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of each block of a timm ViT, checked to be a capturable timm attention."""
    _require_vit(model)
    mods = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if attn is None or not hasattr(attn, "num_heads") or not isinstance(getattr(attn, "attn_drop", None),
                                                                           nn.Module):
            raise UnsupportedModelError(
                f"model.blocks[{i}]: attention {type(attn).__name__} has no num_heads and attn_drop; only timm's "
                "attention modules (vit_*, deit_*, relpos, BEiT, EVA/RoPE ViTs) are supported")
        mods.append(attn)
    if not mods:
        raise UnsupportedModelError("model: has no transformer blocks")
    return mods


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images: expected a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
