"""Where the tests find the repository and the real data in ../shared (``ROLLOUT_FAST_SHARED`` overrides).

Import these from here (``from paths import CIFAR10``), never from ``conftest``: pytest imports every
folder's conftest.py as a module named ``conftest``, so ``from conftest import`` may get another folder's.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ROLLOUT_FAST_SHARED", REPO.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
IMAGENETTE = SHARED / "data" / "imagenette"
