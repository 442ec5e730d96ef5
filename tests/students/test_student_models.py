"""Students: every architecture and input strategy maps the teacher's input batch to the teacher's grid,
strategies feed the backbone what they promise, the registry takes new architectures, and clear errors."""

from __future__ import annotations

import pytest
import torch
from student_testing import TINY, images
from torch import nn

from rollout_fast.students import (
    STUDENT_ARCHS,
    check_student_grid,
    create_student,
    register_student,
    student_archs,
    student_input_size,
)


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


def test_head_and_backbone_parameters_partition_the_model():
    s = create_student("vit-tiny", strategy="lowres", factor=2, **TINY["vit-tiny"])
    head, body = s.head_parameters(), s.backbone_parameters()
    assert len(head) + len(body) == len(list(s.parameters())) and {id(p) for p in head}.isdisjoint(map(id, body))


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


def test_a_new_student_is_one_decorated_factory():
    """Registering a factory makes it an architecture of create_student (options checked, spec recorded)."""
    from rollout_fast.students.convnet import ConvMapNet
    from rollout_fast.students.registry import _REGISTRY

    @register_student("test-convnet", options={"width": 4}, strategies=("lowres",))
    def _tiny_convnet(ctx):
        w = ctx.options["width"]
        trunk = create_student("resnet-cifar", channels=[w] * 4, head_width=w).net.trunk
        return ConvMapNet(trunk, [w] * 4, ctx.grid, w)

    try:
        assert "test-convnet" in student_archs()
        s = create_student("test-convnet", strategy="lowres", factor=2, width=8)
        assert s(images()).shape == (2, 8, 8) and s.spec["options"] == {"width": 8}
        with pytest.raises(ValueError, match="options"):
            create_student("test-convnet", depth=2)
        with pytest.raises(ValueError, match="strategy"):
            create_student("test-convnet", strategy="downsize")
        with pytest.raises(ValueError, match="already registered"):
            register_student("test-convnet")(_tiny_convnet)
    finally:
        _REGISTRY.pop("test-convnet", None)
    assert STUDENT_ARCHS == student_archs() == ("resnet", "resnet-cifar", "vit-tiny")

