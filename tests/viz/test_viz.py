"""Figures (rollout_fast.viz): what the model saw, upsampled maps, overlay and grid PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast.viz import denormalize, save_grid, save_overlay, upsample_map


def test_denormalize_inverts_the_normalisation_and_clamps():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = torch.rand(2, 3, 5, 7)
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = denormalize(normed, mean, std)
    assert out.shape == (2, 5, 7, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, x.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert denormalize(torch.full((1, 3, 2, 2), 100.0), mean, std).max() == 1.0


def test_upsample_map_keeps_constant_maps_and_the_size():
    assert upsample_map(np.full((4, 4), 0.25), (32, 48)).shape == (32, 48)
    np.testing.assert_allclose(upsample_map(np.full((4, 4), 0.25), (8, 8)), 0.25, rtol=1e-6)


def _png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format


@pytest.mark.parametrize("m", [np.random.default_rng(0).random((8, 8)), np.zeros((8, 8))])
def test_save_overlay_writes_a_png(tmp_path, m):
    path = save_overlay(np.random.default_rng(1).random((32, 32, 3)), m, tmp_path / "a" / "b.png", title="t")
    assert path == tmp_path / "a" / "b.png" and _png(path) == "PNG"


def test_save_grid_with_an_extra_column_and_at_most_max_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.random((32, 32, 3)) for _ in range(10)]
    maps = [rng.random((8, 8)) for _ in range(10)]
    small = save_grid(images, maps, tmp_path / "g1.png", titles=[str(i) for i in range(10)], max_images=3)
    big = save_grid(images, maps, tmp_path / "g2.png", extra=[("student", maps)])
    assert _png(small) == _png(big) == "PNG"
    with Image.open(small) as a, Image.open(big) as b:
        assert a.size[1] < b.size[1] and a.size[0] < b.size[0]  # 3 rows x 2 panels vs 5 rows x 2 x 3 panels


def test_a_long_caption_does_not_shrink_the_panels(tmp_path):
    """Captions stay out of tight_layout: the panels of a grid with long captions are drawn exactly where those
    of a grid with one-letter captions are (the first row's pixels are equal)."""
    rng = np.random.default_rng(1)
    images = [rng.random((112, 112, 3)) for _ in range(2)]
    maps = [rng.random((14, 14)) for _ in range(2)]
    short = save_grid(images, maps, tmp_path / "s.png", titles=["a", "b"], extra=[("student", maps)])
    long = save_grid(images, maps, tmp_path / "l.png", titles=["ILSVRC2012_val_00009111.jpg: English springer"] * 2,
                     extra=[("student", maps)])
    with Image.open(short) as a, Image.open(long) as b:
        a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    top = a.shape[0] * 2 // 5  # the first row's panels, above its caption
    assert np.array_equal(a[:top], b[:top])
    assert (a[top:] != b[top:]).any()  # the captions themselves differ
