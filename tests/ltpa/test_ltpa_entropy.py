"""rollout_fast.ltpa_study.level_entropy: how spread each Learn to Pay Attention level is (normalised entropy, mass in
the top 5% of the locations), against hand computations and a plain per-image loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ltpa_testing import tiny_ltpa

from rollout_fast.ltpa_study import level_entropy


def test_hand_computed_values():
    level1 = torch.tensor([[[0.5, 0.5], [0.0, 0.0]],      # half on each of 2 of 4 cells
                           [[1.0, 0.0], [0.0, 0.0]]])     # all on one cell
    level2 = torch.tensor([[[1.0, 1.0, 2.0]], [[3.0, 3.0, 3.0]]])  # sigmoid-like: divided by the sum
    level3 = torch.full((2, 1, 5, 5), 0.7)                           # uniform, (B, 1, h, w) accepted
    ent, top = level_entropy([level1, level2, level3])
    assert ent.dtype == torch.float64 and ent.shape == (2, 3) and top.shape == (2, 3)
    # H / log n: ln 2 / ln 4 = 1/2; 0; (2 * 1/4 ln 4 + 1/2 ln 2) / ln 3 = 1.5 ln 2 / ln 3; 1; 1; 1
    want_ent = [[0.5, 1.5 * math.log(2) / math.log(3), 1.0], [0.0, 1.0, 1.0]]
    torch.testing.assert_close(ent, torch.tensor(want_ent, dtype=torch.float64), rtol=0, atol=1e-15)
    # k = ceil(0.05 n): 1 of 4, 1 of 3, 2 of 25 locations
    want_top = [[0.5, 0.5, 2 / 25], [1.0, 1 / 3, 2 / 25]]
    torch.testing.assert_close(top, torch.tensor(want_top, dtype=torch.float64), rtol=0, atol=1e-15)
    _, top_half = level_entropy([level1, level2, level3], top=0.5)  # k = 2 of 4, 2 of 3, 13 of 25
    torch.testing.assert_close(top_half, torch.tensor([[1.0, 0.75, 13 / 25], [1.0, 2 / 3, 13 / 25]],
                                                      dtype=torch.float64), rtol=0, atol=1e-15)


def test_k_is_not_rounded_up_by_floating_point():
    _, top = level_entropy([torch.ones(1, 6, 10)])  # 0.05 * 60 = 3.0000000000000004 in floats: k = 3, not 4
    assert float(top) == pytest.approx(3 / 60, abs=1e-15)


@pytest.mark.parametrize("variant", ["pc-softmax-after", "dp-sigmoid-before"])
def test_model_maps_against_a_plain_loop(variant):
    model = tiny_ltpa(variant)
    with torch.no_grad():
        _, maps = model(torch.randn(2, 3, 32, 32))
    ent, top = level_entropy(maps)
    for b in range(2):
        for i, m in enumerate(maps):
            p = m[b].double().numpy().ravel()
            p = p / p.sum()
            h = -sum(v * math.log(v) for v in p if v > 0) / math.log(len(p))
            k = math.ceil(0.05 * len(p) - 1e-9)
            assert float(ent[b, i]) == pytest.approx(h, rel=1e-12)
            assert float(top[b, i]) == pytest.approx(float(np.sort(p)[::-1][:k].sum()), rel=1e-12)


@pytest.mark.parametrize("maps, top, message", [
    ([torch.tensor([[[0.5, -0.1]]])], 0.05, "maps[0] has negative values; attention maps are non-negative"),
    ([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)], 0.05, "maps[1] has an image whose map is all zeros"),
    ([torch.ones(1, 2, 2)], 0.0, "top must be a fraction in (0, 1], got 0.0"),
    ([torch.ones(1, 2, 2)], 1.5, "top must be a fraction in (0, 1], got 1.5"),
    (torch.ones(1, 2, 2), 0.05, ("maps must be a non-empty list/tuple of (B, h, w) or (B, 1, h, w) tensors "
                                "(AttnVGG's second output; the baseline has none)")),
])
def test_errors(maps, top, message):
    with pytest.raises(ValueError) as e:
        level_entropy(maps, top)
    assert str(e.value) == message
