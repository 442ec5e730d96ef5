"""Helpers for the Imagenette-layout tests (issue 13): a tiny random-weights ViT with the ``imagenette-vit``
token layout (112 px, 8 px patches: 14 x 14 + class token, depth 6) saved with its card through the project's own
functions, and a tiny Imagenette-like ImageFolder tree (train/ and val/ of 160 px photos named by wnid, with
classes.txt). Import with ``from imagenette_testing import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rollout_fast.checkpoint import save_weights, write_json
from rollout_fast.teacher import IMAGENETTE_ARCH, _card, load_recipe, teacher_data_config

# the shipped recipe's layout (img 112, patch 8, depth 6, conv stem, 10 classes) at a tiny width
TINY_IMAGENETTE_ARCH = {**IMAGENETTE_ARCH, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.0,
                        "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}
WNIDS = [f"n0{i:07d}" for i in range(10)]
NAMES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
         "gas pump", "golf ball", "parachute"]


def save_tiny_imagenette_teacher(folder: Path, seed: int = 0) -> Path:
    """``folder/imagenette-vit.safetensors`` (random weights, seeded) with the ``.json`` card that
    :func:`rollout_fast.teacher.train_teacher` writes for the ``imagenette-vit`` recipe (data config: ImageNet
    mean/std, 112 px, crop_pct 0.875); returns the weights' path."""
    from rollout_fast.models import create_model

    cfg = load_recipe("imagenette-vit")
    cfg.arch = dict(TINY_IMAGENETTE_ARCH)
    torch.manual_seed(seed)
    model = create_model(cfg.arch)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "imagenette-vit.safetensors"
    save_weights(path, model.state_dict())
    data_config = teacher_data_config(112, cfg.mean, cfg.std, cfg.crop_pct)
    write_json(path.with_suffix(".json"), _card(cfg, data_config, NAMES, WNIDS, 0.1, 0, torch.device("cpu"),
                                                "tests: random weights of the imagenette-vit layout"))
    return path


def make_tiny_imagenette(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """An Imagenette-like tree: ``root/{train,val}/<wnid>/*.jpg`` (160 x 160 RGB, a bright square on noise at a
    random place) and ``classes.txt`` (wnid TAB name); returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for wnid in WNIDS:
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (160, 160, 3), dtype=np.uint8)
                y, x = rng.integers(0, 112, 2)
                img[y:y + 48, x:x + 48] = 240
                Image.fromarray(img).save(d / f"{wnid}_{i}.jpg", quality=90)
    (root / "classes.txt").write_text("".join(f"{w}\t{n}\n" for w, n in zip(WNIDS, NAMES)))
    return root
