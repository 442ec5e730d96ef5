"""Big runs in shards (rollout_fast.shard_job, rollout_fast.shards) on a tiny random-weight ViT: the maps are the bits
of rollout.npz, every image is in the index exactly once (unreadable ones as skipped), a failed run resumes to the
uninterrupted result, a folder of another run is refused, and open_maps memory-maps the shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast import shard_job, shards
from rollout_fast.data import CIFAR10_MEAN, CIFAR10_STD
from rollout_fast.jobs import rollout_images
from rollout_fast.shard_job import rollout_shards
from rollout_fast.shards import open_maps

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "interpolation": "bilinear",
               "crop_pct": 1.0, "crop_mode": "center"}
QUIET = {"progress": False}


def _vit(seed=0):
    from timm.models import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """11 files: 10 random PNGs of several sizes and one unreadable file at position 5."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        f = d / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(f)
        out.append(str(f))
    bad = d / "broken.png"
    bad.write_bytes(b"not a png")
    out.insert(5, str(bad))
    return out


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The non-sharded run (rollout.npz) of ``files`` at batch 2."""
    with pytest.warns(UserWarning, match="broken.png"):
        res = rollout_images(files, tmp_path_factory.mktemp("ref") / "o", _vit(), DATA_CONFIG, batch_size=2,
                             overlays=False, **QUIET)
    with np.load(res.npz) as z:
        return {k: z[k] for k in z.files}


def _shards(files, out, reads: bool = True, **kw):
    """rollout_shards of the tiny ViT at batch 2, float32, 4 files a shard, no overlays (unless ``kw`` say);
    ``reads``: it reaches the unreadable file (which must be warned about) when that is in ``files``."""
    kw = {"batch_size": 2, "shard_size": 4, "dtype": "float32", "overlays": "none", **QUIET, **kw}
    if not reads or not any(f.endswith("broken.png") for f in files):
        return rollout_shards(files, out, _vit(), DATA_CONFIG, **kw)
    with pytest.warns(UserWarning, match="broken.png"):
        return rollout_shards(files, out, _vit(), DATA_CONFIG, **kw)


def test_float32_shards_are_the_bits_of_the_npz_and_hold_every_file_once(files, reference, tmp_path):
    res = _shards(files, tmp_path / "s")
    assert res.num_shards == 3 and res.written == [0, 1, 2] and res.resumed == []
    got_files, maps, table = open_maps(tmp_path / "s")
    assert got_files == reference["files"].tolist() == res.files and len(got_files) == 10
    assert maps.shape == (10, 8, 8) and maps.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"])
    np.testing.assert_array_equal(table["predicted_class"], reference["predicted_class"])
    np.testing.assert_array_equal(table["probability"], reference["probability"])
    np.testing.assert_array_equal(table["predicted_label"], reference["predicted_label"])
    assert table["shard"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # shard 1 holds the unreadable file
    assert table["row"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    (skipped_file, reason), = res.skipped
    assert skipped_file == files[5] and reason.startswith("UnidentifiedImageError: cannot identify image file")
    # every file of the list exactly once, in order, across the shard indexes
    records = [json.loads(shards.shard_paths(tmp_path / "s", k)[1].read_text()) for k in range(3)]
    assert [f for r in records for f in r["files"]] == files
    assert records[1]["row"] == [0, -1, 1, 2] and records[1]["reason"][1] == reason
    for k in range(3):  # each shard a plain .npy that np.load maps
        arr = np.load(shards.shard_paths(tmp_path / "s", k)[0], mmap_mode="r")
        assert isinstance(arr, np.memmap) and isinstance(maps.arrays[k], np.memmap)
    assert not list((tmp_path / "s").glob("**/.*"))  # no temporary files left


def test_float16_shards_are_the_npz_maps_rounded(files, reference, tmp_path):
    _shards(files, tmp_path / "h", dtype="float16", shard_size=6)
    _, maps, _ = open_maps(tmp_path / "h")
    assert maps.dtype == np.float16 and len(maps.arrays) == 2
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"].astype(np.float16))
    np.testing.assert_allclose(np.asarray(maps, dtype=np.float32), reference["maps"], rtol=2 ** -11, atol=0)


def test_grad_shards_record_the_target_class(files, tmp_path):
    res = _shards(files[:4], tmp_path / "g", method="grad", target=3, shard_size=2)
    ref = rollout_images(files[:4], tmp_path / "gref", _vit(), DATA_CONFIG, batch_size=2, method="grad", target=3,
                         overlays=False, **QUIET)
    got_files, maps, table = open_maps(tmp_path / "g")
    with np.load(ref.npz) as z:
        assert got_files == z["files"].tolist() == res.files
        np.testing.assert_array_equal(np.asarray(maps), z["maps"])
        assert table["target_class"].tolist() == z["target_class"].tolist() == [3, 3, 3, 3]


def test_open_maps_indexing(files, reference, tmp_path):
    _shards(files, tmp_path / "s")
    opened = open_maps(tmp_path / "s")
    maps, want = opened.maps, reference["maps"]
    np.testing.assert_array_equal(maps[5], want[5])
    np.testing.assert_array_equal(maps[-1], want[-1])
    np.testing.assert_array_equal(maps[2:9:3], want[2:9:3])
    np.testing.assert_array_equal(maps[[9, 0, 4]], want[[9, 0, 4]])
    np.testing.assert_array_equal(maps[np.array([7, 3])], want[[7, 3]])
    np.testing.assert_array_equal(maps[3, 1:4], want[3, 1:4])
    np.testing.assert_array_equal(maps[1:3, 0], want[1:3, 0])
    assert len(maps) == 10 and opened.manifest["num_files"] == 11 and opened.skipped[0][0] == files[5]
    with pytest.raises(IndexError, match="out of range"):
        maps[10]
    with pytest.raises(IndexError, match="out of range"):
        maps[[0, 11]]


def test_the_manifest_records_the_model_and_settings(files, tmp_path):
    _shards(files, tmp_path / "s", model_name="tiny", checkpoint="w.safetensors", head_fusion="max",
            discard_ratio=0.25)
    m = shards.load_manifest(tmp_path / "s")
    assert m["model"] == {"name": "tiny", "checkpoint": "w.safetensors",
                          "class": "timm.models.vision_transformer.VisionTransformer",
                          "hash": shards.state_dict_hash(_vit())}
    assert (m["method"], m["head_fusion"], m["discard_ratio"], m["target"]) == ("attention", "max", 0.25, None)
    assert (m["dtype"], m["shard_size"], m["num_files"], m["num_shards"], m["grid"]) == ("float32", 4, 11, 3, [8, 8])
    assert m["input"]["input_size"] == [3, 32, 32] and m["precision"] == "fp32"
    assert m["files_hash"] == shards.files_hash(files) and "Resize" in m["transform"]
    assert shards.state_dict_hash(_vit(seed=1)) != m["model"]["hash"]


def test_a_failed_run_resumes_to_the_uninterrupted_result(files, reference, tmp_path, monkeypatch):
    """Shard 1 fails to be written (disk full): shard 0 stays, nothing of shard 1 or 2 is left, no index; the
    resumed run skips shard 0 (its files untouched) and ends with the uninterrupted run's maps and index."""
    out = tmp_path / "s"
    write = shards.write_shard

    def failing(folder, k, *a, **kw):
        if k == 1:
            raise OSError(28, "No space left on device (test)")
        return write(folder, k, *a, **kw)

    monkeypatch.setattr(shards, "write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        _shards(files, out)  # the unreadable file (shard 1) was read before the failure
    monkeypatch.setattr(shards, "write_shard", write)
    assert shards.finished_shards(out, shards.load_manifest(out), files) == [0]
    assert not (out / "index.npz").exists()
    with pytest.raises(ValueError, match="has no index.npz: the run has not finished"):
        open_maps(out)
    first = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    with pytest.raises(FileExistsError, match="holds an earlier run .*pass resume=True"):
        _shards(files, out, reads=False)  # not without resume
    res = _shards(files, out, resume=True)
    assert res.resumed == [0] and res.written == [1, 2]
    assert {p: p.stat().st_mtime_ns for p in first} == first
    got_files, maps, table = open_maps(out)
    assert got_files == reference["files"].tolist()
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"])
    np.testing.assert_array_equal(table["probability"], reference["probability"])


def test_resume_redoes_a_shard_whose_files_are_torn_or_stale(files, reference, tmp_path):
    """A shard whose .json is missing (killed between the .npy and the .json), truncated, or whose .npy does not
    agree with it is not finished: the resumed run writes it again; a leftover temporary file is removed."""
    out = tmp_path / "s"
    _shards(files, out)
    _, js0 = shards.shard_paths(out, 0)
    npy1, js1 = shards.shard_paths(out, 1)
    _, js2 = shards.shard_paths(out, 2)
    js0.unlink()
    js1.write_text(js1.read_text()[:40])
    np.save(npy1, np.zeros((2, 8, 8), np.float32))
    (out / "shards" / ".shard-00002.npy.tmp123").write_bytes(b"partial")
    mtime2 = js2.stat().st_mtime_ns
    res = _shards(files, out, resume=True)
    assert res.written == [0, 1] and res.resumed == [2] and js2.stat().st_mtime_ns == mtime2
    assert not (out / "shards" / ".shard-00002.npy.tmp123").exists()
    np.testing.assert_array_equal(np.asarray(open_maps(out).maps), reference["maps"])


@pytest.mark.parametrize("change, named", [
    ({"head_fusion": "max"}, "head_fusion 'mean' there, 'max' here"),
    ({"dtype": "float16"}, "dtype 'float32' there, 'float16' here"),
    ({"shard_size": 5}, "shard_size 4 there, 5 here"),
    ({"discard_ratio": 0.5}, "discard_ratio 0.0 there, 0.5 here"),
    ({"method": "grad"}, "method 'attention' there, 'grad' here"),
    ({"model": 1}, "model timm.models.vision_transformer.VisionTransformer "),
    ({"files": 1}, "num_files 11 there, 10 here; files_hash"),
])
def test_resume_refuses_shards_of_another_run(files, tmp_path, change, named):
    out, run_files = tmp_path / "s", (files[:10] if "files" in change else files[:4])
    _shards(files if "files" in change else run_files, out, shard_size=4)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    kw = {k: v for k, v in change.items() if k not in ("model", "files")}
    model = _vit(seed=1 if "model" in change else 0)
    with pytest.raises(ValueError, match=r"^resume: .* holds shards of another run: " + named.replace("(", r"\(")):
        rollout_shards(run_files, out, model, DATA_CONFIG, batch_size=2, resume=True, overlays="none",
                       **{"dtype": "float32", "shard_size": 4, **kw}, **QUIET)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_overwrite_replaces_an_earlier_run_of_either_kind(files, reference, tmp_path):
    out = tmp_path / "o"
    rollout_images(files[:3], out, _vit(), DATA_CONFIG, **QUIET)
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(grid.png, overlays, rollout.npz\)"):
        _shards(files, out, reads=False)
    _shards(files, out, overwrite=True, overlays="sample")
    assert not (out / "rollout.npz").exists() and (out / "index.npz").is_file()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{i:05d}_{i:02d}.png" for i in range(5)] + [
        f"{i + 1:05d}_{i:02d}.png" for i in range(5, 10)]  # by position in the list; 00005 is the unreadable one
    with pytest.raises(FileExistsError, match=r"index.npz, manifest.json, overlays, shards"):
        rollout_images(files[:3], out, _vit(), DATA_CONFIG, **QUIET)
    rollout_images(files[:2], out, _vit(), DATA_CONFIG, overwrite=True, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "overlays", "rollout.npz"]
    with pytest.raises(ValueError, match="resume, overwrite: pass one of them"):
        _shards(files, out, reads=False, resume=True, overwrite=True)


