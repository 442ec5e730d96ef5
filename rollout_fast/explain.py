"""``AttentionRollout``: rollout maps straight from a timm ViT and a batch of images."""

from __future__ import annotations

import torch
from torch import nn

from .capture import attention_modules, capture_attention, token_layout
from .ops import attention_rollout
from .reference import HEAD_FUSIONS, NORMALIZATIONS

__all__ = ["AttentionRollout", "RolloutResult"]


class RolloutResult(tuple):
    """``(maps, logits)`` returned by :meth:`AttentionRollout.explain`."""

    __slots__ = ()

    def __new__(cls, maps: torch.Tensor, logits: torch.Tensor):
        return super().__new__(cls, (maps, logits))

    @property
    def maps(self) -> torch.Tensor:
        return self[0]

    @property
    def logits(self) -> torch.Tensor:
        return self[1]


class AttentionRollout:
    """Attention rollout for a timm VisionTransformer-family model, with fused attention left on.

    ``maps = AttentionRollout(model)(images)`` gives float32 ``(B, gh, gw)`` maps, one value per
    patch token, max-normalised per image (by default). The prefix-token count (class, distillation,
    register tokens) and the patch grid are read from the model and the input size, so distilled DeiT
    (2 prefix tokens), register models, non-224 and non-square inputs all work.

    The model is not changed: capture uses temporary hooks (see :mod:`rollout_fast.capture`), runs in
    eval mode and restores every module's train/eval flag; outputs, modules and hooks are as before.

    Args:
        model: timm ``VisionTransformer`` (vit_*, deit_*, register, q/k-norm, LayerScale models).
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction in [0, 1) of each fused attention matrix to discard per image.
        readout: 'cls' | 'mean' | None (None: 'cls' if the model has a class token, else 'mean').
        normalize: 'max' | 'minmax' | None, per image.
        backend: rollout backend, see :func:`rollout_fast.available_backends`.

    Raises:
        rollout_fast.capture.UnsupportedModelError (a TypeError): the model is not a supported ViT.
        ValueError: bad ``head_fusion``, ``discard_ratio``, ``readout`` or ``normalize``.

    Source: Abnar & Zuidema 2020 (attention rollout); jacobgil/vit-explain (head fusion, discard ratio).
    """

    def __init__(self, model: nn.Module, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 readout: str | None = None, normalize: str | None = "max", backend: str = "auto"):
        attention_modules(model)  # fail early on unsupported models
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) \
                or not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio: expected a float in [0, 1), got {discard_ratio!r}")
        if readout not in ("cls", "mean", None):
            raise ValueError(f"readout: expected 'cls', 'mean' or None, got {readout!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
        if readout == "cls" and getattr(model, "cls_token", None) is None:
            raise ValueError("readout: 'cls' needs a model with a class token; use 'mean'")
        self.model = model
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.readout = readout or ("cls" if getattr(model, "cls_token", None) is not None else "mean")
        self.normalize = normalize
        self.backend = backend

    def __repr__(self) -> str:
        return (f"AttentionRollout(model={type(self.model).__name__}, head_fusion={self.head_fusion!r}, "
                f"discard_ratio={self.discard_ratio}, readout={self.readout!r}, "
                f"normalize={self.normalize!r}, backend={self.backend!r}, capture='qk-hooks')")

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> RolloutResult:
        """One forward pass: ``(maps (B, gh, gw) float32, logits)`` for ``images`` (B, 3, H, W).

        Raises:
            ValueError: ``images`` is not a (B, C, H, W) tensor of the model's input size.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images: expected a (B, C, H, W) tensor")
        layout = token_layout(self.model, tuple(images.shape[-2:]))
        logits, attention = capture_attention(self.model, images, head_fusion=self.head_fusion)
        N = attention.shape[-1]
        if N != layout.num_tokens:
            raise ValueError(f"model: captured {N} tokens, expected {layout.num_prefix_tokens} prefix + "
                             f"{layout.grid[0]}x{layout.grid[1]} patch tokens")
        # Attention is already head-fused (H = 1): fusion over one head is the identity for every mode.
        maps = attention_rollout(attention, head_fusion="mean", discard_ratio=self.discard_ratio,
                                 num_prefix_tokens=layout.num_prefix_tokens, grid=layout.grid,
                                 readout=self.readout, normalize=self.normalize, backend=self.backend)
        return RolloutResult(maps, logits)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Rollout maps ``(B, gh, gw)`` float32 for ``images`` (B, 3, H, W) on the model's device."""
        return self.explain(images).maps
