"""python/train_students.py and python/prune_eval.py under --teacher imagenette-vit (issue 13), before the teacher is
installed: a tiny random-weights ViT of the imagenette-vit layout (--teacher-weights) on a tiny Imagenette-like
tree; the cifar10-vit defaults unchanged."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
from imagenette_testing import make_tiny_imagenette, save_tiny_imagenette_teacher

from rollout_fast.distill import DistillConfig

PYTHON = Path(__file__).resolve().parents[1] / "python"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", PYTHON / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def students():
    return _load("train_students")


@pytest.fixture(scope="module")
def prune():
    return _load("prune_eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette_recipes")
    make_tiny_imagenette(root / "data", train_per_class=2, val_per_class=2)
    return root / "data", save_tiny_imagenette_teacher(root / "teacher")


def test_cifar_defaults_unchanged(students):
    args = students.parse_args([])
    assert (args.teacher, args.data, args.max_shift, args.install_as) == (
        "cifar10-vit", "../shared/data/cifar10", 8, "cifar10-vit")
    cfg, command = students.run_config(args, students.RUNS[0])
    assert cfg == DistillConfig(teacher="cifar10-vit", student="resnet-cifar", strategy="lowres", factor=2, loss="kld",
                                target="rollout", head_fusion="mean", discard_ratio=0.0, head_epochs=0, epochs=15,
                                batch_size=128, lr=2e-3, finetune_lr_scale=1.0, warmup_epochs=0.3, cache_targets=True,
                                views=2, max_shift=8, train_images=None, val_images=2000, workers=2)
    assert command == (
        "rollout-fast distill --teacher cifar10-vit --student resnet-cifar --strategy lowres --factor 2 "
        "--data ../shared/data/cifar10 --out runs/students/resnet-cifar-lowres-f2 --target rollout "
        "--head-fusion mean --discard-ratio 0.0 --head-epochs 0 --epochs 15 --finetune-lr-scale 1 "
        "--warmup-epochs 0.3 --cache-targets --views 2 --max-shift 8 --cache-dir runs/students/cache")
    assert [r[0] for r in students.RECIPES["cifar10-vit"].runs] == [r[0] for r in students.RUNS]


def test_imagenette_runs(students):
    args = students.parse_args(["--teacher", "imagenette-vit", "--out", "o", "--target", "grad-rollout",
                                "--install-as", "imagenette-vit-prune"])
    assert (args.data, args.max_shift, args.install_as) == ("../shared/data/imagenette", 28, "imagenette-vit-prune")
    runs = {r[0]: r for r in students.IMAGENETTE_RUNS}
    assert list(runs) == ["resnet-cifar-lowres-f4", "resnet-cifar-w16-lowres-f2", "vit-tiny-d2-lowres-f4",
                          "vit-tiny-d2p8-lowres-f2", "resnet-cifar-lowres-f2", "resnet-cifar-w16-lowres-f4",
                          "resnet-cifar-w16-lowres-f4-e24"]
    cheap, _ = students.run_config(args, runs["resnet-cifar-w16-lowres-f4"])
    assert (cheap.factor, cheap.epochs, cheap.student_options) == (4, 12, {"channels": [16, 32, 64, 128]})
    longer, _ = students.run_config(args, runs["resnet-cifar-w16-lowres-f4-e24"])
    assert (longer.factor, longer.epochs, longer.student_options) == (4, 24, {"channels": [16, 32, 64, 128]})
    cfg, command = students.run_config(args, runs["resnet-cifar-w16-lowres-f2"])
    assert (cfg.teacher, cfg.factor, cfg.test_split, cfg.max_shift, cfg.target, cfg.epochs) == (
        "imagenette-vit", 2, "val", 28, "grad-rollout", 10)
    assert cfg.student_options == {"channels": [16, 32, 64, 128]}
    assert command == (
        "rollout-fast distill --teacher imagenette-vit --student resnet-cifar --strategy lowres --factor 2 "
        "--data ../shared/data/imagenette --out o/resnet-cifar-w16-lowres-f2 --target grad-rollout "
        "--head-fusion mean --discard-ratio 0.0 --head-epochs 0 --epochs 10 --finetune-lr-scale 1 "
        "--warmup-epochs 0.3 --cache-targets --views 2 --max-shift 28 --test-split val "
        "--student-option channels=[16,32,64,128] --cache-dir o/cache")


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "imagenette-vit", "--install-as", "cifar10-vit"],
     "--install-as: 'cifar10-vit' is not a student of imagenette-vit (expected one of imagenette-vit, "
     "imagenette-vit-prune)"),
    (["--teacher", "imagenette-vit", "--only", "vit-tiny-lowres-f2"],
     "--only: vit-tiny-lowres-f2 not among the runs of imagenette-vit"),
    (["--teacher-weights", "/nowhere/t.safetensors"], "--teacher-weights: no file at '/nowhere/t.safetensors'"),
])
def test_bad_arguments_are_named(students, capsys, argv, message):
    with pytest.raises(SystemExit):
        students.parse_args(argv)
    assert message in capsys.readouterr().err


def _metrics_row(name, recall, cost=0.057):
    c = {"kld": 0.2, "cc": 0.9, "sim": 0.8, "recall@0.25": 0.7, "recall@0.5": recall, "recall@0.75": 0.9,
         "spearman": 0.8}
    b = {"kld": 0.5, "cc": 0.5, "sim": 0.5, "recall@0.25": 0.25, "recall@0.5": 0.5, "recall@0.75": 0.75,
         "spearman": 0.0}
    return {"name": name, "mark": "", "student": {"strategy": "lowres", "factor": 4}, "centred": c,
            "object_placement": {"cc_centred": 0.9, "cc_shifted": 0.87, "cc_drop": 0.03, "passed": True,
                                 "shift_pixels": 28},
            "cost": {"student": {"params": 714000, "macs_per_image": 34066816, "latency_ms_batch1": 1.5},
                     "teacher_rollout": {"params": 2700000, "forward_macs_per_image": 593553792,
                                         "latency_ms_batch1": 20.0},
                     "macs_relative_to_teacher_forward": cost, "latency_relative_to_teacher_rollout_batch1": 0.075},
            "baselines": {k: {"centred": b, "shifted": b} for k in ("centre_prior", "mean_map", "uniform")},
            "training": {"train_images": None, "epochs": 12}}


def test_imagenette_table_and_targets(students):
    md = students.table([_metrics_row("resnet-cifar-lowres-f4", 0.76)], "imagenette-vit")
    assert ("| resnet-cifar-lowres-f4 | lowres | 4 | 9.5k × 12 | 0.200 | 0.900 | 0.800 | 0.700 | 0.760 | 0.900 | "
            "0.800 | 0.870 (+0.030) | 0.71 M | 34.1 M (5.7%) | 1.50 ms (7.5%) |") in md
    assert "| *teacher rollout (imagenette-vit)* | - | - | - | 0 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 2.70 M | 593.6 M (100%)" in md
    assert students.table([_metrics_row("x", 0.76)]).count("50k × 12") == 1  # CIFAR's default size
    got = students.targets(_metrics_row("x", 0.76), 0.75)
    assert got[0] == "top-50% recall >= 0.75: 0.760 -> met"
    assert students.targets(_metrics_row("x", 0.76))[0] == "top-50% recall >= 0.80: 0.760 -> NOT met"


def test_student_recipe_smoke_then_prune_recipe_smoke(students, prune, tiny, tmp_path, monkeypatch):
    """Both recipes end to end under --teacher imagenette-vit, each well under 60 s: a grad-rollout pruning student
    (one epoch, installed as imagenette-vit-prune into a temporary assets path), then the scorer study with it."""
    data, teacher = tiny
    dest = tmp_path / "assets" / "imagenette-vit-prune-student"
    monkeypatch.setitem(students.EMBEDDED_STUDENTS, "imagenette-vit-prune", dest)  # zoo's dict: load_student sees it
    t0 = time.process_time()  # CPU seconds: the machine running the tests may be shared
    students.main(["--teacher", "imagenette-vit", "--teacher-weights", str(teacher), "--data", str(data),
                   "--out", str(tmp_path / "students"), "--target", "grad-rollout", "--only", "resnet-cifar-lowres-f4",
                   "--epochs-scale", "0.01", "--views", "1", "--workers", "0", "--batch-size", "10", "--install-as", "imagenette-vit-prune"])
    assert time.process_time() - t0 < 60
    metrics = json.loads((tmp_path / "students" / "resnet-cifar-lowres-f4" / "metrics.json").read_text())
    assert metrics["test_images"] == 20 and metrics["object_placement"]["shift_pixels"] == 28
    assert metrics["rollout"]["target"] == "grad-rollout" and metrics["student"]["grid"] == [14, 14]
    md = (tmp_path / "students" / "RESULTS.md").read_text()
    assert md.startswith("Students of `imagenette-vit` (gradient rollout of the predicted class, discard ratio 0.0), "
                         "Imagenette val (3,925 photographs); *CC shifted*: every test image moved 28 px diagonally")
    assert "| *teacher rollout (imagenette-vit)* |" in md and "Shipped: **resnet-cifar-lowres-f4**." in md
    assert (tmp_path / "students" / "grid.png").is_file()
    card = json.loads(dest.with_suffix(".json").read_text())
    assert card["name"] == "imagenette-vit-prune-student" and card["teacher"] == "imagenette-vit"
    assert card["run"] == "resnet-cifar-lowres-f4" and card["training"]["test_split"] == "val"

    t0 = time.process_time()
    assert prune.main(["--teacher", "imagenette-vit", "--teacher-weights", str(teacher), "--data", str(data / "val"),
                       "--out", str(tmp_path / "prune"), "--throughput-batches", "1,4", "--throughput-time", "0.01",
                       "--no-progress"]) == 0
    assert time.process_time() - t0 < 60
    res = json.loads((tmp_path / "prune" / "results.json").read_text())
    assert res["meta"]["student"] == "imagenette-vit-prune" and res["meta"]["num_patches"] == 196
    assert res["meta"]["images"] == 20 and res["meta"]["seeds"] == 3
    keeps = [1.0, 0.9, 0.75, 0.5, 0.4, 0.25, 0.1]
    assert [(r["scorer"], r["keep_ratio"]) for r in res["rows"]] == [
        (s, k) for s in ("random", "rollout", "grad-rollout", "cls-attention", "student") for k in keeps]
    assert [r["tokens_kept"] for r in res["rows"][:7]] == [196, 176, 147, 98, 78, 49, 20]
    assert {(r["scorer"], r["batch"]) for r in res["throughput"]} >= {("full", 1), ("full", 4), ("student", 4)}


def test_prune_recipe_arguments(prune):
    assert prune.cli_args([]) == [
        "prune-eval", "--model", "cifar10-vit", "--data", "../shared/data/cifar10/test", "--out", "runs/prune",
        "--throughput-batches", "1,256", "--scorers", "random,rollout,grad-rollout,cls-attention,student",
        "--keep", "1.0,0.9,0.75,0.5,0.4,0.25,0.1", "--seeds", "3"]
    assert prune.cli_args(["--compare"])[:7] == ["prune-eval", "--model", "cifar10-vit", "--data",
                                                 "../shared/data/cifar10/test", "--out", "runs/compare"]
    assert prune.cli_args(["--compare"])[9:] == ["--methods", *prune.COMPARISON]
    got = prune.cli_args(["--teacher", "imagenette-vit", "--compare", "--limit", "100"])
    assert got == ["prune-eval", "--model", "imagenette-vit", "--data", "../shared/data/imagenette/val", "--out",
                   "runs/compare-imagenette", "--throughput-batches", "1,256", "--limit", "100", "--methods",
                   *prune.IMAGENETTE_COMPARISON]
    got = prune.cli_args(["--teacher", "imagenette-vit", "--teacher-weights", "t.safetensors"])
    assert got[:9] == ["prune-eval", "--model", "t.safetensors", "--student", "imagenette-vit-prune", "--data",
                       "../shared/data/imagenette/val", "--out", "runs/prune-imagenette"]
    got = prune.cli_args(["--teacher", "imagenette-vit", "--teacher-weights", "t.safetensors", "--student", "s"])
    assert got[:3] == ["prune-eval", "--model", "t.safetensors"] and got.count("--student") == 1


def test_imagenette_comparison_fits_197_tokens(prune, tiny):
    """Every operating point of IMAGENETTE_COMPARISON builds on the imagenette-vit layout (ToMe's r up to 28)."""
    from rollout_fast import load_teacher
    from rollout_fast.prune.merge import max_merge
    from rollout_fast.prune.study import build_methods

    model, _ = load_teacher(str(tiny[1]))
    specs = [m for m in prune.IMAGENETTE_COMPARISON if not m.startswith(("student", "random"))]
    built = build_methods(model, specs, (112, 112))
    assert len(built) == 5 + 4 + 3 + 4 + 2  # tome, evit at blocks 1-3 and 0-2, ats at 1-3 and 1-5
    n = 197
    for _ in range(6):  # r = 28 at every block: the last block still has 56 patch tokens to halve
        assert max_merge(n, 1) >= 28
        n -= 28
    assert n == 29 and max_merge(197 - 5 * 29, 1) < 29


def test_student_ceiling_scores_the_teacher_on_its_own_thumbnail(tiny, capsys):
    """python/student_ceiling.py: the round trip keeps the shape (and is the identity at the image's own size);
    the full-size 'thumbnail' scores exactly 1 against the teacher's rollout of the image."""
    import torch

    ceiling = _load("student_ceiling")
    x = torch.rand(2, 3, 112, 112)
    assert torch.equal(ceiling.thumbnail_round_trip(x, 112), x)
    assert ceiling.thumbnail_round_trip(x, 28).shape == x.shape
    assert ceiling.main(["--teacher", str(tiny[1]), "--data", str(tiny[0] / "val"), "--sizes", "28,112",
                         "--limit", "6", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "6 images" in lines[0] and lines[1].startswith("  28 px  kld ")
    full = dict(zip(lines[2].split()[2::2], map(float, lines[2].split()[3::2])))
    assert full["cc"] == pytest.approx(1.0, abs=1e-5) and full["recall@0.5"] == 1.0 and full["kld"] < 1e-5
