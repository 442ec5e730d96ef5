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
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_train_transform",
    "download_cifar100",
    "export_image_folder",
    "image_folder",
    "load_eval_data",
    "load_image",
    "resolve_split",
    "to_rgb8",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # the training set's channel statistics
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def to_rgb8(im):
    """A PIL image as 8-bit RGB: 16-bit and 32-bit integer images (modes ``I;16*``, ``I``) scaled from their
    range to 8 bits (PIL's ``convert`` would clip them: a 16-bit PNG turns white), float images (``F``) from
    [0, 1] or [0, 255]; other modes converted by PIL (palette, grey, alpha dropped, CMYK, 48-bit RGB)."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or (im.mode == "I" and 255 < top <= 65535):
            scale = 255.0 / 65535.0
        elif im.mode == "F" and top <= 1.0:
            scale = 255.0
        elif top > 255:  # an integer or float image beyond 16 bits: its own range
            scale = 255.0 / top
        else:
            scale = 1.0
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path: str | os.PathLike):
    """Read an image file as an 8-bit RGB PIL image: EXIF orientation applied, high bit depths scaled
    (:func:`to_rgb8`). The one decoder of the package's jobs and datasets.

    Raises:
        OSError (PIL.UnidentifiedImageError included) / ValueError: an unreadable or unsupported file.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return to_rgb8(ImageOps.exif_transpose(im))


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
    """``torchvision.datasets.ImageFolder`` over ``root`` (one sub-folder per class), images read by
    :func:`load_image`.

    Raises:
        FileNotFoundError: ``root`` missing.
        ValueError: ``root`` holds no class folders with images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data: folder {str(root)!r} does not exist")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
        raise ValueError(f"data: {str(root)!r} is not an ImageFolder tree with images ({e})") from e


def cifar_train_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD, size: int = 32):
    """Standard CIFAR augmentation: random crop with 4 px zero padding, horizontal flip, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])


def _labels_csv_dataset(root, transform):
    """A dataset over ``root/labels.csv`` (columns filename, class_index) and the images it names."""
    import csv

    import torch

    root = Path(root)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    if not rows or "filename" not in rows[0] or "class_index" not in rows[0]:
        raise ValueError(f"data: {root / 'labels.csv'} needs columns filename, class_index")
    img_dir = root / "images" if (root / "images").is_dir() else root

    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return transform(load_image(img_dir / rows[i]["filename"])), int(rows[i]["class_index"])

    return _DS()


def load_eval_data(root, data_config: dict, limit: int | None = None):
    """Images and labels: an ImageFolder tree, or a folder with ``labels.csv`` (filename, class_index) and
    ``images/`` (../shared/data/imagenet-sample); timm's eval transform. Returns ``(images (M, 3, H, W)
    float32, labels (M,) int64)``, the first ``limit`` samples when given (ImageFolder: evenly spread)."""
    import torch
    from timm.data import create_transform

    transform = create_transform(**data_config)
    root = Path(root)
    if (root / "labels.csv").is_file():
        ds = _labels_csv_dataset(root, transform)
    else:
        ds = image_folder(root, transform)
    n = len(ds)
    idx = list(range(n))
    if limit is not None and limit < n:
        idx = [int(i * n / limit) for i in range(limit)]  # spread over the classes of a sorted ImageFolder
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=500, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def export_image_folder(dataset, out: str | os.PathLike, classes: list[str] | None = None) -> int:
    """Write a labelled image dataset as an ImageFolder tree: ``out/<class name>/<index>.png``, lossless.

    Args:
        dataset: a map-style dataset of (PIL image, integer label) pairs (e.g. a torchvision dataset built
            without transforms).
        out: the split folder to create (``data/cifar100/train``); it must not hold images yet.
        classes: the class names by label (default ``dataset.classes``).

    Returns:
        The number of images written.

    Raises:
        FileExistsError: ``out`` already holds files (nothing is replaced).
        ValueError: no class names, or a label outside them.
    """
    classes = list(classes if classes is not None else getattr(dataset, "classes", []) or [])
    if not classes:
        raise ValueError("classes: the dataset has no .classes; pass the class names")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"out: {str(out)!r} already holds files; remove it or choose another folder")
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image, label = dataset[i]
        if not 0 <= int(label) < len(classes):
            raise ValueError(f"dataset: item {i} has label {label}, outside the {len(classes)} classes")
        tmp = out / classes[int(label)] / f"{i:05d}.png.tmp"
        to_rgb8(image).save(tmp, format="PNG")
        tmp.replace(tmp.with_suffix(""))
    return len(dataset)


def download_cifar100(out: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """CIFAR-100 (Krizhevsky 2009; 50,000 train / 10,000 test images of 32 px, 100 classes) downloaded by
    ``torchvision.datasets.CIFAR100`` (needs internet) and exported as ImageFolder trees ``out/train`` and
    ``out/test`` (:func:`export_image_folder`), the layout the trainers read. Each split is written to
    ``out/.SPLIT.partial`` and renamed when complete, so an interrupted export is redone, a finished one kept.

    Args:
        out: the dataset root to create.
        cache: where torchvision keeps the downloaded archive (default ``out/.torchvision``).

    Returns:
        ``out`` as a Path.

    Raises:
        RuntimeError / URLError: the download failed (torchvision's errors).
    """
    import shutil

    from torchvision.datasets import CIFAR100

    out = Path(out)
    cache = Path(cache) if cache is not None else out / ".torchvision"
    for split, train in (("train", True), ("test", False)):
        if (out / split).is_dir():
            continue
        partial = out / f".{split}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted export of ours
        export_image_folder(CIFAR100(str(cache), train=train, download=True), partial)
        partial.replace(out / split)
    return out
