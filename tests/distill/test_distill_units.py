"""Distillation's building blocks: the losses and the deterministic augmentation views."""

from __future__ import annotations

import math

import pytest
import torch

from rollout_fast.distill import distill_loss, view_params


def test_losses():
    logits = torch.zeros(2, 2, 2)
    onehot = torch.zeros(2, 2, 2)
    onehot[:, 0, 0] = 3.0  # any scale: normalised to sum 1
    assert distill_loss(logits, onehot, "kld").item() == pytest.approx(math.log(4), abs=1e-6)
    target = torch.rand(2, 2, 2)
    assert distill_loss(torch.log(target), target, "kld").item() == pytest.approx(0.0, abs=1e-6)
    t_max = target / target.amax(dim=(1, 2), keepdim=True)
    z = torch.randn(2, 2, 2)
    assert distill_loss(z, target, "bce").item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(z, t_max).item(), abs=1e-6)
    assert distill_loss(z, target, "mse").item() == pytest.approx(((z.sigmoid() - t_max) ** 2).mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="grid"):
        distill_loss(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="loss"):
        distill_loss(logits, onehot, "l1")


def test_views_are_deterministic_and_view0_is_identity():
    dx, dy, fl = view_params(0, 0, 5, 4, True)
    assert not dx.any() and not dy.any() and not fl.any()
    a, b = view_params(3, 2, 100, 4, True), view_params(3, 2, 100, 4, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].abs().max() <= 4 and a[0].abs().max() > 0 and a[2].any()
    assert not torch.equal(a[0], view_params(3, 1, 100, 4, True)[0])


def test_distill_checks_out_and_cache_dir_before_any_compute(tiny_cifar, tiny_teacher, tmp_path, monkeypatch):
    from rollout_fast.distill import DistillConfig, api, distill

    def fail(*a, **k):
        raise AssertionError("the teacher was loaded before the output folders were checked")

    monkeypatch.setattr(api, "TeacherTargets", fail)
    taken = tmp_path / "taken"
    taken.write_text("x")
    cfg = DistillConfig(teacher=tiny_teacher)
    with pytest.raises(NotADirectoryError, match="out: .*taken' is a file"):
        distill(tiny_cifar, taken, cfg, device="cpu", progress=False)
    with pytest.raises(NotADirectoryError, match="cache_dir: cannot create folder"):
        distill(tiny_cifar, tmp_path / "o", cfg, device="cpu", cache_dir=taken / "cache", progress=False)
    assert not (tmp_path / "o").exists()
