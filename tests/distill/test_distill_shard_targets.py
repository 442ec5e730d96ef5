"""``distill --cache-targets --targets-from SHARD_DIR``: the unaugmented training targets are read from the shards of
``rollout-fast rollout --shards`` when they are this teacher's maps with these settings, refused (one line naming
the difference) otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_testing import cfg

from rollout_fast.cli import main
from rollout_fast.distill import distill
from rollout_fast.distill import targets as targets_module
from rollout_fast.shards import open_maps


def _shards(teacher, split, out, *extra):
    assert main(["rollout", str(split), "--model", teacher, "--out", str(out), "--shards", "--overlays", "none",
                 "--batch-size", "16", "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def train_shards(tiny_cifar, tiny_teacher, tmp_path_factory):
    """float32 shards of the tiny teacher's rollout of tiny_cifar/train (40 images, 3 shards)."""
    return _shards(tiny_teacher, tiny_cifar / "train", tmp_path_factory.mktemp("shards") / "s", "--dtype", "float32",
                   "--shard-size", "16")


def test_the_unaugmented_targets_come_from_the_shards(tiny_cifar, tiny_teacher, train_shards, tmp_path, monkeypatch):
    read, computed = [], []
    maps_for, compute = targets_module.ShardTargets.maps_for, targets_module.TeacherTargets.compute

    def spy_read(self, files):
        read.append((list(files), maps_for(self, files)))
        return read[-1][1]

    def spy_compute(self, images, params, desc):
        computed.append(desc)
        return compute(self, images, params, desc)

    monkeypatch.setattr(targets_module.ShardTargets, "maps_for", spy_read)
    monkeypatch.setattr(targets_module.TeacherTargets, "compute", spy_compute)
    metrics = distill(tiny_cifar, tmp_path / "run", cfg(tiny_teacher, cache_targets=True, views=2, train_images=24),
                      progress=False, targets_from=train_shards)
    assert metrics and "teacher maps (train view 0)" not in computed and "teacher maps (train view 1)" in computed
    (files, maps), = read
    assert len(files) == 24 and all(f.startswith(str(tiny_cifar / "train")) for f in files)
    shard_files, shard_maps, _ = open_maps(train_shards)
    want = np.stack([shard_maps[shard_files.index(f)] for f in files])
    assert maps.dtype == torch.float32 and np.array_equal(maps.numpy(), want)
    # they are the teacher's own maps of those images (the same decode and transform; other batches)
    from rollout_fast.distill.data import identity_params, load_split_tensor, split_files
    from rollout_fast.distill.ddp import DistEnv

    images, _, _ = load_split_tensor(tiny_cifar / "train", (32, 32), progress=False)
    order = [split_files(tiny_cifar / "train").index(f) for f in files]
    teacher = targets_module.TeacherTargets(cfg(tiny_teacher), DistEnv(1, 0, 0, torch.device("cpu")), tmp_path,
                                            progress=False)
    own = teacher.compute(images[order], identity_params(len(order)), "check")
    torch.testing.assert_close(maps, own, rtol=1e-5, atol=1e-6)


def test_float16_shards_are_widened(tiny_cifar, tiny_teacher, tmp_path):
    from rollout_fast.distill.ddp import DistEnv
    from rollout_fast.distill.targets import ShardTargets, TeacherTargets

    half = _shards(tiny_teacher, tiny_cifar / "train", tmp_path / "h")
    teacher = TeacherTargets(cfg(tiny_teacher, cache_targets=True), DistEnv(1, 0, 0, torch.device("cpu")), tmp_path,
                             progress=False, shards=half)
    files = [str(tiny_cifar / "train" / "class3" / "1.png"), str(tiny_cifar / "train" / "class0" / "0.png")]
    maps = teacher.shards.maps_for(files)
    shard_files, shard_maps, _ = open_maps(half)
    assert maps.dtype == torch.float32
    assert np.array_equal(maps.numpy(), np.stack([shard_maps[shard_files.index(f)] for f in files]).astype(np.float32))
    assert isinstance(teacher.shards, ShardTargets)


@pytest.mark.parametrize("kw, shard_args, match", [
    ({"head_fusion": "max"}, (), "head_fusion 'mean' there, 'max' here"),
    ({"discard_ratio": 0.5}, (), "discard_ratio 0.0 there, 0.5 here"),
    ({"target": "grad-rollout"}, (), "method 'attention' there, 'grad' here"),
    ({}, ("--precision", "bf16"), "precision 'bf16' there, 'fp32' here"),
])
def test_shards_of_other_settings_are_refused(tiny_cifar, tiny_teacher, train_shards, tmp_path, kw, shard_args,
                                              match):
    folder = _shards(tiny_teacher, tiny_cifar / "test", tmp_path / "t", *shard_args) if shard_args else train_shards
    with pytest.raises(ValueError, match=r"^targets_from: the shards in .* are not this run's teacher maps: .*"
                                         + match):
        distill(tiny_cifar, tmp_path / "run", cfg(tiny_teacher, cache_targets=True, **kw), progress=False,
                targets_from=folder)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_another_teacher_missing_images_and_unfinished_shards_are_refused(tiny_cifar, tiny_teacher, tmp_path,
                                                                          capsys):
    other = _shards("cifar10-vit", tiny_cifar / "test", tmp_path / "other")
    with pytest.raises(ValueError, match="not this run's teacher maps: model hash '[0-9a-f]{16}' there"):
        distill(tiny_cifar, tmp_path / "r1", cfg(tiny_teacher, cache_targets=True), progress=False,
                targets_from=other)
    test_only = _shards(tiny_teacher, tiny_cifar / "test", tmp_path / "test-only")
    with pytest.raises(ValueError, match=r"targets_from: 40 of the 40 training images have no map in .*test-only"):
        distill(tiny_cifar, tmp_path / "r2", cfg(tiny_teacher, cache_targets=True), progress=False,
                targets_from=test_only)
    (test_only / "index.npz").unlink()
    with pytest.raises(ValueError, match="targets_from: shards: .* has no index.npz: the run has not finished"):
        distill(tiny_cifar, tmp_path / "r3", cfg(tiny_teacher, cache_targets=True), progress=False,
                targets_from=test_only)
    with pytest.raises(ValueError, match=r"targets_from: shard maps are cached targets; pass cache_targets=True"):
        distill(tiny_cifar, tmp_path / "r4", cfg(tiny_teacher), progress=False, targets_from=other)
    assert main(["distill", "--teacher", tiny_teacher, "--data", str(tiny_cifar), "--out", str(tmp_path / "r5"),
                 "--targets-from", str(other), "--no-progress"]) == 1
    assert capsys.readouterr().err == ("rollout-fast distill: targets_from: shard maps are cached targets; pass "
                                       "cache_targets=True (--cache-targets)\n")