def test_overlay_modes_and_the_grid(files, tmp_path, monkeypatch):
    from rollout_fast import viz

    grids = []
    save_grid = viz.save_grid
    monkeypatch.setattr(viz, "save_grid", lambda *a, **k: grids.append(len(a[0])) or save_grid(*a, **k))
    res = _shards(files, tmp_path / "all", overlays="all", shard_size=8)
    assert len(res.overlays) == 10 and all(p.is_file() for p in res.overlays) and res.grid.is_file()
    res = _shards(files, tmp_path / "none", overlays="none")
    assert res.overlays == [] and not (tmp_path / "none" / "overlays").exists() and res.grid.is_file()
    assert grids == [7, 4]  # the readable maps of shard 0 (8 files, one unreadable; then 4), at most 16


def test_bad_arguments_write_nothing(files, tmp_path):
    for kw, match in [({"shard_size": 0}, "shard_size: expected an int >= 1"),
                      ({"dtype": "bfloat16"}, "dtype: expected one of"),
                      ({"overlays": "some"}, "overlays: expected one of"),
                      ({"precision": "fp16"}, "precision: fp16 needs a CUDA device"),
                      ({"method": "grad", "target": 10}, r"class 10 is outside the model's classes")]:
        with pytest.raises(ValueError, match=match):
            rollout_shards(files, tmp_path / "o", _vit(), DATA_CONFIG, **kw, **QUIET)
    with pytest.raises(ValueError, match="images: no image files given"):
        rollout_shards([], tmp_path / "o", _vit(), DATA_CONFIG, **QUIET)
    assert not (tmp_path / "o").exists()


