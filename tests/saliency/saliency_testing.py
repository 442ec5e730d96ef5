"""Helpers shared by the saliency tests (pytest puts this folder on sys.path; the distillation tests add it too):
a tiny generated OSIE-layout dataset, the real OSIE location, tiny saved models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
OSIE_ROOT = Path(os.environ.get("ROLLOUT_FAST_SHARED", REPO.parent / "shared")) / "data" / "osie"
TINY_SPEC = {"encoder": "resnet18", "decoder": [8, 8, 8, 8], "heads": 1, "input_size": [24, 32]}


def write_fixation_dataset(root: Path, n: int = 6, size: tuple[int, int] = (48, 64), n_val: int = 2,
                           seed: int = 0, subjects: int = 3) -> tuple[Path, Path]:
    """An OSIE-layout dataset of ``n`` photos (H, W = ``size``): a bright disc at a random place on a dark
    textured background, fixations (1-based, as OSIE's .mat) scattered around the disc; and a split file
    (first ``n - n_val`` names train, the rest val). Returns ``(root, split_file)``."""
    import scipy.io
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "data" / "stimuli").mkdir(parents=True)
    (root / "data" / "eye").mkdir(parents=True)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W]
    cells = np.empty((n, 1), dtype=object)
    names = [f"{1001 + i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        cx, cy = rng.uniform(0.2 * W, 0.8 * W), rng.uniform(0.2 * H, 0.8 * H)
        img = rng.integers(0, 60, (H, W, 3)).astype(np.float64)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.12 * W) ** 2] = [250, 220, 40]
        Image.fromarray(img.astype(np.uint8)).save(root / "data" / "stimuli" / name, quality=95)
        subs = np.empty((subjects, 1), dtype=object)
        for j in range(subjects):
            k = int(rng.integers(2, 6))
            x = np.clip(cx + rng.normal(0, 0.05 * W, k), 0, W - 1) + 1.0
            y = np.clip(cy + rng.normal(0, 0.05 * H, k), 0, H - 1) + 1.0
            subs[j, 0] = {"fix_x": x, "fix_y": y, "fix_duration": np.full(k, 200.0)}
        cells[i, 0] = {"img": name, "subjects": subs}
    scipy.io.savemat(root / "data" / "eye" / "fixations.mat", {"fixations": cells})
    split = root / "split.json"
    split.write_text(json.dumps({"dataset": "tiny", "seed": seed, "train": names[:n - n_val],
                                 "val": names[n - n_val:]}))
    return root, split


def save_tiny_saliency_model(path: Path, heads: int = 1, seed: int = 0, **spec) -> Path:
    """A random tiny :class:`rollout_fast.saliency.SaliencyNet` saved with its card; returns the weights path."""
    import torch

    from rollout_fast.saliency import create_saliency_model, save_saliency_model

    torch.manual_seed(seed)
    model = create_saliency_model({**TINY_SPEC, **spec}, heads=heads)
    save_saliency_model(path, model, {"name": path.stem})
    return path
