"""Figures: rollout overlays (numpy + PIL in a frame drawn once by matplotlib) and the input | rollout grid
(matplotlib, Agg backend)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["OverlayRenderer", "denormalize", "overlay_renderer", "render_overlay_matplotlib", "save_grid",
           "save_overlay", "upsample_map"]


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


def _map_range(rollout_map: np.ndarray) -> tuple[float, float]:
    """The colour range of an overlay: the map's own [min, max] (a constant map gets a tiny range)."""
    vmin = float(np.min(rollout_map))
    return vmin, float(max(np.max(rollout_map), vmin + 1e-12))


def _overlay_figure(img: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, title: str | None,
                    alpha: float, cmap: str):
    """The overlay figure (400 x 340 px): image, heatmap, colour bar, title; returns (figure, axes, colorbar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(img)
    im = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="rollout")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return fig, ax, cb


def render_overlay_matplotlib(image: np.ndarray, rollout_map: np.ndarray, title: str | None = None,
                              alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The overlay drawn entirely by matplotlib, as a (340, 400, 3) uint8 array: the reference
    :class:`OverlayRenderer` is tested against (one figure per image: ~75 ms, too slow for jobs)."""
    img = _display(image)
    fig, _, _ = _overlay_figure(img, upsample_map(rollout_map, img.shape[:2]), *_map_range(rollout_map), title,
                                alpha, cmap)
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _pixel_box(bbox, fig_height: float) -> tuple[int, int, int, int]:
    """A matplotlib display bbox (origin bottom left) as PIL's (left, top, right, bottom) pixels."""
    return (round(bbox.x0), round(fig_height - bbox.y1), round(bbox.x1),
            round(fig_height - bbox.y0))


@dataclass(frozen=True)
class _Frame:
    """An overlay without its image, title and tick labels (drawn once by matplotlib) and where those go."""

    pixels: np.ndarray  # (340, 400, 3) uint8
    box: tuple[int, int, int, int]  # the image area, PIL (left, top, right, bottom)
    bar: tuple[float, float, float]  # the colour bar's right edge, top, bottom (pixels)
    title_at: tuple[float, float] | None  # the title's centre
    nbins: int  # the colour bar's tick locator's bin count


def _tick_labels(vmin: float, vmax: float, nbins: int) -> tuple[np.ndarray, list[str], str]:
    """The colour bar's ticks as matplotlib places and formats them (AutoLocator, ScalarFormatter)."""
    from matplotlib import ticker

    locs = ticker.MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]).tick_values(vmin, vmax)
    eps = (vmax - vmin) * 1e-10
    locs = locs[(locs >= vmin - eps) & (locs <= vmax + eps)]
    fmt = ticker.ScalarFormatter()
    fmt.create_dummy_axis()
    fmt.axis.set_view_interval(vmin, vmax)
    return locs, fmt.format_ticks(locs), fmt.get_offset()


