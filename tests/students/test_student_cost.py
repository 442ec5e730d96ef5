"""Cost counting of students (multiply-adds, parameters, latency)."""

from __future__ import annotations

import torch
from student_testing import TINY, images
from torch import nn

from rollout_fast.students import count_macs, create_student, measure_cost


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
