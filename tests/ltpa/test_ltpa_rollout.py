"""The main job (rollout_fast.jobs.rollout_images, ``rollout-fast rollout``) with a Learn to Pay Attention model:
the same files as for a ViT, with the model's own maps (each level and their combination), checked against a
plain recomputation; the asset name of a model not installed yet and misuse give one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ltpa_testing import saved_ltpa, saved_vit, write_images

from rollout_fast.cli import main
from rollout_fast.jobs import rollout_images
from rollout_fast.ltpa import LTPAExplainer
from rollout_fast.zoo import INSTALLABLE_MODELS, load_teacher


def _inputs(files, data_config):
    from timm.data import create_transform

    from rollout_fast.data import load_image

    t = create_transform(**data_config)
    return torch.stack([t(load_image(f)) for f in files])


@pytest.mark.parametrize("variant, grid, want_grid", [("pc-softmax-after", None, (16, 16)),
                                                      ("dp-sigmoid-before", (8, 8), (8, 8))])
def test_rollout_job_writes_the_ltpa_maps(tmp_path, variant, grid, want_grid):
    model, dc = load_teacher(saved_ltpa(tmp_path, variant))
    files = sorted(write_images(tmp_path / "img").iterdir())
    res = rollout_images(files, tmp_path / "out", model, dc, batch_size=3, progress=False, overlays="all", grid=grid)
    with torch.no_grad():
        logits, levels = model(_inputs(files, dc))
    # the combination, written out: each level resized to the grid (area where it is at least as fine, else
    # bilinear), divided by its sum per image, then the levels averaged
    want = 0
    for a in levels:
        fine = a.shape[-1] >= want_grid[-1]
        r = (F.interpolate(a[:, None], size=want_grid, mode="area") if fine else
             F.interpolate(a[:, None], size=want_grid, mode="bilinear", align_corners=False))[:, 0]
        want = want + r / r.sum(dim=(1, 2), keepdim=True)
    want = want / 3
    saved = np.load(res.npz)
    assert sorted(saved.files) == ["files", "level_1", "level_2", "level_3", "ltpa_variant", "maps", "method",
                                   "predicted_class", "predicted_label", "probability"]
    assert saved["maps"].shape == (3, *want_grid) and saved["maps"].dtype == np.float32
    np.testing.assert_array_equal(saved["maps"], want.numpy())
    for i in range(3):
        np.testing.assert_array_equal(saved[f"level_{i + 1}"], levels[i].numpy())
    p, c = logits.softmax(-1).max(-1)
    np.testing.assert_array_equal(saved["predicted_class"], c.numpy())
    np.testing.assert_array_equal(saved["probability"], p.numpy())
    assert list(saved["predicted_label"]) == [f"class{int(k)}" for k in c]
    assert str(saved["method"]) == "ltpa" and str(saved["ltpa_variant"]) == variant
    assert list(saved["files"]) == [str(f) for f in files]
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == [
        f"0000{i}_img{i}.png" for i in range(3)]
    assert (tmp_path / "out" / "grid.png").is_file() and res.grid == tmp_path / "out" / "grid.png"


def test_explainer_refuses_the_baseline_and_bad_grids(tmp_path):
    vgg, _ = load_teacher(saved_ltpa(tmp_path, "vgg"))
    with pytest.raises(ValueError) as e:
        LTPAExplainer(vgg)
    assert str(e.value) == ("model: expected an attention-gated Learn to Pay Attention model (AttnVGG), got AttnVGG "
                            "variant 'vgg' (no attention)")
    with pytest.raises(ValueError, match=r"^grid must be an int >= 1 or a pair"):
        LTPAExplainer(load_teacher(saved_ltpa(tmp_path))[0], grid=(8, 0))


def test_rollout_job_refuses_grad_students_and_a_grid_for_a_vit(tmp_path):
    model, dc = load_teacher(saved_ltpa(tmp_path))
    files = sorted(write_images(tmp_path / "img", n=1).iterdir())
    with pytest.raises(ValueError) as e:
        rollout_images(files, tmp_path / "o1", model, dc, method="grad", progress=False)
    assert str(e.value) == ("method: 'grad' (gradient rollout) needs a ViT; a Learn to Pay Attention model gives "
                            "its own attention maps (method 'attention')")
    with pytest.raises(ValueError, match=r"^student: a rollout student predicts a ViT's rollout"):
        rollout_images(files, tmp_path / "o2", model, dc, student=torch.nn.Identity(), progress=False)
    vit, vdc = load_teacher(saved_vit(tmp_path))
    with pytest.raises(ValueError) as e:
        rollout_images(files, tmp_path / "o3", vit, vdc, grid=8, progress=False)
    assert str(e.value) == "grid: used only with a Learn to Pay Attention model (a ViT's maps are on its patch grid)"
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_rollout_command_with_an_ltpa_card(tmp_path, capsys):
    ckpt = saved_ltpa(tmp_path)
    imgs = write_images(tmp_path / "img", n=2)
    out = tmp_path / "out"
    assert main(["rollout", str(imgs), "--model", str(ckpt), "--out", str(out), "--grid", "8x8",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"Learn to Pay Attention maps of 2 image(s) written to {out}/")
    saved = np.load(out / "rollout.npz")
    assert saved["maps"].shape == (2, 8, 8) and saved["level_1"].shape == (2, 16, 16)
    assert saved["level_2"].shape == (2, 8, 8) and saved["level_3"].shape == (2, 4, 4)


@pytest.mark.parametrize("argv, message", [
    (["--method", "grad"], ("--method grad needs a ViT (gradient rollout); a Learn to Pay Attention model gives its "
                            "own attention maps")),
    (["--grid", "0"], "--grid: expected N or GHxGW (positive ints, e.g. 8 or 8x8), got '0'"),
    (["--grid", "8x"], "--grid: expected N or GHxGW (positive ints, e.g. 8 or 8x8), got '8x'"),
    (["--shards"], "--shards: a Learn to Pay Attention model's maps are written to rollout.npz; leave out --shards"),
    (["--shards", "--grid", "8"], ("--grid is not used with --shards (a Learn to Pay Attention model's maps go to "
                                   "rollout.npz)")),
])
def test_rollout_command_misuse_with_an_ltpa_model_is_one_line(tmp_path, capsys, argv, message):
    ckpt = saved_ltpa(tmp_path)
    imgs = write_images(tmp_path / "img", n=1)
    rc = main(["rollout", str(imgs), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"rollout-fast rollout: {message}\n"
    assert not (tmp_path / "out" / "rollout.npz").exists()


def test_grid_option_is_refused_for_a_vit(tmp_path, capsys):
    imgs = write_images(tmp_path / "img", n=1)
    rc = main(["rollout", str(imgs), "--model", str(saved_vit(tmp_path)), "--out", str(tmp_path / "out"),
               "--grid", "8", "--no-progress"])
    assert rc == 2 and capsys.readouterr().err == ("rollout-fast rollout: --grid is used only with a Learn to Pay "
                                                   "Attention model (a ViT's maps are on its patch grid)\n")


@pytest.mark.parametrize("name", sorted(INSTALLABLE_MODELS))
def test_a_model_not_installed_yet_is_a_one_line_error(tmp_path, capsys, monkeypatch, name):
    from rollout_fast import zoo

    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "assets")  # an install without the trained models
    imgs = write_images(tmp_path / "img", n=1)
    rc = main(["rollout", str(imgs), "--model", name, "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err == (
        f"rollout-fast rollout: model: {name!r} is not installed yet (no {name}.safetensors + {name}.json in "
        f"{tmp_path / 'assets'}); train and install it with: {INSTALLABLE_MODELS[name]}\n")


def test_an_installed_ltpa_model_loads_by_name(tmp_path, monkeypatch):
    import shutil

    from rollout_fast import zoo

    ckpt = saved_ltpa(tmp_path)
    (tmp_path / "assets").mkdir()
    shutil.copyfile(ckpt, tmp_path / "assets" / "cifar10-ltpa.safetensors")
    shutil.copyfile(ckpt.with_suffix(".json"), tmp_path / "assets" / "cifar10-ltpa.json")
    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "assets")
    model, dc = load_teacher("cifar10-ltpa")
    ref, _ = load_teacher(ckpt)
    assert type(model).__name__ == "AttnVGG" and dc["input_size"] == (3, 32, 32)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.variant == "pc-softmax-after"
