"""Distillation's caches cannot go stale: the decoded-image cache is keyed by every file's content (path, class,
bytes), the teacher-map cache by the teacher and the images; a corrupt cache file is named and rebuilt."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_testing import cfg
from PIL import Image

from rollout_fast.distill.data import files_fingerprint, load_split_tensor


@pytest.fixture
def split(tiny_cifar, tmp_path):
    """A private copy of tiny_cifar's test split (20 images), free to edit."""
    root = tmp_path / "split"
    shutil.copytree(tiny_cifar / "test", root)
    return root


def test_an_image_edited_in_place_is_decoded_again(split, tmp_path):
    cache = tmp_path / "cache"
    images, labels, key = load_split_tensor(split, (32, 32), cache, progress=False)
    again, _, same = load_split_tensor(split, (32, 32), cache, progress=False)
    assert same == key and torch.equal(again, images) and len(list(cache.iterdir())) == 1
    edited = split / "class3" / "1.png"  # new pixels under the same name, the same modification time
    st = os.stat(edited)
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(edited)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    new, new_labels, new_key = load_split_tensor(split, (32, 32), cache, progress=False)
    i = 3 * 2 + 1  # sorted ImageFolder order: class3/1.png
    assert new_key != key and (new[i] == 7).all() and torch.equal(new[:i], images[:i])
    assert torch.equal(new_labels, labels)
    (split / "class3" / "1.png").rename(split / "class4" / "9.png")  # relabelled: another key
    assert load_split_tensor(split, (32, 32), cache, progress=False)[2] not in (key, new_key)


def test_a_folder_synced_again_keeps_its_key(split, tmp_path):
    """New modification times on the same bytes (a data folder copied again at every sitting) and the same
    files in another folder find the cache; a file of the same size with other bytes does not."""
    cache = tmp_path / "cache"
    images, _, key = load_split_tensor(split, (32, 32), cache, progress=False)
    for p in split.rglob("*.png"):
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    copy = tmp_path / "copy"
    shutil.copytree(split, copy)  # new modification times
    for root in (split, copy):
        again, _, same = load_split_tensor(root, (32, 32), cache, progress=False)
        assert same == key and torch.equal(again, images)
    assert len(list(cache.iterdir())) == 1
    f = copy / "class0" / "0.png"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1  # one bit of the last chunk's CRC: same size, other bytes
    f.write_bytes(bytes(data))
    samples = sorted((str(p), 0) for p in copy.rglob("*.png"))
    assert files_fingerprint(copy, samples) != files_fingerprint(split, [(str(split / Path(p).relative_to(copy)), 0)
                                                                          for p, _ in samples])


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 not a zip at all" * 10, None])
def test_a_corrupt_image_cache_is_named_and_rebuilt(split, tmp_path, garbage):
    cache = tmp_path / "cache"
    images, labels, key = load_split_tensor(split, (32, 32), cache, progress=False)
    path = cache / f"images_{key}.pt"
    if garbage is None:  # a readable file of the wrong content: maps where images belong
        torch.save({"images": torch.zeros(3), "labels": labels}, path)
    else:
        path.write_bytes(garbage)
    with pytest.warns(UserWarning, match=f"cache: .*images_{key}.pt' is corrupt or stale.*rebuilding it"):
        again, _, same = load_split_tensor(split, (32, 32), cache, progress=False)
    assert same == key and torch.equal(again, images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], images)  # the file was replaced


def test_a_corrupt_teacher_map_cache_is_named_and_rebuilt(tiny_cifar, tiny_teacher, tmp_path):
    from rollout_fast.distill.ddp import DistEnv
    from rollout_fast.distill.targets import TeacherTargets

    cache = tmp_path / "cache"
    cache.mkdir()
    targets = TeacherTargets(cfg(tiny_teacher), DistEnv(1, 0, 0, torch.device("cpu")), cache, progress=False)
    images, _, _ = load_split_tensor(tiny_cifar / "test", (32, 32), progress=False)
    params = (torch.zeros(len(images), dtype=torch.long),) * 2 + (torch.zeros(len(images), dtype=torch.bool),)
    want = targets.cached("x", images, params, "maps")
    assert want.shape == (len(images), 8, 8)
    for garbage in (b"\x00" * 64, None):
        if garbage is None:
            torch.save(want[:3], cache / "maps_x.pt")  # readable, but of another set of images
        else:
            (cache / "maps_x.pt").write_bytes(garbage)
        with pytest.warns(UserWarning, match="maps_x.pt' is corrupt or stale"):
            got = targets.cached("x", images, params, "maps")
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.load(cache / "maps_x.pt", weights_only=True), want)


def test_the_teacher_map_key_covers_the_teachers_weights_and_normalisation(tiny_teacher, tmp_path):
    import json

    from rollout_fast.checkpoint import load_weights, save_weights
    from rollout_fast.distill.ddp import DistEnv
    from rollout_fast.distill.targets import TeacherTargets

    env = DistEnv(1, 0, 0, torch.device("cpu"))
    key = TeacherTargets(cfg(tiny_teacher), env, tmp_path, progress=False).key
    other = tmp_path / "t2.safetensors"
    card = json.loads(Path(tiny_teacher).with_suffix(".json").read_text())
    state = load_weights(tiny_teacher)
    state["pos_embed"] = state["pos_embed"] + 1e-3
    save_weights(other, state)
    other.with_suffix(".json").write_text(json.dumps(card))
    assert TeacherTargets(cfg(str(other)), env, tmp_path, progress=False).key != key
    save_weights(other, load_weights(tiny_teacher))
    card["data_config"]["mean"] = [0.5, 0.5, 0.5]
    other.with_suffix(".json").write_text(json.dumps(card))
    assert TeacherTargets(cfg(str(other)), env, tmp_path, progress=False).key != key
