"""Helpers of the Learn to Pay Attention tool tests (tests/ltpa/): tiny random-weight AttnVGG models saved with a
card as load_teacher reads them, a tiny random ViT teacher saved the same way, and a few synthetic images. The
test files import this module by name (pytest puts their folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rollout_fast.checkpoint import save_weights, write_json
from rollout_fast.data import CIFAR10_MEAN, CIFAR10_STD
from rollout_fast.ltpa import create_attnvgg
from rollout_fast.teacher import teacher_data_config

TINY = 1 / 16  # channels 4, 8, 16, 32, 32, 32
CLASSES = [f"class{i}" for i in range(10)]


def tiny_ltpa(variant: str = "pc-softmax-after", img_size: int = 32, seed: int = 0):
    """A random-weight AttnVGG (width 1/16) in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = create_attnvgg({"type": "attnvgg", "img_size": img_size, "num_classes": 10, "variant": variant,
                            "width": TINY}).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return model


def save_card(model, path: Path, arch: dict, img_size: int) -> Path:
    """``model`` as ``path`` (.safetensors) + its card (.json), the files train-teacher writes."""
    save_weights(path, model.state_dict())
    write_json(path.with_suffix(".json"), {
        "name": path.stem, "arch": arch, "class_names": CLASSES,
        "data_config": teacher_data_config(img_size, CIFAR10_MEAN, CIFAR10_STD, 1.0)})
    return path


def saved_ltpa(tmp_path: Path, variant: str = "pc-softmax-after", img_size: int = 32, seed: int = 0) -> Path:
    model = tiny_ltpa(variant, img_size, seed)
    return save_card(model, tmp_path / f"ltpa-{variant}-{img_size}.safetensors", model.arch, img_size)


def saved_vit(tmp_path: Path) -> Path:
    """A random 2-block ViT teacher on 32 px inputs with 4 px patches (8x8 grid), saved with its card."""
    from rollout_fast.models import create_vit

    arch = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 24, "depth": 2, "num_heads": 2}
    torch.manual_seed(1)
    return save_card(create_vit(arch).eval(), tmp_path / "vit.safetensors", arch, 32)


def write_images(folder: Path, n: int = 3, size: int = 32, classes: int = 0) -> Path:
    """``n`` random RGB PNGs (in ``classes`` ImageFolder class folders when > 0)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    return folder
