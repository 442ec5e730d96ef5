"""Input strategies: what a student's backbone sees of the teacher's (B, 3, H, W) input batch.

A factor F means the student sees 1/F^2 of the teacher's pixels:

- ``"downsize"``: pixelate: resize down by F (bilinear, antialiased), then back up to (H, W). Same cost
  as full resolution; lets a pretrained full-resolution backbone be reused (the seeds' approach).
- ``"lowres"``: feed the (H/F, W/F) thumbnail directly: F^2 fewer pixels, that is where speed comes from.
- ``"mask"`` (ViT students only): full resolution, but only a random 1/F^2 of the patch tokens enter the
  transformer (MAE style; He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
  Random per image in training; a fixed seeded subset in eval so predictions are deterministic. The
  backbone drops the tokens itself, so :func:`apply_strategy` passes the images through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["STRATEGIES", "apply_strategy", "check_factor", "check_size", "resize", "student_input_size",
           "to_grid"]

STRATEGIES = ("downsize", "lowres", "mask")


def check_size(name: str, v) -> tuple[int, int]:
    """``v`` as (int, int) of positive ints. Raises ValueError naming ``name`` otherwise."""
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)):
        raise ValueError(f"{name}: expected two positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def check_factor(factor) -> int:
    """``factor`` as an int >= 1. Raises ValueError otherwise."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an int >= 1, got {factor!r}")
    return factor


def student_input_size(strategy: str, factor: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image the student's backbone sees for a teacher input of ``input_size`` (H, W).

    ``lowres``: (H // F, W // F); ``downsize`` and ``mask``: (H, W).

    Raises:
        ValueError: unknown ``strategy``, ``factor`` < 1, or a thumbnail smaller than 1 pixel.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    factor = check_factor(factor)
    H, W = check_size("input_size", input_size)
    if strategy != "lowres":
        return H, W
    if H // factor < 1 or W // factor < 1:
        raise ValueError(f"factor: {factor} leaves no pixels of a {H}x{W} input")
    return H // factor, W // factor


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size``, antialiased when shrinking; a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])


def to_grid(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) features -> (B, C, gh, gw): average pooling down, bilinear up."""
    if tuple(f.shape[-2:]) == grid:
        return f
    if f.shape[-2] >= grid[0] and f.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(f, grid)
    return F.interpolate(f, size=grid, mode="bilinear", align_corners=False)


def apply_strategy(images: torch.Tensor, strategy: str, factor: int) -> torch.Tensor:
    """(B, 3, H, W) teacher input -> what the backbone sees: the (H/F, W/F) thumbnail (``lowres``), the
    pixelated (H, W) image (``downsize``) or the images themselves (``mask``)."""
    H, W = images.shape[-2:]
    if strategy == "lowres":
        return resize(images, (H // factor, W // factor))
    if strategy == "downsize":
        small = (max(1, H // factor), max(1, W // factor))
        return resize(resize(images, small), (H, W))
    return images  # mask: the ViT drops tokens itself
