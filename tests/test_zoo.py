"""The embedded teacher and load_teacher: offline loading, accuracy on real data, safe checkpoints; the shipped
students and load_student / save_student."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from rollout_fast import load_teacher
from rollout_fast.checkpoint import save_weights
from rollout_fast.jobs import evaluate_folder
from rollout_fast.students import RolloutStudent, create_student, save_student
from rollout_fast.zoo import (
    ASSETS,
    EMBEDDED_STUDENTS,
    EMBEDDED_TEACHERS,
    CheckpointNotFoundError,
    load_student,
    pruning_student_name,
    teacher_card,
)

_TINY_RESNET = {"channels": [8, 8, 16, 16], "head_width": 8}


def test_embedded_teacher_loads_offline_in_eval_mode():
    model, cfg = load_teacher("cifar10-vit")
    assert isinstance(model, timm.models.VisionTransformer)
    assert not model.training
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == 3
    assert model.patch_embed.grid_size == (8, 8) and model.num_prefix_tokens == 1
    card = teacher_card()
    assert card["class_names"][0] == "airplane" and card["test_top1"] >= 0.80
    assert EMBEDDED_TEACHERS["cifar10-vit"].with_suffix(".safetensors").stat().st_size <= 12 * 2**20
    assert timm.data.resolve_data_config({}, model=model)["mean"] == cfg["mean"]


# top-1 of the embedded teacher on SLICE, measured (deterministic on the CPU): counted by the test in float32,
# and by evaluate_folder (bf16 autocast, as eval-teacher measures it)
SLICE = range(0, 10000, 10)  # every 10th image of the sorted ImageFolder: 100 per class, 1,000 in all
SLICE_TOP1_FP32, SLICE_TOP1_EVAL = 0.801, 0.802
TOL = 0.004  # 4 images: a 0.5-point change (an inflated metric, pos_embed not loaded) fails


@pytest.mark.slow
def test_embedded_teacher_accuracy_on_fixed_test_slice(cifar10_test):
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Subset

    from rollout_fast.data import image_folder

    model, cfg = load_teacher("cifar10-vit")
    ds = Subset(image_folder(cifar10_test, create_transform(**cfg)), list(SLICE))
    correct, labels = 0, []
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=250):
            correct += int((model(x).argmax(-1) == y).sum())  # top-1, counted here
            labels += y.tolist()
    assert [labels.count(c) for c in range(10)] == [100] * 10
    assert abs(correct / 1000 - SLICE_TOP1_FP32) <= TOL, correct
    acc = evaluate_folder(model, cfg, cifar10_test, indices=SLICE, progress=False)
    assert acc >= 0.78
    assert abs(acc - SLICE_TOP1_EVAL) <= TOL, acc


SMALL_SLICE_TOP1_FP32, SMALL_SLICE_TOP1_EVAL = 0.690, 0.688  # cifar10-vit-small on SLICE, measured likewise


def test_small_embedded_teacher_shares_the_teachers_grid():
    """cifar10-vit-small, the cross-model scorer of issue 16: a second CIFAR-10 ViT (depth 4, width 64, 2 heads,
    0.22 M parameters) on the teacher's input and 8 x 8 patch grid, so its rollout can choose the teacher's tokens."""
    small, small_cfg = load_teacher("cifar10-vit-small")
    big, big_cfg = load_teacher("cifar10-vit")
    assert isinstance(small, timm.models.VisionTransformer) and not small.training
    assert len(small.blocks) == 4 and small.embed_dim == 64 and small.blocks[0].attn.num_heads == 2
    assert sum(p.numel() for p in small.parameters()) == 223802
    assert small.patch_embed.grid_size == big.patch_embed.grid_size == (8, 8)
    assert small_cfg == big_cfg
    card = teacher_card("cifar10-vit-small")
    assert card["class_names"] == teacher_card()["class_names"] and card["test_top1"] == 0.6992
    assert "--name cifar10-vit-small --embed-dim 64 --depth 4 --num-heads 2" in card["command"]


@pytest.mark.slow
def test_small_embedded_teacher_accuracy_on_fixed_test_slice(cifar10_test):
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Subset

    from rollout_fast.data import image_folder

    model, cfg = load_teacher("cifar10-vit-small")
    ds = Subset(image_folder(cifar10_test, create_transform(**cfg)), list(SLICE))
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=250):
            correct += int((model(x).argmax(-1) == y).sum())
    assert abs(correct / 1000 - SMALL_SLICE_TOP1_FP32) <= TOL, correct
    acc = evaluate_folder(model, cfg, cifar10_test, indices=SLICE, progress=False)
    assert abs(acc - SMALL_SLICE_TOP1_EVAL) <= TOL, acc


def test_imagenette_teacher_loads_offline_with_deits_token_layout():
    """imagenette-vit (issue 13): 112 px, 8 px conv-stem patches, 14 x 14 grid + class token (N = 197)."""
    model, cfg = load_teacher("imagenette-vit")
    assert isinstance(model, timm.models.VisionTransformer) and not model.training
    assert cfg["input_size"] == (3, 112, 112) and cfg["crop_pct"] == 0.875
    assert model.patch_embed.grid_size == (14, 14) and model.num_prefix_tokens == 1
    card = teacher_card("imagenette-vit")
    assert card["class_names"][:2] == ["tench", "English springer"] and card["test_top1"] == 0.8397
    assert EMBEDDED_TEACHERS["imagenette-vit"].with_suffix(".safetensors").stat().st_size <= 12 * 2**20
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 10)


IMAGENETTE_SLICE = range(0, 3925, 10)  # every 10th of the 3,925 sorted val photos: 393 in all
IMAGENETTE_SLICE_CORRECT = 333  # measured both ways (float32 here; bf16 autocast in evaluate_folder): 84.7%


@pytest.mark.slow
def test_imagenette_teacher_accuracy_on_fixed_val_slice(imagenette_val):
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Subset

    from rollout_fast.data import image_folder

    model, cfg = load_teacher("imagenette-vit")
    ds = Subset(image_folder(imagenette_val, create_transform(**cfg)), list(IMAGENETTE_SLICE))
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=131):
            correct += int((model(x).argmax(-1) == y).sum())
    assert abs(correct - IMAGENETTE_SLICE_CORRECT) <= 2, correct  # 2 of 393: a 0.5-point change fails
    acc = evaluate_folder(model, cfg, imagenette_val, indices=IMAGENETTE_SLICE, progress=False)
    assert abs(acc * 393 - IMAGENETTE_SLICE_CORRECT) <= 2, acc


def test_local_card_checkpoint_round_trip(tmp_path):
    model, _ = load_teacher("cifar10-vit")
    path = tmp_path / "copy.safetensors"
    save_weights(path, model.state_dict())
    (tmp_path / "copy.json").write_text(EMBEDDED_TEACHERS["cifar10-vit"].with_suffix(".json").read_text())
    again, _ = load_teacher(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_timm_name_with_local_checkpoint(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    model, cfg = load_teacher("vit_tiny_patch16_224", checkpoint=tmp_path / "w.pth", img_size=32,
                              patch_size=8, depth=1, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert cfg["input_size"] == (3, 32, 32)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(ValueError, match="checkpoint"):
        load_teacher("vit_tiny_patch16_224", checkpoint=path, img_size=32, depth=1)


def test_missing_checkpoint_and_unknown_model():
    with pytest.raises(ValueError, match="checkpoint"):
        load_teacher("vit_tiny_patch16_224", checkpoint="/nonexistent/weights.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="model"):
        load_teacher("/nonexistent/teacher.safetensors")
    with pytest.raises(ValueError, match="model"):
        load_teacher("no_such_model_xyz")
    with pytest.raises(ValueError, match="checkpoint"):
        load_teacher("vit_tiny_patch16_224", checkpoint=__file__, depth=1)


# ------------------------------------------------------------------------------------------ students

def test_save_and_load_round_trip(tmp_path):
    s = create_student("resnet-cifar", strategy="lowres", factor=2, loss="bce", **_TINY_RESNET).eval()
    card = {"teacher": "some-teacher", "rollout": {"head_fusion": "max", "discard_ratio": 0.9}}
    w, _ = save_student(tmp_path / "st.safetensors", s, card)
    loaded, got = load_student(str(w))
    assert got["rollout"] == card["rollout"] and got["student"]["loss"] == "bce"
    assert not loaded.training and loaded.activation == "sigmoid"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), s(x))
    with pytest.raises(ValueError, match="no shipped student"):
        load_student("not-a-teacher")
    with pytest.raises(FileNotFoundError, match="student"):
        load_student(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("name, teacher, target, size, grid", [
    ("cifar10-vit", "cifar10-vit", "rollout", 32, 8), ("cifar10-vit-prune", "cifar10-vit", "grad-rollout", 32, 8),
    ("imagenette-vit", "imagenette-vit", "rollout", 112, 14),
    ("imagenette-vit-prune", "imagenette-vit", "grad-rollout", 112, 14)])
def test_shipped_students_for_the_embedded_teacher(name, teacher, target, size, grid):
    path = EMBEDDED_STUDENTS[name].with_suffix(".safetensors")
    if not path.is_file():
        pytest.skip(f"the shipped student is not installed yet ({path})")
    assert path.stat().st_size <= 5 * 2 ** 20
    student, card = load_student(name)
    assert isinstance(student, RolloutStudent) and card["teacher"] == teacher
    assert card["rollout"].get("target", "rollout") == target and card["rollout"]["discard_ratio"] == 0.0
    assert "recall@0.5" in card["metrics"]["centred"]
    assert card["cost"]["macs_relative_to_teacher_forward"] <= 0.10
    out = student(torch.randn(3, 3, size, size))
    assert out.shape == (3, grid, grid) and torch.isfinite(out).all()


def test_pruning_student_name():
    assert pruning_student_name("cifar10-vit") == "cifar10-vit-prune"
    assert pruning_student_name("imagenette-vit") == "imagenette-vit-prune"
    assert pruning_student_name("vit_small_patch16_224") == "vit_small_patch16_224"


def test_students_package_still_exports_the_shipped_students():
    import rollout_fast
    from rollout_fast import students

    assert students.load_student is load_student and rollout_fast.load_student is load_student
    assert students.EMBEDDED_STUDENTS is EMBEDDED_STUDENTS
    assert students.pruning_student_name is pruning_student_name
    assert all(p.parent == ASSETS for p in EMBEDDED_STUDENTS.values())

