"""Saliency / token-selection metrics: hand-computed cases, batching, baselines, the shift used by the
object-placement test, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from rollout_fast.metrics import (MapMetrics, cc, centre_prior, fit_centre_prior, kld, map_metrics, mean_map,
                                  shift_images, sim, spearman, topk_recall, uniform_map)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kld_hand_computed():
    # Q one-hot, P uniform over 4: KLD = log(eps + 1 / (eps + 1/4)) ~= log 4
    got = kld(t([1, 1, 1, 1]), t([1, 0, 0, 0]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(math.log(4.0), abs=1e-5)
    # identical maps (any scale): ~0; swapping the roles is not symmetric
    assert kld(t([1, 2, 3, 4]), t([2, 4, 6, 8])).abs().item() < 1e-5
    p, q = t([0.7, 0.3]), t([0.5, 0.5])
    want = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert kld(p, q).item() == pytest.approx(want, abs=1e-5)


def test_cc_sim_hand_computed():
    assert cc(t([1, 2, 3, 4]), t([2, 4, 6, 8])).item() == pytest.approx(1.0, abs=1e-6)
    assert cc(t([1, 2, 3, 4]), t([4, 3, 2, 1])).item() == pytest.approx(-1.0, abs=1e-6)
    assert cc(t([1, 0, 0, 0]), t([0, 1, 0, 0])).item() == pytest.approx(-1 / 3, abs=1e-6)
    assert cc(t([1, 1, 1, 1]), t([0, 1, 0, 0])).item() == 0.0  # constant map: defined as 0
    assert sim(t([1, 1, 0, 0]), t([1, 1, 1, 1])).item() == pytest.approx(0.5, abs=1e-6)
    assert sim(t([3, 1]), t([6, 2])).item() == pytest.approx(1.0, abs=1e-6)


def test_topk_recall_and_spearman_hand_computed():
    pred, target = t([4, 3, 2, 1]), t([4, 1, 3, 2])
    assert topk_recall(pred, target, 0.25).item() == 1.0            # k=1: {0} vs {0}
    assert topk_recall(pred, target, 0.5).item() == 0.5             # k=2: {0,1} vs {0,2}
    assert topk_recall(pred, target, 0.75).item() == pytest.approx(2 / 3)  # {0,1,2} vs {0,2,3}
    assert spearman(t([1, 2, 3, 4]), t([10, 20, 40, 30])).item() == pytest.approx(0.8, abs=1e-6)
    # ties share their average rank: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4)
    assert spearman(t([1, 1, 2, 3]), t([1, 2, 3, 4])).item() == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-6)
    assert spearman(t([1, 1, 1, 1]), t([1, 2, 3, 4])).item() == 0.0
    # rank metrics accept logits (negative values)
    assert spearman(t([-3, -1, 2, 5]), t([0, 1, 2, 3])).item() == pytest.approx(1.0)


def test_batched_equals_per_image_and_accepts_grids():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(5, 4, 4, generator=g), torch.rand(5, 4, 4, generator=g)
    batched = map_metrics(pred, target)
    assert set(batched) == {"kld", "cc", "sim", "recall@0.25", "recall@0.5", "recall@0.75", "spearman"}
    for name, v in batched.items():
        assert v.shape == (5,) and v.dtype == torch.float32
        for b in range(5):
            single = map_metrics(pred[b:b + 1].flatten(1), target[b:b + 1].flatten(1))[name]
            assert v[b].item() == pytest.approx(single.item(), abs=1e-6), name
    m = MapMetrics()
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    got = m.compute()
    assert got["images"] == 5
    assert got["cc"] == pytest.approx(batched["cc"].mean().item(), abs=1e-6)


def test_perfect_prediction_scores_best():
    target = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    m = map_metrics(target * 2.0, target)
    assert torch.allclose(m["cc"], torch.ones(3)) and torch.allclose(m["spearman"], torch.ones(3))
    assert torch.allclose(m["sim"], torch.ones(3)) and (m["kld"].abs() < 1e-5).all()
    for r in ("0.25", "0.5", "0.75"):
        assert (m[f"recall@{r}"] == 1).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="pred and target"):
        cc(torch.rand(2, 4), torch.rand(2, 5))
    with pytest.raises(TypeError, match="pred"):
        cc(torch.ones(2, 4, dtype=torch.long), torch.rand(2, 4))
    with pytest.raises(TypeError, match="target"):
        cc(torch.rand(2, 4), [[1.0] * 4] * 2)
    with pytest.raises(ValueError, match="pred"):
        kld(-torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="keep_ratio"):
        topk_recall(torch.rand(2, 4), torch.rand(2, 4), 0.0)
    with pytest.raises(ValueError, match="pred"):
        cc(torch.rand(4), torch.rand(4))
    with pytest.raises(ValueError, match="no batch"):
        MapMetrics().compute()


def test_baselines():
    prior = centre_prior((4, 6), 1.0)
    assert prior.shape == (4, 6) and prior.max().item() == pytest.approx(math.exp(-0.25))  # 4 central cells
    assert torch.equal(prior, prior.flip(0)) and torch.equal(prior, prior.flip(1))
    assert torch.equal(uniform_map((2, 3)), torch.ones(2, 3))
    maps = centre_prior((8, 8), 1.5).expand(20, 8, 8) + 0.01 * torch.rand(20, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, fitted = fit_centre_prior(maps)
    assert 1.2 < sigma < 1.9 and fitted.shape == (8, 8)
    assert torch.allclose(mean_map(torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="sigma"):
        centre_prior((4, 4), 0)
    with pytest.raises(ValueError, match="grid"):
        uniform_map((4,))
    with pytest.raises(ValueError, match="maps"):
        fit_centre_prior(torch.rand(8, 8))


def test_shift_images_moves_content_and_fills():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    right = shift_images(x, 1, 0, fill=-1.0)
    assert right[0, 0].tolist() == [[-1, 0, 1], [-1, 3, 4], [-1, 6, 7]]
    up = shift_images(x, 0, -1, fill=-1.0)
    assert up[0, 0].tolist() == [[3, 4, 5], [6, 7, 8], [-1, -1, -1]]
    flipped = shift_images(x, 0, 0, flip=True)
    assert torch.equal(flipped, x.flip(-1))
    both = shift_images(torch.cat([x, x]), torch.tensor([1, 0]), torch.tensor([0, 0]), fill=-1.0)
    assert torch.equal(both[0], right[0]) and torch.equal(both[1], x[0])
    with pytest.raises(TypeError, match="dx"):
        shift_images(x, 0.5, 0)
    with pytest.raises(ValueError, match="dy"):
        shift_images(x, 0, torch.tensor([1, 2]))
