"""The rollout jobs' input pipeline and precision (rollout_fast.pipeline): DataLoader workers give the same batches
and maps as in-process decoding, unreadable files come back by name with the reason, fp16 is refused off CUDA and
bf16 runs a bf16 copy of the model on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast.data import CIFAR10_MEAN, CIFAR10_STD
from rollout_fast.jobs import rollout_images
from rollout_fast.pipeline import (
    Batch,
    ImageFiles,
    collate_readable,
    image_batches,
    plan_batches,
    precision_setup,
)

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "interpolation": "bilinear",
               "crop_pct": 1.0, "crop_mode": "center"}


def _vit():
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """7 files: 6 PNGs (RGB, grey, RGBA, several sizes) and an empty file at position 2."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    out = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "RGB", "RGB", "L"]):
        f = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (28 + 4 * i, 36, 3), dtype=np.uint8)).convert(mode).save(f)
        out.append(str(f))
    (d / "empty.png").write_bytes(b"")
    out.insert(2, str(d / "empty.png"))
    return out


def _transform():
    from timm.data import create_transform

    return create_transform(**DATA_CONFIG)


def test_plan_batches_cuts_fixed_runs_of_positions():
    assert plan_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_batches(10, 4, start=4) == [[4, 5, 6, 7], [8, 9]]
    assert plan_batches(3, 5, start=3) == []


def test_the_collate_drops_unreadable_files_and_names_them(files):
    ds = ImageFiles(files, _transform())
    batch = collate_readable([ds[1], ds[2], ds[3]])
    assert isinstance(batch, Batch) and batch.images.shape == (2, 3, 32, 32) and batch.index == [1, 3]
    (pos, why), = batch.skipped
    assert pos == 2 and why.startswith("UnidentifiedImageError: cannot identify image file") and "empty.png" in why
    none = collate_readable([ds[2]])
    assert none.images is None and none.index == [] and none.skipped[0][0] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_the_same_with_workers(files, workers):
    plan = plan_batches(len(files), 3)
    with pytest.warns(UserWarning, match="skipping unreadable image .*empty.png.*UnidentifiedImageError"):
        got = list(image_batches(files, _transform(), plan, workers=workers))
    ds = ImageFiles(files, _transform())
    assert [b.index for b in got] == [[0, 1], [3, 4, 5], [6]] and [b.skipped[0][0] for b in got[:1]] == [2]
    for b in got:
        want = torch.stack([ds[i][1] for i in b.index])
        assert b.images.dtype == torch.float32 and torch.equal(b.images, want)


def test_rollout_images_with_workers_writes_the_same_npz(files, tmp_path):
    runs = []
    for workers in (0, 2):
        with pytest.warns(UserWarning, match="empty.png"):
            res = rollout_images(files, tmp_path / f"w{workers}", _vit(), DATA_CONFIG, batch_size=3, workers=workers,
                                 overlays="sample", progress=False)
        assert [f for f, _ in res.skipped] == [files[2]] and len(res.overlays) == 6
        with np.load(res.npz) as z:
            runs.append({k: z[k] for k in z.files})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    with pytest.raises(ValueError, match="workers: expected an int >= 0, got -1"):
        rollout_images(files, tmp_path / "bad", _vit(), DATA_CONFIG, workers=-1, progress=False)


def test_precision_modes():
    model = _vit()
    same, _, dtype = precision_setup(model, "cpu", "fp32")
    assert same is model and dtype is None
    low, _, dtype = precision_setup(model, "cpu", "bf16")
    assert dtype == torch.bfloat16 and low is not model
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model is not changed
    with pytest.raises(ValueError, match=r"^precision: fp16 needs a CUDA device \(here cpu\); use bf16 or fp32$"):
        precision_setup(model, "cpu", "fp16")
    with pytest.raises(ValueError, match="precision: expected one of"):
        precision_setup(model, "cpu", "int8")


def test_bf16_on_the_cpu_gives_maps_close_to_fp32(files, tmp_path):
    maps = {}
    for precision in ("fp32", "bf16"):
        with pytest.warns(UserWarning, match="empty.png"):
            res = rollout_images(files, tmp_path / precision, _vit(), DATA_CONFIG, precision=precision,
                                 overlays=False, progress=False)
        with np.load(res.npz) as z:
            maps[precision] = z["maps"]
    assert maps["bf16"].dtype == np.float32 and not np.array_equal(maps["bf16"], maps["fp32"])
    np.testing.assert_allclose(maps["bf16"], maps["fp32"], atol=0.05)
