"""The CLI's jobs as such (rollout_fast.jobs): collecting images, rollout over files, folder evaluation, on a tiny
random-weight ViT (no ../shared data needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast.data import CIFAR10_MEAN, CIFAR10_STD
from rollout_fast.jobs import class_names_of, collect_images, evaluate_folder, rollout_images

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "interpolation": "bilinear",
               "crop_pct": 1.0, "crop_mode": "center"}


def _vit(num_classes=10):
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                             num_classes=num_classes).eval()


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, (size, mode) in enumerate([((40, 50), "RGB"), ((32, 32), "L"), ((64, 20), "RGBA")]):
        f = tmp_path / "imgs" / f"{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).convert(mode).save(f)
        files.append(f)
    return files


def test_collect_images_finds_files_and_image_folders(tmp_path, image_files):
    (tmp_path / "imgs" / "sub").mkdir()
    (tmp_path / "imgs" / "sub" / "x.JPG").write_bytes(b"")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    found = collect_images([image_files[0], tmp_path / "imgs"])
    assert found[0] == image_files[0]
    assert found[1:] == sorted([*image_files, tmp_path / "imgs" / "sub" / "x.JPG"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_images([tmp_path / "missing.png"])


def test_class_names_from_the_pretrained_cfg():
    model = _vit()
    assert class_names_of(model) is None
    model.pretrained_cfg = {"label_names": [f"c{i}" for i in range(10)]}
    assert class_names_of(model)[3] == "c3"


def test_rollout_images_writes_maps_overlays_and_grid(image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.png"):
        res = rollout_images([*image_files, broken], out, _vit(), DATA_CONFIG, batch_size=2, progress=False)
    assert res.files == [str(f) for f in image_files] and [s[0] for s in res.skipped] == [str(broken)]
    assert len(res.overlays) == 3 and all(p.is_file() for p in res.overlays) and res.grid.is_file()
    data = np.load(res.npz)
    assert data["maps"].shape == (3, 8, 8) and data["maps"].dtype == np.float32
    np.testing.assert_allclose(data["maps"].max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert data["predicted_class"].dtype == np.int64 and str(data["method"]) == "attention"
    assert "target_class" not in data and "student_maps" not in data
    assert list(data["predicted_label"]) == [str(c) for c in data["predicted_class"]]


def test_rollout_images_grad_method_explains_the_target(image_files, tmp_path):
    res = rollout_images(image_files, tmp_path / "g", _vit(), DATA_CONFIG, method="grad", target=4,
                         overlays=False, progress=False)
    data = np.load(res.npz)
    assert res.overlays == [] and data["target_class"].tolist() == [4, 4, 4] and str(data["method"]) == "grad"


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"method": "lrp"}, ValueError, "method"),
    ({"target": 3}, ValueError, "only with method 'grad'"),
    ({"method": "grad", "target": 10}, ValueError, r"class 10 is outside the model's classes \[0, 10\)"),
    ({"method": "grad", "target": "3"}, TypeError, "target: expected an int"),
])
def test_rollout_images_bad_arguments_write_nothing(image_files, tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rollout_images(image_files, tmp_path / "o", _vit(), DATA_CONFIG, progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_rollout_images_nothing_readable(tmp_path):
    bad = tmp_path / "a.png"
    bad.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 inputs could be read"):
        rollout_images([bad], tmp_path / "o", _vit(), DATA_CONFIG, progress=False)
    assert not (tmp_path / "o").exists()


def test_rollout_images_student_of_another_grid_writes_nothing(image_files, tmp_path):
    from rollout_fast.students import create_student

    student = create_student("resnet-cifar", strategy="lowres", factor=2, input_size=(32, 32), grid=(4, 4))
    with pytest.raises(ValueError, match="grid"):
        rollout_images(image_files, tmp_path / "o", _vit(), DATA_CONFIG, student=student, progress=False)
    assert not (tmp_path / "o").exists()
    good = create_student("resnet-cifar", strategy="lowres", factor=2, input_size=(32, 32), grid=(8, 8))
    res = rollout_images(image_files, tmp_path / "s", _vit(), DATA_CONFIG, student=good, overlays=False,
                         progress=False)
    assert np.load(res.npz)["student_maps"].shape == (3, 8, 8)


def test_evaluate_folder_on_a_tiny_image_folder(tiny_cifar):
    acc = evaluate_folder(_vit(), DATA_CONFIG, tiny_cifar / "test", batch_size=8, progress=False)
    assert 0.0 <= acc <= 1.0
    assert evaluate_folder(_vit(), DATA_CONFIG, tiny_cifar / "test", indices=[0], progress=False) in (0.0, 1.0)


def test_rollout_images_refuses_an_earlier_run_and_overwrite_replaces_it(image_files, tmp_path):
    """An earlier run is never replaced silently: refused without overwrite (nothing touched); with overwrite
    the old npz, grid and overlays go first, so the folder matches the new rollout.npz; other files stay."""
    out = tmp_path / "out"
    first = rollout_images(image_files, out, _vit(), DATA_CONFIG, batch_size=2, progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(FileExistsError, match=r"out: .* holds an earlier run \(grid.png, overlays, rollout.npz\); "
                                              r"pass overwrite=True \(--overwrite\)"):
        rollout_images(image_files[:1], out, _vit(), DATA_CONFIG, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    res = rollout_images(image_files[:1], out, _vit(), DATA_CONFIG, progress=False, overwrite=True)
    assert np.load(res.npz)["maps"].shape == (1, 8, 8)
    assert sorted((out / "overlays").iterdir()) == res.overlays == [first.overlays[0]]
    assert (out / "notes.txt").read_text() == "mine"
    rollout_images(image_files[:2], out, _vit(), DATA_CONFIG, progress=False, overwrite=True, overlays=False)
    assert not (out / "overlays").exists() and np.load(out / "rollout.npz")["maps"].shape == (2, 8, 8)


def test_rollout_images_checks_the_output_folder_before_reading(image_files, tmp_path, monkeypatch):
    from rollout_fast import jobs

    def fail(*a, **k):
        raise AssertionError("an image was read before the output folder was checked")

    monkeypatch.setattr(jobs, "AttentionRollout", fail)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="out: .*taken' is a file"):
        rollout_images(image_files, a_file, _vit(), DATA_CONFIG, progress=False)
    with pytest.raises(NotADirectoryError, match="cannot create folder"):
        rollout_images(image_files, a_file / "sub", _vit(), DATA_CONFIG, progress=False)
    assert a_file.read_text() == "x"


def test_rollout_progress_covers_the_whole_job(image_files, tmp_path, monkeypatch):
    """The bar is not at 100% while the last batch is explained or the grid is drawn: one step per file once its
    map and overlay are written (a skipped file when skipped), the last step after rollout.npz and grid.png."""
    from rollout_fast import jobs, viz

    bars, seen = [], []

    class Bar:
        def __init__(self, total, enabled):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_description(self, text):
            seen.append(("description", text))

        def close(self):
            self.closed = True

    explain, save_grid = jobs.AttentionRollout.explain, viz.save_grid

    def spy_explain(self, x):
        seen.append(("explain", bars[0].n))
        return explain(self, x)

    def spy_grid(*a, **k):
        seen.append(("grid", bars[0].n))
        return save_grid(*a, **k)

    monkeypatch.setattr(jobs, "_progress_bar", Bar)
    monkeypatch.setattr(jobs.AttentionRollout, "explain", spy_explain)
    monkeypatch.setattr(viz, "save_grid", spy_grid)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    with pytest.warns(UserWarning, match="broken.png"):
        rollout_images([broken, *image_files], tmp_path / "o", _vit(), DATA_CONFIG, batch_size=2, progress=True)
    bar = bars[0]
    assert bar.total == 5 and bar.n == 5 and bar.closed
    # the skipped file; then the first batch of 2, counted as their overlays are written (by worker threads)
    assert seen[0] == ("explain", 1) and seen[1][0] == "explain" and 1 <= seen[1][1] <= 3
    assert seen[2][0] == "description" and seen[3] == ("grid", 4)


def test_rollout_overlays_are_written_by_threads_and_their_errors_surface(image_files, tmp_path, monkeypatch):
    """Overlays are encoded in worker threads; a worker's error is raised by rollout_images (not lost), and
    no writer thread is left running after it returns."""
    import threading

    from rollout_fast import viz

    save, writers = viz.OverlayRenderer.save, set()

    def spy(self, image, rollout_map, path, title=None):
        writers.add(threading.current_thread().name)
        if path.name.startswith("00001_"):
            raise OSError("disk full (test)")
        return save(self, image, rollout_map, path, title)

    monkeypatch.setattr(viz.OverlayRenderer, "save", spy)
    with pytest.raises(OSError, match="disk full"):
        rollout_images(image_files, tmp_path / "o", _vit(), DATA_CONFIG, batch_size=1, progress=False)
    assert writers and all(n.startswith("rollout-overlay") for n in writers)
    assert not any(t.name.startswith("rollout-overlay") for t in threading.enumerate())
    assert not (tmp_path / "o" / "grid.png").exists()


def test_rollout_waits_for_every_overlay_before_the_grid(image_files, tmp_path, monkeypatch):
    import time

    from rollout_fast import viz

    save, grid = viz.OverlayRenderer.save, viz.save_grid
    written = []

    def slow(self, image, rollout_map, path, title=None):
        time.sleep(0.05)
        written.append(save(self, image, rollout_map, path, title))
        return written[-1]

    def spy_grid(*a, **k):
        assert len(written) == 3, "grid drawn before every overlay was written"
        return grid(*a, **k)

    monkeypatch.setattr(viz.OverlayRenderer, "save", slow)
    monkeypatch.setattr(viz, "save_grid", spy_grid)
    res = rollout_images(image_files, tmp_path / "o", _vit(), DATA_CONFIG, batch_size=2, progress=False)
    assert sorted(written) == sorted(res.overlays) and all(p.is_file() for p in res.overlays)