def test_unreadable_files_only(tmp_path):
    bad = [tmp_path / "a.png", tmp_path / "b.png"]
    for b in bad:
        b.write_bytes(b"")
    with pytest.warns(UserWarning):
        res = rollout_shards(bad, tmp_path / "o", _vit(), DATA_CONFIG, overlays="none", **QUIET)
    assert res.files == [] and [f for f, _ in res.skipped] == [str(b) for b in bad] and res.grid is None
    opened = open_maps(tmp_path / "o")
    assert opened.files == [] and opened.maps.shape == (0, 8, 8) and len(opened.skipped) == 2


def test_the_processes_share_out_the_unfinished_shards(files, tmp_path, monkeypatch):
    """Rank r of W takes the r-th, (r+W)-th ... unfinished shard: shards r, r+W, ... in a fresh run."""
    seen = {}

    def fake_run(env, files_, mine, *a, **k):
        seen[env.rank] = list(mine)

    monkeypatch.setattr(shard_job, "_run", fake_run)
    monkeypatch.setattr(shard_job, "_finish", lambda *a: None)
    for rank in (0, 1, 2):
        env = shard_job._OneProcess(torch.device("cpu"), world=3, rank=rank)
        monkeypatch.setattr(shard_job, "_from_rank0", lambda env, fn: fn())
        monkeypatch.setattr(shard_job, "_check_files_agree", lambda env, f: None)
        rollout_shards(files, tmp_path / f"o{rank}", _vit(), DATA_CONFIG, shard_size=2, env=env, **QUIET)
    assert seen == {0: [0, 3], 1: [1, 4], 2: [2, 5]}
