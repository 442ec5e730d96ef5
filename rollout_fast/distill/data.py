"""Distillation data: ImageFolder splits decoded once into memory, deterministic augmentation views, the
object-placement shifts, and normalisation (+ augmentation) of uint8 batches on the device."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..metrics import shift_images

__all__ = ["Normalizer", "files_fingerprint", "fingerprint", "identity_params", "load_cache", "load_split_tensor",
           "placement_params", "split_files", "view_params"]

CACHE_VERSION = 3  # bumped when what a cache file holds or how it is keyed changes


def fingerprint(*parts) -> str:
    """A short SHA-1 key of ``parts`` (their ``str``), for cache file names."""
    h = hashlib.sha1()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def files_fingerprint(root: str | os.PathLike, samples) -> str:
    """A SHA-1 key of the files of ``samples`` ((path, class index) pairs under ``root``): each one's path
    relative to ``root``, class and the SHA-1 of its bytes, so a file replaced, edited in place, added, removed
    or relabelled gives another key, while a copy of the same files (a data folder synced again, with new
    modification times) keeps it and finds its caches. Reads every file once (about 0.3 s per 100 MB)."""
    root = Path(root)
    h = hashlib.sha1()
    for path, label in samples:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha1").hexdigest()
        h.update(f"{Path(path).relative_to(root).as_posix()}\0{label}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def load_cache(path: Path | None, check):
    """The object in the cache file ``path``, or None when there is none (the caller then rebuilds it).

    A file that cannot be read (``torch.load(weights_only=True)``) or that ``check(obj)`` rejects (by raising)
    is reported by a ``UserWarning`` naming it and treated as absent, so it is rebuilt and replaced.
    """
    if path is None or not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        check(obj)
    except Exception as e:  # noqa: BLE001 -- torch raises OSError, KeyError, RuntimeError ... for a corrupt file
        warnings.warn(f"cache: {str(path)!r} is corrupt or stale ({type(e).__name__}: {e}); rebuilding it",
                      stacklevel=3)
        return None
    return obj


def _check_split(obj, n: int, size: tuple[int, int], labels: list[int]) -> None:
    if not isinstance(obj, dict) or set(obj) != {"images", "labels"}:
        raise ValueError("not a decoded-split cache")
    images, got = obj["images"], obj["labels"]
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, *size) or got.tolist() != labels:
        raise ValueError(f"images {tuple(images.shape)} {images.dtype}, expected {(n, 3, *size)} uint8 "
                         "and the folder's labels")


def load_split_tensor(root: str | os.PathLike, size: tuple[int, int], cache_dir: str | os.PathLike | None = None,
                      *, workers: int = 0, progress: bool = True, crop_pct: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Decode an ImageFolder split once: ``(images uint8 (N, 3, H, W), labels int64 (N,), key)``.

    Images are resized (shorter side, bicubic) to ``floor(min(size) / crop_pct)`` and centre-cropped to
    ``size`` = (H, W): timm's eval transform (``crop_pct`` 1: the whole image, the CIFAR teacher's; 0.875:
    the centre 112 px of a 128 px resize, the Imagenette teacher's). With ``cache_dir`` the tensors are
    cached there (``images_<key>.pt``) under a key of the content: every file's relative path, class and
    bytes (:func:`files_fingerprint`), the transform and ``size``; a corrupt cache file is
    reported by name (``UserWarning``) and rebuilt.

    Raises:
        FileNotFoundError: missing folder. ValueError: a folder with no class folders or images, or
            ``crop_pct`` outside (0, 1].
    """
    import math

    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from tqdm.auto import tqdm

    from ..data import image_folder

    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct: expected a number in (0, 1], got {crop_pct!r}")
    scale = min(size) if crop_pct == 1.0 else math.floor(min(size) / crop_pct)  # timm's scale_size
    tf = T.Compose([T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.PILToTensor()])
    ds = image_folder(root, tf)
    key = fingerprint(CACHE_VERSION, files_fingerprint(root, ds.samples), tf, tuple(size))
    path = Path(cache_dir) / f"images_{key}.pt" if cache_dir is not None else None
    obj = load_cache(path, lambda o: _check_split(o, len(ds), tuple(size), [y for _, y in ds.samples]))
    if obj is not None:
        return obj["images"], obj["labels"], key
    images = torch.empty((len(ds), 3, *size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    i = 0
    loader = DataLoader(ds, batch_size=500, num_workers=workers)
    for x, y in tqdm(loader, desc=f"decode {Path(root).name}", leave=False, disable=not progress):
        images[i:i + len(y)] = x
        labels[i:i + len(y)] = y
        i += len(y)
    if path is not None:
        atomic_write(path, lambda tmp: torch.save({"images": images, "labels": labels}, tmp))
    return images, labels, key


def split_files(root: str | os.PathLike) -> list[str]:
    """The image files of an ImageFolder split in the order of :func:`load_split_tensor`'s images (paths as
    ``root`` was given: joined to it).

    Raises:
        FileNotFoundError: missing folder. ValueError: a folder with no class folders or images.
    """
    from ..data import image_folder

    return [str(path) for path, _ in image_folder(root).samples]


def view_params(seed: int, view: int, n: int, max_shift: int, flip: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmentation of every image in one view: ``(dx, dy, flip)``, each (n,), from (seed, view) only.

    View 0 is the identity. dx, dy are int64 in [-max_shift, max_shift]; flip is bool.
    """
    if view == 0:
        z = torch.zeros(n, dtype=torch.long)
        return z, z.clone(), torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * view + 17)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    fl = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dx, dy, fl


def identity_params(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No augmentation for ``n`` images, in the form of :func:`view_params`."""
    return (torch.zeros(n, dtype=torch.long),) * 2 + (torch.zeros(n, dtype=torch.bool),)


def placement_params(seed: int, n: int, shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The object-placement test's shifts: each image moved by (+-shift, +-shift), a random diagonal."""
    g = torch.Generator().manual_seed(seed + 424242)
    sx = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    sy = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return sx * shift, sy * shift, torch.zeros(n, dtype=torch.bool)


class Normalizer:
    """uint8 (B, 3, H, W) -> the teacher's normalised float input on ``device``, optionally shifted by
    (dx, dy) and flipped (border filled with the mean colour, i.e. 0 after normalisation)."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, u8: torch.Tensor, dx=None, dy=None, flip=None) -> torch.Tensor:
        x = (u8.to(self.device).float() / 255.0 - self.mean) / self.std
        if dx is not None:
            x = shift_images(x, dx.to(self.device), dy.to(self.device), flip.to(self.device), fill=0.0)
        return x