class OverlayRenderer:
    """Overlays without a matplotlib figure per image: the colour map as a 256-entry lookup table, the
    composite and its resizing in numpy/PIL, pasted into a frame (colour bar, its label, the layout) drawn by
    matplotlib once per tick layout (labels at the bar's ends or not, their widths); the title and the tick
    labels (matplotlib's locator and formatter) are drawn with PIL in matplotlib's font. Same look as
    :func:`render_overlay_matplotlib` (tests/viz/test_overlay_look.py). Thread-safe.

    Args:
        size: (H, W) of the model input images it will draw (all of one job's images share it).
        title: whether overlays have a title (the layout leaves room for it).
    """

    # zlib level of the PNGs: lossless at any level; 1 encodes a 400 x 340 overlay about 3x faster than PIL's
    # default 6 (the encoding was most of an overlay's cost), for files about a quarter larger
    PNG_LEVEL = 1

    def __init__(self, size: tuple[int, int], title: bool = True, alpha: float = 0.5, cmap: str = "jet"):
        import matplotlib
        from matplotlib.font_manager import FontProperties, findfont
        from PIL import ImageFont

        self.alpha, self.cmap, self.title = alpha, cmap, title
        self.display = _display(np.zeros((*size, 3), np.float32)).shape[:2]
        self.lut = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3].astype(np.float32)
        self.px = 100 / 72.0  # pixels per point at the figure's 100 dpi
        font = findfont(FontProperties())
        self.title_font = ImageFont.truetype(font, 9 * self.px)
        self.tick_font = ImageFont.truetype(
            font, FontProperties(size=matplotlib.rcParams["ytick.labelsize"]).get_size_in_points() * self.px)
        self._frames: dict[tuple, _Frame] = {}
        self._lock = threading.Lock()
        self._nbins = self._frame(0.05, 1.0).nbins  # the usual layout: a rollout map's max is 1

    def _frame(self, vmin: float, vmax: float, title: str | None = "(Xg)") -> _Frame:
        """The frame for a map of range [vmin, vmax] and ``title``, drawn on first use of its layout (matplotlib's
        tight layout depends on the tick labels at the bar's ends, their widths and the title's ink height)."""
        nbins = getattr(self, "_nbins", 9)
        locs, labels, offset = _tick_labels(vmin, vmax, nbins)
        eps = (vmax - vmin) * 1e-6
        key = (bool(len(locs)) and locs[0] <= vmin + eps, bool(len(locs)) and locs[-1] >= vmax - eps,
               max((self.tick_font.getlength(s) for s in labels), default=0.0) // 4, bool(offset),
               self.title_font.getbbox(title, anchor="ls")[1::2] if title and self.title else None)
        with self._lock:  # matplotlib is not thread-safe: one frame drawn at a time
            if key not in self._frames:
                self._frames[key] = self._draw_frame(vmin, vmax, title if self.title else None)
            return self._frames[key]

    def _draw_frame(self, vmin: float, vmax: float, title: str | None) -> _Frame:
        fig, ax, cb = _overlay_figure(np.zeros((*self.display, 3)), np.zeros(self.display), vmin, vmax,
                                      title, self.alpha, self.cmap)
        height, title_at = fig.bbox.height, None
        if title:  # the layout made room for a title and tick labels; they are drawn per image
            ax.title.set_color("white")
            tb = ax.title.get_window_extent()
            title_at = ((tb.x0 + tb.x1) / 2, height - (tb.y0 + tb.y1) / 2)
        cb.ax.tick_params(colors="white")
        cb.ax.yaxis.get_offset_text().set_color("white")
        fig.canvas.draw()
        bar = cb.ax.get_window_extent()
        return _Frame(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy(), _pixel_box(ax.get_window_extent(), height),
                      (float(bar.x1), float(height - bar.y1), float(height - bar.y0)), title_at,
                      int(np.clip(cb.ax.yaxis.get_tick_space(), 1, 9)))

    def _image_area(self, image: np.ndarray, rollout_map: np.ndarray, vmin: float, vmax: float, box):
        from PIL import Image

        img = _display(np.asarray(image, dtype=np.float32))
        if img.shape[:2] != self.display:
            raise ValueError(f"image: expected {self.display} after display scaling, got {img.shape[:2]}")
        heat = (upsample_map(rollout_map, img.shape[:2]) - vmin) / (vmax - vmin)
        color = self.lut[np.clip((heat * 256).astype(np.int64), 0, 255)]
        mixed = np.clip(img * (1 - self.alpha) + color * self.alpha, 0, 1)
        l, t, r, b = box
        return Image.fromarray((mixed * 255 + 0.5).astype(np.uint8)).resize((r - l, b - t), Image.BILINEAR)

    def _ticks(self, draw, frame: _Frame, vmin: float, vmax: float) -> None:
        locs, labels, offset = _tick_labels(vmin, vmax, frame.nbins)
        x, top, bottom = frame.bar
        length, pad = 3.5 * self.px, 3.5 * self.px
        for v, label in zip(locs, labels):
            y = bottom - (v - vmin) / (vmax - vmin) * (bottom - top)
            draw.line([(x, y), (x + length, y)], fill=(0, 0, 0), width=1)
            draw.text((x + length + pad, y), label, fill=(0, 0, 0), font=self.tick_font, anchor="lm")
        if offset:
            draw.text((x - 10, top - 4), offset, fill=(0, 0, 0), font=self.tick_font, anchor="ls")

    def render(self, image: np.ndarray, rollout_map: np.ndarray, title: str | None = None):
        """The overlay of ``image`` ((H, W, 3) float in [0, 1]) and ``rollout_map`` ((gh, gw)) as a PIL image."""
        from PIL import Image, ImageDraw

        vmin, vmax = _map_range(rollout_map)
        frame = self._frame(vmin, vmax, title)
        out = Image.fromarray(frame.pixels)
        out.paste(self._image_area(image, rollout_map, vmin, vmax, frame.box), frame.box[:2])
        draw = ImageDraw.Draw(out)
        self._ticks(draw, frame, vmin, vmax)
        if title and frame.title_at is not None:
            draw.text(frame.title_at, title, fill=(0, 0, 0), font=self.title_font, anchor="mm")
        return out

    def save(self, image: np.ndarray, rollout_map: np.ndarray, path: str | os.PathLike,
             title: str | None = None) -> Path:
        """Render and write the overlay PNG at ``path`` (parent folders created), zlib level
        :attr:`PNG_LEVEL`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.render(image, rollout_map, title).save(path, format="PNG", compress_level=self.PNG_LEVEL)
        return path


_RENDERERS: dict[tuple, OverlayRenderer] = {}
_RENDERERS_LOCK = threading.Lock()


def overlay_renderer(size: tuple[int, int], title: bool = True, alpha: float = 0.5) -> OverlayRenderer:
    """The (cached, thread-safe) :class:`OverlayRenderer` for images of ``size`` = (H, W)."""
    key = (tuple(int(s) for s in size), bool(title), float(alpha))
    with _RENDERERS_LOCK:  # matplotlib is not thread-safe: frames are drawn one at a time
        if key not in _RENDERERS:
            _RENDERERS[key] = OverlayRenderer(key[0], title=key[1], alpha=key[2])
        return _RENDERERS[key]


def save_overlay(image: np.ndarray, rollout_map: np.ndarray, path: str | os.PathLike,
                 title: str | None = None, alpha: float = 0.5) -> Path:
    """Save the image with the rollout heatmap on top and a colour bar as a PNG (400 x 340 px).

    Drawn by :class:`OverlayRenderer` (no matplotlib figure per image; safe to call from worker threads).

    Args:
        image: (H, W, 3) float in [0, 1], the model's input.
        rollout_map: (gh, gw) patch scores (any scale; shown on its own range).
        path: output PNG path.
    """
    return overlay_renderer(np.shape(image)[:2], title=bool(title), alpha=alpha).save(image, rollout_map, path,
                                                                                         title)


def save_grid(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], path: str | os.PathLike,
              titles: Sequence[str] | None = None, extra: Sequence[tuple[str, Sequence[np.ndarray]]] = (),
              max_images: int = 16, per_row: int | None = None, map_title: str = "rollout") -> Path:
    """Save a grid figure of input | rollout overlay (| extra maps ...) panels as a PNG.

    Args:
        images: (H, W, 3) floats in [0, 1]. maps: (gh, gw) arrays, one per image.
        titles: a caption per image (e.g. predicted class). extra: further (column name, maps) columns (any
            map size; each is upsampled to the image). map_title: the column name of ``maps``.
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
        columns = [("input", None), (map_title, maps[i])] + [(name, ms[i]) for name, ms in extra]
        for j, (name, m) in enumerate(columns):
            ax = axes[r, c0 * panels + j]
            ax.imshow(img)
            if m is not None:
                ax.imshow(upsample_map(m, img.shape[:2]), cmap="jet", alpha=0.5)
            if r == 0:
                ax.set_title(name, fontsize=9)
        if titles:  # a caption may be wider than its panel: kept out of tight_layout, which would shrink them all
            axes[r, c0 * panels].text(0, -0.03, titles[i], transform=axes[r, c0 * panels].transAxes,
                                      fontsize=7, va="top").set_in_layout(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
