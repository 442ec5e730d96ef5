"""Shared fixtures: deterministic seeds, TF32 off, and the location of ../shared data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported (timm imports it), or triton's
# own @jit library functions are built for the GPU and fail inside interpreted kernels. Without a GPU
# the Triton tests run in the interpreter; "auto" never picks it (rollout_fast.ops), so other tests
# are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paths import CIFAR10, IMAGENET_SAMPLE, IMAGENETTE


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernels run in a test: 'cuda', else 'cpu' through Triton's interpreter (set up
    above, before triton's first import); skips without Triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install '.[triton]')")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (it must be set before triton is imported)")
    return "cpu"


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A tiny random-pixel CIFAR-like ImageFolder root: train/ (4 per class) and test/ (2 per class),
    10 classes of 32 x 32 PNGs."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def cifar10_test() -> Path:
    """The real CIFAR-10 test split in ../shared (skips where ../shared is absent)."""
    root = CIFAR10 / "test"
    if not root.is_dir():
        pytest.skip(f"real CIFAR-10 data not found at {root} (set ROLLOUT_FAST_SHARED to the shared/ "
                    "folder holding data/cifar10)")
    return root


@pytest.fixture
def imagenet_sample() -> Path:
    """The real ImageNet sample photos in ../shared (skips where ../shared is absent)."""
    if not (IMAGENET_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real ImageNet sample not found at {IMAGENET_SAMPLE} (set ROLLOUT_FAST_SHARED to the shared/ "
                    "folder holding data/imagenet-sample)")
    return IMAGENET_SAMPLE


@pytest.fixture
def imagenette_val() -> Path:
    """The real Imagenette validation split in ../shared (3,925 photos; skips where ../shared is absent)."""
    root = IMAGENETTE / "val"
    if not root.is_dir():
        pytest.skip(f"real Imagenette data not found at {root} (set ROLLOUT_FAST_SHARED to the shared/ "
                    "folder holding data/imagenette)")
    return root
