"""``rollout-fast saliency-eval``: every kind of map source on a tiny generated dataset (outputs, refusal of an
earlier run), the centre prior's values equal to the metrics module's on the same maps (tiny data, and 3 OSIE val
images where ../shared/data/osie exists), the --maps syntax, and bad input as one line naming the item."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from saliency_testing import OSIE_ROOT, save_tiny_saliency_model, write_fixation_dataset

scipy_io = pytest.importorskip("scipy.io", reason="scipy reads the .mat files (pip install -e '.[saliency]')")

from rollout_fast.cli import main
from rollout_fast.saliency import (
    OSIE,
    FixationDataset,
    SaliencyMetrics,
    centre_gaussian,
    fit_centre_gaussian,
    load_split,
)
from rollout_fast.saliency.evaluate import OUTPUTS, check_map_size, validation_metrics
from rollout_fast.saliency.sources import MapSpec, parse_map_specs

TINY_VIT = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}
TINY_LTPA = {"type": "attnvgg", "img_size": 32, "num_classes": 10, "variant": "pc-softmax-after", "width": 0.0625}


def _save_classifier(path, arch):
    from rollout_fast.checkpoint import save_weights, write_json
    from rollout_fast.models import create_model
    from rollout_fast.teacher import teacher_data_config

    torch.manual_seed(0)
    save_weights(path, create_model(arch).state_dict())
    write_json(path.with_suffix(".json"), {"name": path.stem, "arch": arch, "data_config": teacher_data_config(32)})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, split file, models): 6 photos 48 x 64 (4 train, 2 val), a tiny saliency model, ViT and AttnVGG."""
    d = tmp_path_factory.mktemp("eval")
    root, split = write_fixation_dataset(d / "data")
    models = {"sal": save_tiny_saliency_model(d / "sal.safetensors"),
              "vit": _save_classifier(d / "vit.safetensors", TINY_VIT),
              "ltpa": _save_classifier(d / "ltpa.safetensors", TINY_LTPA)}
    return root, split, models


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["saliency-eval", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _reference(root, names, split_names, train_names, sigma, **kw):
    """The metrics module on the centre prior (fitted to the train fixations) of ``names``: per-image values."""
    train = FixationDataset(root, train_names, **kw).records
    mean, cov = fit_centre_gaussian([r.points for r in train], [r.size for r in train])
    recs = FixationDataset(root, names, **kw).records
    total = sum(r.counts() for r in FixationDataset(root, split_names, **kw).records)
    out = []
    for r in recs:
        centre = centre_gaussian(mean, cov, r.size)
        m = SaliencyMetrics(total_counts=total, baseline=centre)
        m.update(centre[None], r.density(sigma)[None], r.counts()[None])
        out.append(m.compute())
    return out


def test_every_kind_of_source_on_tiny_data(tiny, tmp_path, capsys):
    root, split, models = tiny
    maps = (f"centre-prior,mean-map,uniform,student-a:{models['sal']},rollout:{models['vit']},"
            f"grad-rollout:{models['vit']},ltpa:{models['ltpa']}")
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "--data", root, "--split-file", split, "--maps", maps, "--out", out,
                           "--sigma", 4, "--figure-images", 2)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    rows = _rows(out / "metrics.csv")
    assert [r["map"] for r in rows] == ["centre-prior", "mean-map", "uniform", "student-a", f"rollout:{models['vit']}",
                                        f"grad-rollout:{models['vit']}", f"ltpa:{models['ltpa']}"]
    assert all(r["images"] == "2" for r in rows)
    uniform = rows[2]
    assert float(uniform["nss"]) == 0 and float(uniform["cc"]) == 0 and float(uniform["auc_judd"]) == 0.5
    assert float(rows[0]["ig"]) == pytest.approx(0.0, abs=1e-9)  # IG is over the centre prior itself
    assert len(_rows(out / "per_image.csv")) == 7 * 2
    table = (out / "table.md").read_text()
    assert "| centre-prior |" in table and "upsampled bilinearly" in table and "resized to 32 x 32" in table
    assert "| map | NSS ↑ |" in stdout
    settings = json.loads((out / "settings.json").read_text())
    assert settings["images"] == 2 and settings["maps"] == maps and "protocol" in settings
    # an earlier run is refused before any compute, and replaced with --overwrite
    rc, _, err = _cli(capsys, "--data", root, "--split-file", split, "--maps", "uniform", "--out", out)
    assert rc == 2 and err.count("\n") == 1 and "holds an earlier run" in err and "--overwrite" in err
    rc, _, err = _cli(capsys, "--data", root, "--split-file", split, "--maps", "uniform", "--out", out, "--overwrite",
                      "--images", 1, "--figure-images", 1)
    assert rc == 0, err
    assert [r["map"] for r in _rows(out / "metrics.csv")] == ["uniform"] and len(_rows(out / "per_image.csv")) == 1


