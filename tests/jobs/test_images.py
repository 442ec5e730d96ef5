"""Image decoding (rollout_fast.data.load_image, used by rollout, the ImageFolder datasets and labels.csv data):
16-bit and other high-bit-depth images scaled to 8 bits rather than clipped, EXIF orientation applied."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast.data import image_folder, load_image, to_rgb8

GRADIENT = np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)


def _png16_rgb(path, arr):
    """A 48-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, suffix):
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(GRADIENT).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what PIL's convert("RGB") would clip: most pixels white
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9
    got = np.asarray(load_image(path))
    assert got.dtype == np.uint8 and got.shape == (48, 40, 3)
    want = np.rint(GRADIENT / 257.0)
    assert np.abs(got[..., 0] - want).max() <= 1 and (got[..., 0] == got[..., 2]).all()
    assert (got == 255).mean() < 0.01


def test_other_modes_to_rgb8():
    i32 = Image.fromarray(GRADIENT.astype(np.int32), mode="I")  # a 16-bit PNG as older Pillow opens it
    assert np.abs(np.asarray(to_rgb8(i32))[..., 1] - np.rint(GRADIENT / 257.0)).max() <= 1
    f01 = Image.fromarray((GRADIENT / 65535.0).astype(np.float32), mode="F")
    assert np.abs(np.asarray(to_rgb8(f01))[..., 0].astype(int) - np.rint(GRADIENT / 257.0)).max() <= 1
    small = Image.fromarray(np.arange(200, dtype=np.int32).reshape(10, 20), mode="I")  # 8-bit values stay
    assert np.asarray(to_rgb8(small))[..., 0].max() == 199
    p = Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).convert("P")
    assert to_rgb8(p).mode == "RGB"


def test_48_bit_rgb_png_keeps_its_colours(tmp_path):
    path = tmp_path / "rgb16.png"
    _png16_rgb(path, np.stack([GRADIENT, GRADIENT // 2, 65535 - GRADIENT], -1))
    got = np.asarray(load_image(path)).astype(int)
    assert np.abs(got[..., 0] - GRADIENT / 257.0).max() <= 1.5 and np.abs(got[..., 2] - (65535 - GRADIENT) / 257.0).max() <= 1.5


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = 255  # left half white as stored
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    got = np.asarray(load_image(path))
    assert got.shape == (40, 20, 3)  # width and height swapped
    assert got[:20].mean() > 200 and got[20:].mean() < 50  # the white half is now on top


def test_datasets_and_rollout_read_16_bit_images_like_their_8_bit_copy(tmp_path):
    from rollout_fast.data import CIFAR10_MEAN, CIFAR10_STD, load_eval_data
    from rollout_fast.jobs import rollout_images

    rng = np.random.default_rng(0)
    a16 = (rng.integers(0, 256, (32, 32)) * 257).astype(np.uint16)
    for name, arr in (("c16", a16), ("c8", (a16 // 257).astype(np.uint8))):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / "folder" / name / "0.png")
    ds = image_folder(tmp_path / "folder", lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert torch.equal(ds[0][0], ds[1][0])
    cfg = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "center"}
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "labels.csv").write_text("filename,class_index\n../folder/c16/0.png,0\n../folder/c8/0.png,1\n")
    x, _ = load_eval_data(tmp_path / "csv", cfg)
    assert torch.equal(x[0], x[1])
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    res = rollout_images([tmp_path / "folder" / "c16" / "0.png", tmp_path / "folder" / "c8" / "0.png"],
                         tmp_path / "out", vit, cfg, overlays=False, progress=False)
    maps = np.load(res.npz)["maps"]
    np.testing.assert_array_equal(maps[0], maps[1])
