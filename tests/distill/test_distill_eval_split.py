"""distill on a data folder whose evaluation split is val/ (Imagenette, issue 13): DistillConfig.test_split, the
teacher's crop_pct in decoding, and one-line errors for a missing split."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from distill_testing import cfg
from imagenette_testing import make_tiny_imagenette, save_tiny_imagenette_teacher
from PIL import Image

from rollout_fast.distill import DistillConfig, distill
from rollout_fast.distill.data import load_split_tensor


@pytest.fixture(scope="module")
def tiny_imagenette(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette")
    make_tiny_imagenette(root / "data", train_per_class=2, val_per_class=1)
    return root / "data", save_tiny_imagenette_teacher(root / "teacher")


def test_crop_pct_decodes_as_timms_eval_transform(tmp_path):
    from torchvision import transforms as T

    d = tmp_path / "split" / "a"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))
    img.save(d / "0.png")
    bic = T.InterpolationMode.BICUBIC
    whole, _, key1 = load_split_tensor(tmp_path / "split", (112, 112), progress=False)
    centre, _, key2 = load_split_tensor(tmp_path / "split", (112, 112), progress=False, crop_pct=0.875)
    want_whole = T.Compose([T.Resize(112, interpolation=bic), T.CenterCrop(112), T.PILToTensor()])(img)
    want_centre = T.Compose([T.Resize(128, interpolation=bic), T.CenterCrop(112), T.PILToTensor()])(img)
    assert torch.equal(whole[0], want_whole) and torch.equal(centre[0], want_centre)
    assert key1 != key2 and not torch.equal(whole, centre)
    with pytest.raises(ValueError, match=r"^crop_pct: expected a number in \(0, 1\], got 1.5$"):
        load_split_tensor(tmp_path / "split", (112, 112), progress=False, crop_pct=1.5)


def test_test_split_is_validated():
    for bad in ("", "train", "a/b", 3):
        with pytest.raises(ValueError, match="^test_split: expected the name of a split folder other than 'train'"):
            DistillConfig(test_split=bad).validate()
    assert DistillConfig().test_split == "test"


def test_val_split_run_on_the_imagenette_layout(tiny_imagenette, tmp_path):
    data, teacher = tiny_imagenette
    c = cfg(str(teacher), student="resnet-cifar", factor=4, head_epochs=0, batch_size=10, test_split="val",
            cache_targets=True, views=1, max_shift=28, student_options={"channels": [8, 8, 8, 8]})
    metrics = distill(data, tmp_path / "run", c, progress=False)
    assert metrics["test_images"] == 10 and metrics["object_placement"]["shift_pixels"] == 28
    card = json.loads((tmp_path / "run" / "student.json").read_text())
    assert card["training"]["test_split"] == "val" and card["output"]["grid"] == [14, 14]
    assert card["input"]["student_input_size"] == [28, 28] and card["input"]["data_config"]["crop_pct"] == 0.875
    with pytest.raises(ValueError, match=r"has no test/ split \(expected train/ and test/ ImageFolder trees"):
        distill(data, tmp_path / "other", replace(c, test_split="test"), progress=False)
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_missing_train_split_is_named(tiny_imagenette, tmp_path):
    data, teacher = tiny_imagenette
    with pytest.raises(ValueError) as e:
        distill(data / "val", tmp_path / "run", cfg(str(teacher), test_split="val"), progress=False)
    assert str(e.value) == (f"data: {str(data / 'val')!r} has no train/ and no val/ split (expected train/ and val/ "
                            "ImageFolder trees; test_split names the evaluation split)")
    with pytest.raises(FileNotFoundError, match=r"^data: folder .* does not exist$"):
        distill(tmp_path / "nowhere", tmp_path / "run", cfg(str(teacher)), progress=False)


def test_cli_passes_test_split():
    import argparse

    from rollout_fast.cli.distill import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--data", "d", "--out", "o", "--test-split", "val"])
    assert config_from_args(args).test_split == "val"
    assert config_from_args(p.parse_args(["--data", "d", "--out", "o"])).test_split == "test"
