"""Datasets and transforms (torchvision ImageFolder + timm transforms), with clear errors.

CIFAR-10 statistics are the published ones (Krizhevsky 2009); the class order is the standard one,
which is also the alphabetical ImageFolder order.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_train_transform",
    "image_folder",
    "resolve_split",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def resolve_split(root: str | os.PathLike, split: str) -> Path:
    """Return ``root/split`` if it exists, else ``root`` itself (a split folder was given).

    Raises:
        FileNotFoundError: if ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data: folder {str(root)!r} does not exist")
    return root / split if (root / split).is_dir() else root


def image_folder(root: str | os.PathLike, transform=None):
    """``torchvision.datasets.ImageFolder`` over ``root`` (one sub-folder per class).

    Raises:
        FileNotFoundError: ``root`` missing.
        ValueError: ``root`` holds no class folders with images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data: folder {str(root)!r} does not exist")
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
        raise ValueError(f"data: {str(root)!r} is not an ImageFolder tree with images ({e})") from e


def cifar_train_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD, size: int = 32):
    """Standard CIFAR augmentation: random crop with 4 px zero padding, horizontal flip, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])
