"""Model inputs and targets from fixation data: stimuli resized to a model's input size, fixation densities at
that size, and the flips of training (one draw applied alike to the image, its fixation density and a
teacher's map).

Resizing: a stimulus is resized to the model's (H, W) with PIL's bicubic filter (antialiased when shrinking),
whatever its aspect ratio (OSIE's 800 x 600 to 320 x 240 keeps it). The training density at (H, W) is the
full-resolution density (:func:`~rollout_fast.saliency.data.fixation_density`, sigma of one degree at the
stimulus's resolution) area-averaged to (H, W) and renormalised: the same Gaussian blur, seen at the model's
resolution. Evaluation always happens at the stimulus's own resolution (maps upsampled bilinearly to it:
:mod:`rollout_fast.saliency.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import FixationDataset, Fixations

__all__ = ["SaliencySplit", "flip_maps", "flip_params", "load_saliency_split", "load_stimulus", "normalize_images",
           "resize_density"]


def load_stimulus(path: str | Path, size: tuple[int, int], expect: tuple[int, int] | None = None) -> torch.Tensor:
    """A stimulus as uint8 (3, H, W) at ``size`` = (H, W): decoded by :func:`rollout_fast.data.load_image`
    (RGB, EXIF orientation applied), resized with PIL's bicubic filter.

    Raises:
        OSError / ValueError: an unreadable file. ValueError: ``expect`` given and the decoded image is not
            that (H, W) (the size its fixations were recorded on), naming the file.
    """
    from PIL import Image

    from ..data import load_image

    im = load_image(path)
    if expect is not None and (im.height, im.width) != tuple(expect):
        raise ValueError(f"stimulus {str(path)!r}: decoded as {im.width} x {im.height} but its fixations are on a "
                         f"{expect[1]} x {expect[0]} image")
    H, W = size
    if (im.height, im.width) != (H, W):
        im = im.resize((W, H), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize_images(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std`` on ``u8``'s device."""
    m = torch.tensor(mean, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1)
    return (u8.float() / 255.0 - m) / s


def resize_density(density: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) densities -> (..., H, W) float32, area-averaged (``F.interpolate(mode="area")``) and each
    map renormalised to sum 1 (its input's sum, 1 for a density)."""
    lead = density.shape[:-2]
    d = density.reshape(-1, 1, *density.shape[-2:]).float()
    total = d.double().sum(dim=(2, 3), keepdim=True)
    if tuple(d.shape[-2:]) != tuple(size):
        d = F.interpolate(d, size=tuple(size), mode="area")
        d = (d.double() / d.double().sum(dim=(2, 3), keepdim=True).clamp_min(1e-300) * total).float()
    return d.reshape(*lead, *size)


def flip_params(seed: int, epoch: int, n: int, enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The training flips of one epoch: ``(hflip, vflip)``, bool (n,) each, independent with probability 1/2
    (seed 004: random horizontal and vertical flips), from (seed, epoch) only, so a resumed run or another
    process draws the same; all False when not ``enabled``."""
    if not enabled:
        z = torch.zeros(n, dtype=torch.bool)
        return z, z.clone()
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * (epoch + 1) + 29)
    r = torch.rand(2, n, generator=g) < 0.5
    return r[0], r[1]


def flip_maps(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """Flip item b of ``x`` (B, ..., H, W) left-right where ``hflip[b]`` and upside down where ``vflip[b]``
    (bool (B,) each): images (B, 3, H, W), densities and teacher maps (B, H, W) alike."""
    if x.shape[0] != hflip.shape[0] or x.shape[0] != vflip.shape[0]:
        raise ValueError(f"flips: {hflip.shape[0]}/{vflip.shape[0]} flags for a batch of {x.shape[0]}")
    shape = (-1,) + (1,) * (x.dim() - 1)
    h, v = hflip.to(x.device).view(shape), vflip.to(x.device).view(shape)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


@dataclass
class SaliencySplit:
    """One split at a model's input size: ``images`` uint8 (N, 3, H, W), ``density`` float32 (N, H, W) (each
    sums to 1; :func:`resize_density` of the full-resolution density), and ``records``
    (:class:`~rollout_fast.saliency.data.Fixations` at the stimuli's own resolution, for evaluation)."""

    names: list[str]
    images: torch.Tensor
    density: torch.Tensor
    records: list[Fixations]

    def __len__(self) -> int:
        return len(self.names)


def load_saliency_split(root: str | Path, names: Sequence[str], size: tuple[int, int], *,
                        sigma: float, progress: bool = False, **dataset_kwargs) -> SaliencySplit:
    """Decode the stimuli ``names`` of a fixation dataset at ``size`` (H, W) with their densities.

    Args:
        root, names, ``dataset_kwargs`` (``stimuli``, ``fixations``, ``origin``): as
            :class:`~rollout_fast.saliency.data.FixationDataset`, which checks the data (clear errors
            naming the item: a fixation outside its image, an image without fixations, a .mat without the
            expected fields, an empty split, a missing stimulus).
        sigma: the density's Gaussian, pixels at the stimulus's resolution.

    Raises:
        As :class:`~rollout_fast.saliency.data.FixationDataset` and :func:`load_stimulus`.
    """
    from tqdm.auto import tqdm

    ds = FixationDataset(root, list(names), sigma=sigma, **dataset_kwargs)
    H, W = size
    images = torch.empty(len(ds), 3, H, W, dtype=torch.uint8)
    density = torch.empty(len(ds), H, W, dtype=torch.float32)
    for i, r in enumerate(tqdm(ds.records, desc=f"decode {len(ds)} stimuli", leave=False, disable=not progress)):
        images[i] = load_stimulus(ds.stimuli_dir / r.name, (H, W), expect=r.size)
        density[i] = resize_density(r.density(sigma), (H, W))
    return SaliencySplit(ds.names, images, density, ds.records)
