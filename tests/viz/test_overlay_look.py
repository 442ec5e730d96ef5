"""The overlays drawn without a matplotlib figure per image (viz.OverlayRenderer) look like the matplotlib
rendering they replace (viz.render_overlay_matplotlib, the reference).

"Same look", measured in 0-255 levels per channel:
- the same output size (400 x 340 px) and the image area at the same place;
- inside the image area (image + heatmap): mean |difference| <= 2 and 99th percentile <= 8 (what remains is
  PIL's bilinear resizing against matplotlib's hanning filter at the 7-pixel block edges of upscaled CIFAR
  images: measured mean 0.8-1.2, p99 4-6);
- the whole figure (title and tick labels drawn with PIL's FreeType in matplotlib's font, the colour bar and
  its label from matplotlib): mean |difference| <= 4 (measured ~2: text antialiasing).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rollout_fast.viz import _map_range, overlay_renderer, render_overlay_matplotlib, save_overlay


def _photo(rng, size=32):
    """A blocky, photo-like image: smooth gradients plus blocks (edges like CIFAR's)."""
    y, x = np.mgrid[0:size, 0:size] / size
    blocks = rng.random((size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
    img = np.stack([x, y, (x + y) / 2], -1) * 0.6 + blocks * 0.4
    return img.astype(np.float32)


def _unit_max(m):
    return m / m.max()


MAPS = {
    "rollout-like (max 1)": lambda rng: _unit_max(rng.random((8, 8)) ** 3 + 0.05),
    "min 0 (tick at the bar's bottom)": lambda rng: np.linspace(0, 1, 64).reshape(8, 8),
    "small range (offset text)": lambda rng: 1e-3 + rng.random((8, 8)) * 1e-6,
}


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("title", ["0000.jpg: airplane (0.86)", "plain title", None])
def test_overlay_looks_like_the_matplotlib_rendering(name, title):
    rng = np.random.default_rng(0)
    image, m = _photo(rng), MAPS[name](rng).astype(np.float32)
    ref = render_overlay_matplotlib(image, m, title)
    renderer = overlay_renderer(image.shape[:2], title=bool(title))
    new = np.asarray(renderer.render(image, m, title).convert("RGB"))
    assert new.shape == ref.shape == (340, 400, 3)
    l, t, r, b = renderer._frame(*_map_range(m), title).box
    diff = np.abs(ref.astype(np.int16) - new.astype(np.int16))
    area = diff[t:b, l:r]
    assert area.mean() <= 2.0 and np.percentile(area, 99) <= 8, (area.mean(), np.percentile(area, 99))
    assert diff.mean() <= 4.0, diff.mean()


def test_save_overlay_writes_the_renderers_png_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    jobs = [(_photo(rng), rng.random((8, 8)), tmp_path / f"{i}.png", f"t{i}") for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda a: save_overlay(*a), jobs))
    for (image, m, _, title), p in zip(jobs, paths):
        with Image.open(p) as im:
            assert im.size == (400, 340)
            expected = overlay_renderer(image.shape[:2]).render(image, m, title)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_overlay_renderer_refuses_another_image_size():
    with pytest.raises(ValueError, match="display scaling"):
        overlay_renderer((32, 32)).render(np.zeros((40, 40, 3)), np.zeros((8, 8)))
