"""Students: every architecture and input strategy maps the teacher's input batch to the teacher's grid,
strategies feed the backbone what they promise, cost counting, saving/loading, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rollout_fast.students import (EMBEDDED_STUDENTS, RolloutStudent, check_student_grid, count_macs,
                                   create_student, load_student, measure_cost, pruning_student_name, save_student,
                                   student_input_size)

TINY = {
    "resnet-cifar": {"channels": [8, 8, 16, 16], "head_width": 8},
    "vit-tiny": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


def images(b=2, size=32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch,strategy,factor", [
    ("resnet-cifar", "lowres", 2), ("resnet-cifar", "lowres", 4), ("resnet-cifar", "downsize", 2),
    ("vit-tiny", "lowres", 2), ("vit-tiny", "downsize", 4), ("vit-tiny", "mask", 2),
])
def test_output_is_the_teachers_grid(arch, strategy, factor):
    s = create_student(arch, strategy=strategy, factor=factor, input_size=(32, 32), grid=(8, 8), **TINY[arch])
    out = s(images())
    assert out.shape == (2, 8, 8) and out.dtype == torch.float32
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in s.head_parameters())
    m = s.eval().maps(images())
    assert m.shape == (2, 8, 8) and (m >= 0).all() and torch.allclose(m.amax(dim=(1, 2)), torch.ones(2))


def test_resnet18_layout_and_non_square_grid():
    s = create_student("resnet", strategy="lowres", factor=4, input_size=(32, 48), grid=(8, 12))
    assert s.net.trunk.conv1.stride == (1, 1) and isinstance(s.net.trunk.maxpool, nn.Identity)
    assert [len(getattr(s.net.trunk, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert s.eval()(torch.randn(1, 3, 32, 48)).shape == (1, 8, 12)


def _backbone_input(s, x):
    seen = {}
    first = s.net.trunk.conv1 if hasattr(s.net, "trunk") else s.net.vit.patch_embed
    h = first.register_forward_hook(lambda m, a, o: seen.update(shape=tuple(a[0].shape)))
    s(x)
    h.remove()
    return seen["shape"]


def test_strategies_feed_what_they_promise():
    x = images()
    low = create_student("resnet-cifar", strategy="lowres", factor=4, **TINY["resnet-cifar"])
    assert _backbone_input(low, x) == (2, 3, 8, 8) and low.thumbnail_size == (8, 8)
    down = create_student("resnet-cifar", strategy="downsize", factor=4, **TINY["resnet-cifar"])
    assert _backbone_input(down, x) == (2, 3, 32, 32)
    pix = down.prepare(x)  # pixelated: the 8x8 thumbnail upsampled again carries no more detail
    again = torch.nn.functional.interpolate(pix, size=(8, 8), mode="bilinear", antialias=True)
    assert not torch.allclose(pix, x, atol=1e-2) and pix.shape == x.shape
    assert torch.allclose(down.prepare(torch.nn.functional.interpolate(again, size=(32, 32), mode="bilinear")),
                          pix, atol=0.35)
    mask = create_student("vit-tiny", strategy="mask", factor=2, **TINY["vit-tiny"])
    tokens = {}
    h = mask.net.vit.blocks[0].register_forward_hook(lambda m, a, o: tokens.update(n=a[0].shape[1]))
    mask.eval()(x)
    h.remove()
    assert tokens["n"] == 1 + 16  # class token + a quarter of the 64 patches
    assert torch.equal(mask(x), mask(x))  # eval: fixed seeded subset, deterministic
    mask.train()
    torch.manual_seed(0)
    a = mask(x)
    assert not torch.equal(a, mask(x))  # training: a fresh random subset per call


def test_cost_counting():
    assert count_macs(nn.Linear(10, 5, bias=False), torch.randn(3, 10)) == 50
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(2, 3, 5, 5)) == 25 * 4 * 27
    a = create_student("resnet-cifar", strategy="lowres", factor=2, **TINY["resnet-cifar"])
    b = create_student("resnet-cifar", strategy="downsize", factor=2, **TINY["resnet-cifar"])
    ma, mb = count_macs(a, images(1)), count_macs(b, images(1))
    assert 3 * ma < mb  # a 16x16 thumbnail costs about a quarter of the full-size input
    cost = measure_cost(a, a, (32, 32), batch_size=4, repeats=2)
    assert cost["macs_per_image"] == ma and cost["params"] == sum(p.numel() for p in a.parameters())
    assert cost["latency_ms_batch1"] > 0 and cost["ms_per_image_batch4"] > 0
    assert a.training  # measure_cost restores the mode


def test_head_and_backbone_parameters_partition_the_model():
    s = create_student("vit-tiny", strategy="lowres", factor=2, **TINY["vit-tiny"])
    head, body = s.head_parameters(), s.backbone_parameters()
    assert len(head) + len(body) == len(list(s.parameters())) and {id(p) for p in head}.isdisjoint(map(id, body))


def test_save_and_load_round_trip(tmp_path):
    s = create_student("resnet-cifar", strategy="lowres", factor=2, loss="bce", **TINY["resnet-cifar"]).eval()
    card = {"teacher": "some-teacher", "rollout": {"head_fusion": "max", "discard_ratio": 0.9}}
    w, c = save_student(tmp_path / "st.safetensors", s, card)
    loaded, got = load_student(str(w))
    assert got["rollout"] == card["rollout"] and got["student"]["loss"] == "bce"
    assert not loaded.training and loaded.activation == "sigmoid"
    x = images()
    assert torch.equal(loaded(x), s(x))
    with pytest.raises(ValueError, match="no shipped student"):
        load_student("not-a-teacher")
    with pytest.raises(FileNotFoundError, match="student"):
        load_student(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("name, target", [("cifar10-vit", "rollout"), ("cifar10-vit-prune", "grad-rollout")])
def test_shipped_students_for_the_embedded_teacher(name, target):
    path = EMBEDDED_STUDENTS[name].with_suffix(".safetensors")
    if not path.is_file():
        pytest.skip(f"the shipped student is not installed yet ({path})")
    assert path.stat().st_size <= 5 * 2 ** 20
    student, card = load_student(name)
    assert isinstance(student, RolloutStudent) and card["teacher"] == "cifar10-vit"
    assert card["rollout"].get("target", "rollout") == target and card["rollout"]["discard_ratio"] == 0.0
    assert "recall@0.5" in card["metrics"]["centred"]
    out = student(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 8, 8) and torch.isfinite(out).all()


def test_pruning_student_name():
    assert pruning_student_name("cifar10-vit") == "cifar10-vit-prune"
    assert pruning_student_name("vit_small_patch16_224") == "vit_small_patch16_224"


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="student"):
        create_student("resnet50")
    with pytest.raises(ValueError, match="strategy"):
        create_student("resnet-cifar", strategy="mask")
    with pytest.raises(ValueError, match="strategy"):
        create_student("resnet-cifar", strategy="thumbnail")
    with pytest.raises(ValueError, match="factor"):
        create_student("resnet-cifar", factor=0)
    with pytest.raises(ValueError, match="loss"):
        create_student("resnet-cifar", loss="l1")
    with pytest.raises(ValueError, match="options"):
        create_student("resnet-cifar", depth=3)
    with pytest.raises(ValueError, match="patch_size"):
        create_student("vit-tiny", strategy="lowres", factor=4, patch_size=3, **{k: v for k, v in
                       TINY["vit-tiny"].items()})
    with pytest.raises(ValueError, match="pretrained"):
        create_student("resnet-cifar", pretrained=True)
    with pytest.raises(ValueError, match="factor"):
        student_input_size("lowres", 64, (32, 32))
    s = create_student("resnet-cifar", **TINY["resnet-cifar"])
    with pytest.raises(ValueError, match="images"):
        s(torch.randn(2, 3, 16, 16))
    with pytest.raises(TypeError, match="images"):
        s(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grid"):
        check_student_grid(s, (14, 14))
    with pytest.raises(ValueError, match="input"):
        check_student_grid(s, (8, 8), (64, 64))
    with pytest.raises(TypeError, match="student"):
        check_student_grid(nn.Linear(2, 2), (8, 8))