def test_centre_prior_values_are_the_metrics_modules(tiny, tmp_path, capsys):
    root, split, _ = tiny
    names = json.loads(split.read_text())
    rc, _, err = _cli(capsys, "--data", root, "--split-file", split, "--maps", "centre-prior", "--out", tmp_path / "o",
                      "--sigma", 4, "--images", 1)
    assert rc == 0, err
    want = _reference(root, names["val"][:1], names["val"], names["train"], 4.0)
    got = _rows(tmp_path / "o" / "per_image.csv")
    for g, w in zip(got, want):
        for k in ("nss", "cc", "auc_judd", "sauc", "kld", "sim", "ig"):
            assert float(g[k]) == pytest.approx(w[k], rel=1e-6, abs=1e-9), k


@pytest.mark.skipif(not (OSIE_ROOT / "data" / "eye" / "fixations.mat").is_file(),
                    reason=f"OSIE data not found at {OSIE_ROOT} (the tiny generated dataset above covers the code)")
def test_osie_val_images_centre_prior_equals_the_metrics_module(tmp_path, capsys):
    rc, _, err = _cli(capsys, "--data", OSIE_ROOT, "--split", "val", "--images", 3, "--maps",
                           "centre-prior,uniform", "--out", tmp_path / "o", "--figure-images", 1)
    assert rc == 0, err
    val, train = load_split("val"), load_split("train")
    want = _reference(OSIE_ROOT, val[:3], val, train, 24.0)
    per_image = [r for r in _rows(tmp_path / "o" / "per_image.csv") if r["map"] == "centre-prior"]
    assert [r["image"] for r in per_image] == val[:3]
    for g, w in zip(per_image, want):
        for k in ("nss", "cc", "auc_judd", "sauc", "kld", "sim", "ig"):
            assert float(g[k]) == pytest.approx(w[k], rel=1e-6, abs=1e-9), k
    row = _rows(tmp_path / "o" / "metrics.csv")[0]
    assert float(row["nss"]) == pytest.approx(np.mean([w["nss"] for w in want]), rel=1e-9)
    assert float(row["nss"]) > 0.5 and float(row["auc_judd"]) > 0.7  # the centre bias of OSIE
    assert len(OSIE(OSIE_ROOT, "val")) == 100


