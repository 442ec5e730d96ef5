"""Fixation data: the OSIE-layout .mat reader, fixation maps, the packaged split, the dataset class, clear
errors, and the real OSIE data (skipped where ../shared/data/osie is absent)."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

scipy_io = pytest.importorskip("scipy.io", reason="scipy reads the .mat files (pip install -e '.[saliency]')")

from rollout_fast.saliency import (
    OSIE,
    OSIE_SIGMA_PX,
    OSIE_SIZE,
    SPLIT_FILE,
    FixationDataset,
    SaliencyMetrics,
    centre_gaussian,
    fit_centre_gaussian,
    fixation_counts,
    fixation_density,
    load_split,
    make_split,
    mean_fixation_map,
    read_fixations_mat,
    uniform_map,
)

REPO = Path(__file__).resolve().parents[2]
OSIE_ROOT = Path(os.environ.get("ROLLOUT_FAST_SHARED", REPO.parent / "shared")) / "data" / "osie"


def write_dataset(root: Path, images: dict, sizes: dict | None = None, variable: str = "fixations"):
    """An OSIE-layout dataset: images = {name: [(fix_x list, fix_y list), ...] per subject} (1-based)."""
    from PIL import Image

    (root / "data" / "stimuli").mkdir(parents=True)
    (root / "data" / "eye").mkdir(parents=True)
    cells = np.empty((len(images), 1), dtype=object)
    for i, (name, subjects) in enumerate(images.items()):
        subs = np.empty((len(subjects), 1), dtype=object)
        for j, (xs, ys) in enumerate(subjects):
            subs[j, 0] = {"fix_x": np.array(xs, dtype=float), "fix_y": np.array(ys, dtype=float),
                          "fix_duration": np.full(len(xs), 100 + j, dtype=np.uint16)}
        cells[i, 0] = {"img": name, "subjects": subs}
        W, H = (sizes or {}).get(name, (8, 6))
        Image.new("RGB", (W, H), (i * 40, 0, 0)).save(root / "data" / "stimuli" / name)
    scipy_io.savemat(root / "data" / "eye" / "fixations.mat", {variable: cells})
    return root


@pytest.fixture
def tiny(tmp_path):
    return write_dataset(tmp_path / "tiny", {
        "a.png": [([1.0, 8.0], [1.0, 6.0]), ([4.6], [2.4])],
        "b.png": [([3.0], [3.0]), ([3.0, 5.0], [3.0, 1.0])],
    })


# ------------------------------------------------------------------------------------------- reading

def test_read_fixations_mat_keeps_the_stored_values(tiny):
    recs = read_fixations_mat(tiny / "data" / "eye" / "fixations.mat")
    assert [r["name"] for r in recs] == ["a.png", "b.png"]
    np.testing.assert_array_equal(recs[0]["x"], [1.0, 8.0, 4.6])
    np.testing.assert_array_equal(recs[0]["y"], [1.0, 6.0, 2.4])
    np.testing.assert_array_equal(recs[0]["subjects"], [0, 0, 1])
    np.testing.assert_array_equal(recs[0]["durations"], [100, 100, 101])


def test_dataset_converts_matlab_coordinates_and_builds_maps(tiny):
    ds = FixationDataset(tiny)
    assert ds.names == ["a.png", "b.png"] and len(ds) == 2
    r = ds.records[0]
    assert r.size == (6, 8)
    torch.testing.assert_close(r.points, torch.tensor([[0.0, 0.0], [7.0, 5.0], [3.6, 1.4]], dtype=torch.float64))
    counts = r.counts()
    assert counts.sum().item() == 3 and counts[0, 0] == 1 and counts[5, 7] == 1 and counts[1, 4] == 1
    image, target = ds[1]
    assert image.size == (8, 6) and image.mode == "RGB"
    assert target["name"] == "b.png"
    # two fixations (from two subjects) on 1-based (3, 3) -> 0-based pixel (2, 2)
    assert target["fixations"][2, 2].item() == 2 and target["fixations"][0, 4].item() == 1
    assert target["density"].shape == (6, 8) and target["density"].sum().item() == pytest.approx(1.0)
    # transforms and collate
    ds2 = FixationDataset(tiny, names=["b.png", "a.png"], sigma=2.0,
                          transform=lambda im: torch.zeros(3, im.size[1], im.size[0]),
                          target_transform=lambda t: {**t, "extra": 1})
    assert ds2.names == ["b.png", "a.png"]
    images, targets = FixationDataset.collate([ds2[0], ds2[1]])
    assert images.shape == (2, 3, 6, 8) and targets["fixations"].shape == (2, 6, 8)
    assert targets["name"] == ["b.png", "a.png"] and [len(p) for p in targets["points"]] == [3, 3]


def test_fixation_density_is_the_normalised_gaussian_sum():
    # one point on pixel (row 3, col 2) of a 5 x 7 image, sigma 1: separable, normalised
    d = fixation_density([torch.tensor([[2.0, 3.0]])], (5, 7), sigma=1.0)[0]
    zx = sum(math.exp(-((c - 2) ** 2) / 2) for c in range(7))
    zy = sum(math.exp(-((r - 3) ** 2) / 2) for r in range(5))
    assert d[3, 2].item() == pytest.approx(1 / (zx * zy), rel=1e-6)
    assert d[0, 0].item() == pytest.approx(math.exp(-(4 + 9) / 2) / (zx * zy), rel=1e-5)
    # two points: the normalised sum of the two unnormalised Gaussians (sub-pixel, not rounded)
    p = torch.tensor([[2.0, 3.0], [4.25, 0.5]])
    d2 = fixation_density([p], (5, 7), sigma=1.5)[0].double()
    r, c = torch.meshgrid(torch.arange(5.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64),
                          indexing="ij")
    ref = sum(torch.exp(-((c - x) ** 2 + (r - y) ** 2) / (2 * 1.5**2)) for x, y in p.double())
    torch.testing.assert_close(d2, ref / ref.sum(), rtol=1e-5, atol=1e-8)


def test_fixation_counts_round_to_pixel_centres():
    pts = torch.tensor([[0.49, 0.0], [0.5, 0.0], [-0.5, -0.5], [3.49, 1.49], [3.49, 1.49]])
    c = fixation_counts([pts], (2, 4))[0]
    torch.testing.assert_close(c, torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))


def test_packaged_split_is_the_seeded_600_100_split():
    data = json.loads(SPLIT_FILE.read_text())
    train, val = load_split("train"), load_split("val")
    assert len(train) == 600 and len(val) == 100 and not set(train) & set(val)
    assert sorted(train + val) == [f"{i}.jpg" for i in range(1001, 1701)] == load_split("all")
    assert make_split(train + val, 100, seed=data["seed"]) == {"train": train, "val": val}
    assert make_split(train + val, 100, seed=1) != {"train": train, "val": val}


def test_split_file_is_package_data():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]
    rel = SPLIT_FILE.relative_to(REPO / "rollout_fast")
    assert any(fnmatch.fnmatch(str(rel), p) for p in patterns.get("rollout_fast", [])) or any(
        fnmatch.fnmatch(SPLIT_FILE.name, p) for p in patterns.get("rollout_fast.saliency", []))


# ----------------------------------------------------------------------------------------- bad input

def test_mat_without_the_expected_fields(tmp_path):
    root = write_dataset(tmp_path / "v", {"a.png": [([1.0], [1.0])]}, variable="gaze")
    with pytest.raises(ValueError, match=r"fixations.mat: no variable 'fixations' \(found \['gaze'\]\)"):
        FixationDataset(root)
    mat = tmp_path / "f.mat"
    scipy_io.savemat(mat, {"fixations": np.array([[{"img": "a.png"}]], dtype=object)})
    with pytest.raises(ValueError, match=r"fixations\[0\] \(a.png\): missing field 'subjects'"):
        read_fixations_mat(mat)
    subs = np.empty((1, 1), dtype=object)
    subs[0, 0] = {"fix_x": np.array([1.0])}
    scipy_io.savemat(mat, {"fixations": np.array([[{"img": "a.png", "subjects": subs}]], dtype=object)})
    with pytest.raises(ValueError, match=r"\(a.png\) subject 0: missing field 'fix_y'"):
        read_fixations_mat(mat)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match="junk.mat: not a readable MATLAB .mat file"):
        read_fixations_mat(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError, match="fixations file not found"):
        read_fixations_mat(tmp_path / "none.mat")


def test_fixation_outside_the_image(tmp_path):
    # 8 x 6 image: 1-based x must be < 8.5
    root = write_dataset(tmp_path / "o", {"a.png": [([1.0], [1.0]), ([2.0, 8.5], [2.0, 3.0])]})
    with pytest.raises(ValueError, match=r"image 'a.png': subject 1's fixation at \(fix_x=8.5, fix_y=3\) lies "
                                         r"outside the 8 x 6 image"):
        FixationDataset(root)
    FixationDataset(root, origin=0.5 + 1.0)  # the same points read with another origin fit
    with pytest.raises(ValueError, match=r"points\[0\]: fixation 0 at \(x=-0.6, y=0\)"):
        fixation_counts([torch.tensor([[-0.6, 0.0]])], (2, 2))


def test_image_with_no_fixations(tmp_path):
    root = write_dataset(tmp_path / "e", {"a.png": [([1.0], [1.0])], "b.png": [([], []), ([], [])]})
    with pytest.raises(ValueError, match=r"image 'b.png': no fixations"):
        FixationDataset(root)
    assert FixationDataset(root, names=["a.png"]).names == ["a.png"]


def test_empty_split_and_unknown_names(tiny, tmp_path):
    with pytest.raises(ValueError, match="names: empty split"):
        FixationDataset(tiny, names=[])
    with pytest.raises(ValueError, match="split: empty list"):
        OSIE(tiny, split=[])
    with pytest.raises(ValueError, match="names: image 'c.png' is not in"):
        FixationDataset(tiny, names=["a.png", "c.png"])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a.png"], "val": []}))
    with pytest.raises(ValueError, match=r"split 'val' in .*split.json is empty"):
        load_split("val", split)
    with pytest.raises(ValueError, match="split: expected 'train', 'val' or 'all'"):
        load_split("test")
    (tiny / "data" / "stimuli" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="stimulus not found for image 'b.png'"):
        FixationDataset(tiny)


def test_map_of_the_wrong_size_in_a_batch(tmp_path):
    root = write_dataset(tmp_path / "s", {"a.png": [([1.0], [1.0])], "b.png": [([1.0], [1.0])]},
                         sizes={"b.png": (5, 5)})
    ds = FixationDataset(root)
    with pytest.raises(ValueError, match=r"collate: 'b.png' is \(5, 5\) but 'a.png' is \(6, 8\)"):
        FixationDataset.collate([ds[0], ds[1]])


# --------------------------------------------------------------------------------------- real OSIE

@pytest.fixture(scope="module")
def osie_root() -> Path:
    if not (OSIE_ROOT / "data" / "eye" / "fixations.mat").is_file():
        pytest.skip(f"OSIE data not found at {OSIE_ROOT} (set ROLLOUT_FAST_SHARED to the shared/ folder "
                    "holding data/osie)")
    return OSIE_ROOT


def test_osie_loads_every_fixation(osie_root):
    ds = OSIE(osie_root, "all")
    assert len(ds) == 700 and ds.names[0] == "1001.jpg"
    assert sum(r.points.shape[0] for r in ds.records) == 98321  # data/README.md
    assert {r.size for r in ds.records} == {OSIE_SIZE}
    r = ds.records[0]
    # first fixation of the first subject: fix_x = 395.5 (1-based) -> 394.5
    assert r.points[0, 0].item() == pytest.approx(394.5) and r.subjects.unique().tolist() == list(range(15))
    assert r.durations[0].item() == 246
    assert len(OSIE(osie_root, "val")) == 100


@pytest.mark.slow
def test_osie_baselines_on_val_images(osie_root):
    """Uniform scores chance exactly; the centre prior fitted to the train fixations beats it on every
    location metric except sAUC (centre bias cancels there)."""
    train, val = OSIE(osie_root, "train"), OSIE(osie_root, "val")
    mean, cov = fit_centre_gaussian([r.points for r in train.records], [r.size for r in train.records])
    # OSIE's centre bias: fixations a little above the middle, wider spread horizontally in pixels
    assert 0.49 < mean[0] < 0.51 and 0.46 < mean[1] < 0.48
    centre = centre_gaussian(mean, cov, OSIE_SIZE)
    recs = val.records[:20]
    total = sum(r.counts() for r in val.records)
    counts = torch.stack([r.counts() for r in recs])
    dens = torch.stack([r.density(OSIE_SIGMA_PX) for r in recs])
    res = {}
    for name, m in (("uniform", uniform_map(OSIE_SIZE)), ("centre", centre)):
        ev = SaliencyMetrics(total_counts=total, baseline=centre)
        ev.update(m.expand(len(recs), *OSIE_SIZE), dens, counts)
        res[name] = ev.compute()
    assert res["uniform"]["nss"] == 0 and res["uniform"]["cc"] == 0
    assert res["uniform"]["auc_judd"] == 0.5 and res["uniform"]["sauc"] == 0.5
    assert res["centre"]["ig"] == pytest.approx(0.0, abs=1e-12) and res["uniform"]["ig"] < -0.3
    assert res["centre"]["nss"] > 0.6 and res["centre"]["auc_judd"] > 0.7 and res["centre"]["cc"] > 0.2
    assert abs(res["centre"]["sauc"] - 0.5) < 0.03
    assert res["centre"]["kld"] < res["uniform"]["kld"] and res["centre"]["sim"] > res["uniform"]["sim"]
    # the mean-map baseline streams; a few train maps give a (H, W) map summing to 1
    mm = mean_fixation_map(r.density() for r in train.records[:3])
    assert mm.shape == OSIE_SIZE and mm.sum().item() == pytest.approx(1.0, rel=1e-5)
