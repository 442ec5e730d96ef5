"""Helpers shared by the student tests (pytest puts this folder on sys.path, so test files import it)."""

from __future__ import annotations

import torch

# small options per architecture, so the tests build in milliseconds
TINY = {
    "resnet-cifar": {"channels": [8, 8, 16, 16], "head_width": 8},
    "vit-tiny": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


def images(b=2, size=32):
    """A seeded (b, 3, size, size) batch."""
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
