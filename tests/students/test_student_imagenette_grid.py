"""The students of the Imagenette teacher's runs (issue 13): 112 px input, 14 x 14 grid, thumbnails of 28 px
(factor 4) and 56 px (factor 2): output shapes, what the backbone sees, and exact multiply-adds against the
imagenette-vit layout's forward (the 10% budget of python/train_students.py's IMAGENETTE_RUNS)."""

from __future__ import annotations

import pytest
import torch

from rollout_fast.models import create_model
from rollout_fast.students import count_macs, create_student
from rollout_fast.teacher import IMAGENETTE_ARCH

TEACHER_MACS = 593553792  # imagenette-vit's forward per 112 px image (conv stem + 6 blocks of width 192)


def test_teacher_layout_macs():
    teacher = create_model(dict(IMAGENETTE_ARCH)).eval()
    assert count_macs(teacher, torch.zeros(1, 3, 112, 112)) == TEACHER_MACS


@pytest.mark.parametrize("arch, factor, options, thumb, macs, block", [
    ("resnet-cifar", 4, {}, (28, 28), 34066816, None),
    ("resnet-cifar", 2, {"channels": [16, 32, 64, 128]}, (56, 56), 52546816, None),
    ("resnet-cifar", 2, {}, (56, 56), 114940672, None),
    ("vit-tiny", 4, {"depth": 2}, (28, 28), 44726016, (2, 2)),
    ("vit-tiny", 2, {"depth": 2, "patch_size": 8}, (56, 56), 46080768, (2, 2)),
])
def test_students_on_the_14x14_grid(arch, factor, options, thumb, macs, block):
    s = create_student(arch, strategy="lowres", factor=factor, input_size=(112, 112), grid=(14, 14), **options).eval()
    assert s.thumbnail_size == thumb and s.spec["grid"] == [14, 14]
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = s(x)
    assert out.shape == (2, 14, 14) and torch.isfinite(out).all()
    assert count_macs(s, x[:1]) == macs
    assert (macs <= 0.10 * TEACHER_MACS) == (options != {} or factor == 4)  # only the reference row is over budget
    if block is not None:  # each of the 7 x 7 student tokens predicts a 2 x 2 block of teacher patches
        assert s.net.student_grid == (7, 7) and s.net.block == block


def test_thumbnail_not_divisible_by_the_vit_patch_is_refused():
    with pytest.raises(ValueError, match=r"^patch_size: the student's input \(28, 28\) is not divisible by 8$"):
        create_student("vit-tiny", strategy="lowres", factor=4, input_size=(112, 112), grid=(14, 14), patch_size=8)
