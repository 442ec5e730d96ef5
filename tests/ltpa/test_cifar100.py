"""CIFAR-100 for users online (issue 14): torchvision's dataset exported as the ImageFolder tree the trainers read,
pixels and labels unchanged, an interrupted export redone, a finished one kept; the cifar100-ltpa recipe trains
on the exported tree. torchvision's download is replaced by a fake dataset (no internet here)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from rollout_fast.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    download_cifar100,
    export_image_folder,
    image_folder,
)
from rollout_fast.teacher import RECIPES, train_teacher


class FakeCIFAR100:
    """torchvision.datasets.CIFAR100's interface: (PIL image, label) items, ``classes``; records its calls."""

    calls: ClassVar[list] = []
    classes: ClassVar[list] = [f"class_{i:03d}" for i in range(100)]

    def __init__(self, root, train=True, download=False):
        FakeCIFAR100.calls.append((root, train, download))
        rng = np.random.default_rng(1 if train else 2)
        n = 200 if train else 100
        self.pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.labels = [(3 * i + (0 if train else 1)) % 100 for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.pixels[i]), self.labels[i]


@pytest.fixture
def fake_torchvision(monkeypatch):
    import torchvision.datasets

    FakeCIFAR100.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    return FakeCIFAR100


def test_export_writes_every_image_losslessly_under_its_class(tmp_path):
    ds = FakeCIFAR100("unused", train=False)
    assert export_image_folder(ds, tmp_path / "test") == 100
    tree = image_folder(tmp_path / "test")
    assert tree.classes == sorted(FakeCIFAR100.classes) and len(tree) == 100
    for path, label in tree.samples:
        index = int(path.rsplit("/", 1)[1].removesuffix(".png"))
        assert tree.classes[label] == FakeCIFAR100.classes[ds.labels[index]]
        np.testing.assert_array_equal(np.asarray(Image.open(path)), ds.pixels[index])
    assert not list((tmp_path / "test").rglob("*.tmp"))


def test_export_refuses_a_folder_with_files_and_bad_labels(tmp_path):
    ds = FakeCIFAR100("unused", train=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="out: .*already holds files"):
        export_image_folder(ds, tmp_path / "full")
    ds.labels[5] = 100
    with pytest.raises(ValueError, match="item 5 has label 100"):
        export_image_folder(ds, tmp_path / "bad")
    with pytest.raises(ValueError, match="classes: the dataset has no .classes"):
        export_image_folder([(Image.new("RGB", (2, 2)), 0)], tmp_path / "none")


def test_download_exports_both_splits_keeps_finished_ones_and_redoes_partial_ones(tmp_path, fake_torchvision):
    root = download_cifar100(tmp_path / "cifar100")
    assert [c[1:] for c in fake_torchvision.calls] == [(True, True), (False, True)]
    assert fake_torchvision.calls[0][0] == str(tmp_path / "cifar100" / ".torchvision")
    assert len(image_folder(root / "train")) == 200 and len(image_folder(root / "test")) == 100
    assert len(image_folder(root / "train").classes) == 100

    fake_torchvision.calls.clear()
    download_cifar100(root)  # both finished: nothing downloaded or rewritten
    assert fake_torchvision.calls == []

    import shutil

    shutil.rmtree(root / "test")  # an interrupted test export left a partial folder behind
    (root / ".test.partial" / "class_000").mkdir(parents=True)
    (root / ".test.partial" / "class_000" / "stale.png").write_bytes(b"junk")
    download_cifar100(root)
    assert [c[1] for c in fake_torchvision.calls] == [False]
    assert not (root / ".test.partial").exists() and len(image_folder(root / "test")) == 100


def test_cifar100_recipe_trains_on_the_exported_tree(tmp_path, fake_torchvision):
    r = RECIPES["cifar100-ltpa"]
    assert (r.arch["num_classes"], r.mean, r.std, r.class_names) == (100, CIFAR100_MEAN, CIFAR100_STD, None)
    base = RECIPES["cifar10-ltpa"]  # the CIFAR-10 recipe otherwise
    assert (r.lr, r.optimizer, r.step_epochs, r.epochs, r.augment) == (base.lr, "sgd", (8, 12), 15, "crop-pad")
    root = download_cifar100(tmp_path / "cifar100")
    cfg = replace(r, epochs=1, batch_size=50, workers=0, warmup_epochs=0, arch=dict(r.arch, width=1 / 16))
    card = train_teacher(root, tmp_path / "run", cfg, device="cpu", progress=False)
    assert card["class_names"] == FakeCIFAR100.classes and card["test_images"] == 100
    assert tuple(card["data_config"]["mean"]) == CIFAR100_MEAN and card["name"] == "cifar100-ltpa"
