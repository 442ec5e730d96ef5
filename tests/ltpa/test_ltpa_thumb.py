"""The thumbnail Learn to Pay Attention recipes (cifar10-ltpa-thumb, imagenette-ltpa-thumb): AttnVGG supports
their sizes, the augmentation runs at the teacher's size and is then downscaled, and a one-epoch smoke run gives a
16 px model that load_teacher reads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from rollout_fast.ltpa import ltpa_map_sizes
from rollout_fast.teacher import RECIPES, _train_transform, check_config, load_recipe, train_teacher
from rollout_fast.zoo import load_teacher


def test_thumb_recipes():
    c, i = RECIPES["cifar10-ltpa-thumb"], RECIPES["imagenette-ltpa-thumb"]
    assert (c.arch["img_size"], c.source_size, c.augment, c.arch["width"]) == (16, 32, "crop-pad", 0.125)
    assert (i.arch["img_size"], i.source_size, i.augment, i.arch["width"]) == (28, 112, "rrc", 0.125)
    assert ltpa_map_sizes(16) == ((8, 8), (4, 4), (2, 2))  # level 1 on the CIFAR teacher's 8x8 grid
    assert ltpa_map_sizes(28) == ((14, 14), (7, 7), (4, 4))  # level 1 on the Imagenette teacher's 14x14 grid
    for name in ("cifar10-ltpa-thumb", "imagenette-ltpa-thumb"):  # the rest is the full-size recipe's
        base = RECIPES[name.removesuffix("-thumb")]
        assert (RECIPES[name].lr, RECIPES[name].optimizer, RECIPES[name].step_epochs) == (base.lr, "sgd", (8, 12))
    assert RECIPES["cifar10-ltpa"].source_size is None


def test_thumb_augmentation_is_the_teacher_size_crop_then_downscaled():
    from torchvision import transforms as T

    img = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    cfg = RECIPES["cifar10-ltpa-thumb"]
    plain = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                       T.Resize(16, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.ToTensor(),
                       T.Normalize(cfg.mean, cfg.std)])
    for seed in range(3):
        torch.manual_seed(seed)
        got = _train_transform(cfg)(img)
        torch.manual_seed(seed)
        assert got.shape == (3, 16, 16) and torch.equal(got, plain(img))
    torch.manual_seed(0)
    assert _train_transform(RECIPES["cifar10-ltpa"])(img).shape == (3, 32, 32)


def test_source_size_smaller_than_the_model_is_refused():
    with pytest.raises(ValueError) as e:
        check_config(load_recipe("cifar10-ltpa-thumb", source_size=8))
    assert str(e.value) == "source_size: expected None or an int >= arch img_size (16), got 8"


def test_thumb_smoke_run_loads_as_a_16px_model(tiny_cifar, tmp_path):
    cfg = replace(RECIPES["cifar10-ltpa-thumb"], epochs=1, batch_size=8, workers=0, warmup_epochs=0,
                  arch=dict(RECIPES["cifar10-ltpa-thumb"].arch, width=1 / 16))
    card = train_teacher(tiny_cifar, tmp_path / "thumb", cfg, device="cpu", progress=False)
    assert card["training"]["source_size"] == 32 and tuple(card["data_config"]["input_size"]) == (3, 16, 16)
    model, dc = load_teacher(str(tmp_path / "thumb" / "teacher.safetensors"))
    assert model.img_size == 16 and dc["input_size"] == (3, 16, 16)
    _, maps = model(torch.zeros(1, 3, 16, 16))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8), (1, 4, 4), (1, 2, 2)]