def test_map_specs():
    specs = parse_map_specs("centre-prior, uniform,rollout:cifar10-vit,student-a:runs/a.safetensors,ltpa:x,"
                            "osie-resnet18")
    assert specs == [MapSpec("centre-prior", "centre-prior", None), MapSpec("uniform", "uniform", None),
                     MapSpec("rollout:cifar10-vit", "rollout", "cifar10-vit"),
                     MapSpec("student-a", "saliency-model", "runs/a.safetensors"), MapSpec("ltpa:x", "ltpa", "x"),
                     MapSpec("osie-resnet18", "saliency-model", "osie-resnet18")]
    for text, msg in [("", "maps: empty list"), ("uniform,,centre-prior", "empty item"),
                      ("uniform:x", "'uniform' takes no model"), ("rollout", "'rollout' is not one of"),
                      ("student-a", "'student-a' is not one of .*osie-resnet18"), ("uniform,uniform", "'uniform' given twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_map_specs(text)


def test_a_map_of_the_wrong_size_is_named():
    from rollout_fast.saliency.data import Fixations

    r = Fixations("1001.jpg", (6, 8), torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.zeros(1).long(),
                  torch.zeros(1))
    with pytest.raises(ValueError, match=r"maps: 'student-a' gave a map of shape \(3, 4\) for image '1001.jpg', "
                                         r"which is 8 x 6"):
        check_map_size(torch.zeros(3, 4), r, "student-a")
    with pytest.raises(ValueError, match=r"'density' gave a map of shape \(3, 4\) for image '1001.jpg'"):
        validation_metrics(torch.rand(1, 3, 4), [r], [torch.rand(3, 4)])


def test_a_source_giving_a_wrong_size_map_is_named(tiny, tmp_path, monkeypatch):
    from rollout_fast.saliency import evaluate as ev
    from rollout_fast.saliency.sources import MapSource

    root, split, _ = tiny
    names = json.loads(split.read_text())
    bad = MapSource(MapSpec("bad", "saliency-model", "x"), "", lambda ims, recs: [torch.zeros(5, 5) for _ in recs])
    monkeypatch.setattr(ev, "build_sources", lambda *a, **k: ([bad], None))
    with pytest.raises(ValueError, match=r"maps: 'bad' gave a map of shape \(5, 5\) for image '1005.jpg'"):
        ev.evaluate_saliency(root, names["val"], [bad.spec], sigma=4.0)


def _bad_dataset(tmp_path, entries, variable="fixations"):
    """A dataset whose .mat is ``entries`` ({name: [(fix_x, fix_y), ...]}, 1-based) on 8 x 6 images."""
    from PIL import Image

    root = tmp_path / "bad"
    (root / "data" / "stimuli").mkdir(parents=True)
    (root / "data" / "eye").mkdir(parents=True)
    cells = np.empty((len(entries), 1), dtype=object)
    for i, (name, subjects) in enumerate(entries.items()):
        subs = np.empty((len(subjects), 1), dtype=object)
        for j, (xs, ys) in enumerate(subjects):
            subs[j, 0] = {"fix_x": np.array(xs, dtype=float), "fix_y": np.array(ys, dtype=float)}
        cells[i, 0] = {"img": name, "subjects": subs}
        Image.new("RGB", (8, 6)).save(root / "data" / "stimuli" / name)
    scipy_io.savemat(root / "data" / "eye" / "fixations.mat", {variable: cells})
    split = root / "split.json"
    split.write_text(json.dumps({"train": ["a.png"], "val": sorted(entries)}))
    return root, split


@pytest.mark.parametrize("entries, variable, message", [
    ({"a.png": [([1.0], [1.0])], "b.png": [([2.0, 9.0], [2.0, 3.0])]}, "fixations",
     r"image 'b.png': subject 0's fixation at \(fix_x=9, fix_y=3\) lies outside the 8 x 6 image"),
    ({"a.png": [([1.0], [1.0])], "b.png": [([], [])]}, "fixations", "image 'b.png': no fixations"),
    ({"a.png": [([1.0], [1.0])]}, "gaze", r"fixations.mat: no variable 'fixations' \(found \['gaze'\]\)"),
])
def test_bad_data_is_one_line_naming_the_item(tmp_path, capsys, entries, variable, message):
    root, split = _bad_dataset(tmp_path, entries, variable)
    rc, _, err = _cli(capsys, "--data", root, "--split-file", split, "--maps", "uniform", "--out", tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("rollout-fast saliency-eval: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "table.md").exists()


def test_bad_arguments_are_one_line(tiny, tmp_path, capsys):
    root, split, models = tiny
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"train": ["1001.jpg"], "val": []}))
    cases = [
        (["--split-file", empty, "--maps", "uniform"], r"split 'val' in .*empty.json is empty"),
        (["--split-file", split, "--maps", "foo"], r"maps: 'foo' is not one of centre-prior, mean-map, uniform"),
        (["--split-file", split, "--maps", f"ltpa:{models['vit']}"], r"is not an attention-gated AttnVGG"),
        (["--split-file", split, "--maps", f"rollout:{models['ltpa']}"], r"AttnVGG"),
        (["--split-file", split, "--maps", "t:none.safetensors"], r"saliency model: no file at 'none.safetensors'"),
        (["--split-file", split, "--maps", "uniform", "--images", 0], r"--images: expected a positive number"),
    ]
    for extra, message in cases:
        rc, _, err = _cli(capsys, "--data", root, "--out", tmp_path / "o", *extra)
        assert rc == 2 and err.count("\n") == 1, (extra, err)
        assert re.search(message, err), (extra, err)
    rc, _, err = _cli(capsys, "--data", tmp_path / "none", "--out", tmp_path / "o", "--maps", "uniform")
    assert rc == 2 and "data: dataset folder not found" in err
