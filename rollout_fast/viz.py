"""Figures: rollout overlays and the input | rollout grid (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["denormalize", "save_grid", "save_overlay", "upsample_map"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensor -> (B, H, W, 3) float array in [0, 1] (what the model saw)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw) map to ``size`` = (H, W) pixels."""
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _display(image: np.ndarray, min_side: int = 224) -> np.ndarray:
    """Nearest-neighbour upscale small images (CIFAR's 32 px) so the figure is readable."""
    h, w = image.shape[:2]
    f = max(1, int(np.ceil(min_side / min(h, w))))
    return image.repeat(f, axis=0).repeat(f, axis=1) if f > 1 else image


def save_overlay(image: np.ndarray, rollout_map: np.ndarray, path: str | os.PathLike,
                 title: str | None = None, alpha: float = 0.5) -> Path:
    """Save the image with the rollout heatmap on top and a colour bar as a PNG.

    Args:
        image: (H, W, 3) float in [0, 1], the model's input.
        rollout_map: (gh, gw) patch scores (any scale; shown on its own range).
        path: output PNG path.
    """
    plt = _plt()
    img = _display(image)
    heat = upsample_map(rollout_map, img.shape[:2])
    fig, ax = plt.subplots(figsize=(4, 3.4), dpi=100)
    ax.imshow(img)
    im = ax.imshow(heat, cmap="jet", alpha=alpha, vmin=float(np.min(rollout_map)),
                   vmax=float(max(np.max(rollout_map), np.min(rollout_map) + 1e-12)))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="rollout")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_grid(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], path: str | os.PathLike,
              titles: Sequence[str] | None = None, extra: Sequence[tuple[str, Sequence[np.ndarray]]] = (),
              max_images: int = 16, per_row: int | None = None) -> Path:
    """Save a grid figure of input | rollout overlay (| extra maps ...) panels as a PNG.

    Args:
        images: (H, W, 3) floats in [0, 1]. maps: (gh, gw) arrays, one per image.
        titles: a caption per image (e.g. predicted class). extra: further (column name, maps) columns.
        max_images: at most this many images are drawn.
        per_row: images per row (default: 1 up to 8 images, else 2).
    """
    plt = _plt()
    n = min(len(images), max_images)
    per_row = per_row or (1 if n <= 8 else 2)
    rows = (n + per_row - 1) // per_row
    panels = 2 + len(extra)
    cols = panels * per_row
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.1 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c0 = divmod(i, per_row)
        img = _display(images[i])
        columns = [("input", None), ("rollout", maps[i])] + [(name, ms[i]) for name, ms in extra]
        for j, (name, m) in enumerate(columns):
            ax = axes[r, c0 * panels + j]
            ax.imshow(img)
            if m is not None:
                ax.imshow(upsample_map(m, img.shape[:2]), cmap="jet", alpha=0.5)
            if r == 0:
                ax.set_title(name, fontsize=9)
        if titles:
            axes[r, c0 * panels].text(0, -0.03, titles[i], transform=axes[r, c0 * panels].transAxes,
                                      fontsize=7, va="top")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
