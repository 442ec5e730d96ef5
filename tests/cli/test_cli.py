"""The command line (rollout_fast.cli) end to end on real CIFAR-10 test images with the embedded teacher, and the
parser built from one module per command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rollout_fast.cli import main


@pytest.mark.slow
def test_rollout_command_on_real_images(cifar10_test, tmp_path, capsys):
    files = [str(cifar10_test / c / "0000.jpg") for c in ("cat", "ship", "truck")]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    folder = cifar10_test / "frog"  # a folder too: its first images via a small copy
    sub = tmp_path / "frogs"
    sub.mkdir()
    for i in range(3):
        (sub / f"{i}.png").write_bytes(b"")  # empty files: unreadable, skipped
    Image.open(folder / "0001.jpg").convert("L").save(sub / "gray.png")  # another mode, converted
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.jpg"):
        code = main(["rollout", *files, str(broken), str(sub), "--out", str(out), "--batch-size", "2",
                     "--model", "cifar10-vit", "--no-progress", "--discard-ratio", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 4" in printed and "broken.jpg" in printed and str(out) in printed
    data = np.load(out / "rollout.npz")
    assert data["maps"].shape == (4, 8, 8) and data["maps"].dtype == np.float32
    assert np.isfinite(data["maps"]).all()
    np.testing.assert_allclose(data["maps"].max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert list(data["files"]) == files + [str(sub / "gray.png")]
    assert data["predicted_class"].dtype == np.int64 and ((data["probability"] > 0) & (data["probability"] <= 1)).all()
    assert data["predicted_label"][1] == "ship"  # the teacher gets this easy one right
    pngs = sorted((out / "overlays").glob("*.png")) + [out / "grid.png"]
    assert len(pngs) == 5
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"


def test_rollout_command_fails_when_nothing_is_readable(tmp_path, capsys):
    bad = tmp_path / "a.jpg"
    bad.write_bytes(b"nope")
    with pytest.warns(UserWarning):
        code = main(["rollout", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code != 0
    assert not (tmp_path / "o" / "rollout.npz").exists()
    assert "could be read" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_teacher_prints_top1(cifar10_test, tmp_path):
    root = tmp_path / "split"
    for c in sorted(p.name for p in cifar10_test.iterdir()):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{i}.jpg").symlink_to(cifar10_test / c / f"{i:04d}.jpg")
    res = subprocess.run([sys.executable, "-m", "rollout_fast.cli", "eval-teacher", "--data", str(root),
                          "--no-progress"], capture_output=True, text=True, check=True)
    acc = float(res.stdout.split("top-1")[1].split()[0])
    assert 0.5 <= acc <= 1.0


def test_info_lists_backends_and_teacher():
    res = subprocess.run([sys.executable, "-m", "rollout_fast.info"], capture_output=True, text=True, check=True)
    assert "backends:" in res.stdout and "reference" in res.stdout and "cifar10-vit" in res.stdout


@pytest.mark.slow
def test_rollout_command_draws_the_shipped_student(cifar10_test, tmp_path):
    files = [str(cifar10_test / c / "0000.jpg") for c in ("cat", "ship")]
    out = tmp_path / "out"
    assert main(["rollout", *files, "--out", str(out), "--model", "cifar10-vit", "--student", "--no-progress",
                 "--no-overlays"]) == 0
    data = np.load(out / "rollout.npz")
    assert data["student_maps"].shape == data["maps"].shape == (2, 8, 8)
    assert np.isfinite(data["student_maps"]).all()
    np.testing.assert_allclose(data["student_maps"].max(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.corrcoef(data["student_maps"].ravel(), data["maps"].ravel())[0, 1] > 0.5


@pytest.mark.slow
def test_rollout_defaults_to_the_imagenette_teacher_and_its_student(imagenette_val, tmp_path):
    """No --model: imagenette-vit (14 x 14 patch grid) on real photographs, with its shipped student."""
    files = [str(sorted((imagenette_val / wnid).iterdir())[0]) for wnid in ("n02102040", "n03888257")]
    out = tmp_path / "out"
    assert main(["rollout", *files, "--out", str(out), "--student", "--no-progress", "--no-overlays"]) == 0
    data = np.load(out / "rollout.npz")
    assert data["maps"].shape == data["student_maps"].shape == (2, 14, 14)
    assert list(data["predicted_label"]) == ["English springer", "parachute"]
    np.testing.assert_allclose(data["student_maps"].max(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.corrcoef(data["student_maps"].ravel(), data["maps"].ravel())[0, 1] > 0.3


def test_rollout_command_rejects_a_student_of_another_grid(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img)
    code = main(["rollout", str(img), "--out", str(tmp_path / "o"), "--model", "vit_tiny_patch16_224",
                 "--student", "cifar10-vit", "--no-progress"])
    assert code == 1
    assert "grid" in capsys.readouterr().err
    assert not (tmp_path / "o" / "rollout.npz").exists()


def test_parser_has_every_command_and_imports_no_timm():
    """One sub-command per command module, in the documented order; building the parser does not import timm
    (a fresh interpreter), and ``python -m rollout_fast.cli --help`` lists the commands."""
    code = ("import sys; from rollout_fast.cli import build_parser; p = build_parser(); "
            "sub = next(a for a in p._actions if a.dest == 'command'); print(list(sub.choices)); "
            "print('timm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, timm_loaded = res.stdout.split("\n")[:2]
    assert names == str(["train-teacher", "rollout", "eval-teacher", "distill", "prune-eval", "saliency-eval"])
    assert timm_loaded == "False"
    res = subprocess.run([sys.executable, "-m", "rollout_fast.cli", "--help"], capture_output=True, text=True,
                         check=True)
    assert "prune-eval" in res.stdout and "train-teacher" in res.stdout


def test_every_command_module_registers_and_runs():
    from rollout_fast.cli import COMMANDS, prune_eval, rollout

    assert all(callable(getattr(c, "register", None)) for c in COMMANDS)
    args = __import__("rollout_fast.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["prune-eval", "--data", "d", "--out", "o"])
    assert args.func is prune_eval.run
    args = __import__("rollout_fast.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["rollout", "a.png", "--out", "o"])
    assert args.func is rollout.run
