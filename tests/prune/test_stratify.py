"""Stratified top-k (rollout_fast.prune.stratify; prune_tokens(stratify=True); the 'stratify' key of a method
spec): the kept set equals a plain per-image implementation of the rule written here from its description, on
random scores with ties, odd and non-square grids, every k, batch 1 and more, each dtype, non-contiguous input;
the pruned model equals the hand-written forward on those tokens; bad input raises one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from prune_testing import MODELS, images_for, manual_forward

from rollout_fast.capture import token_layout
from rollout_fast.prune import keep_count, prune_tokens, stratified_scores
from rollout_fast.prune.stratify import stratified_windows
from rollout_fast.prune.study import parse_method


def plain_stratified(scores: list[float], gh: int, gw: int, k: int) -> set[int]:
    """The rule, one image, no tensors: windows of side ceil(sqrt(G / k)) tile the grid from the top left; each
    keeps its best k // (number of windows) patches (higher score first, then lower index); the remaining
    slots go to the best of the other patches in the same order."""
    G = gh * gw
    w = math.ceil(math.sqrt(G / k))
    windows: dict[tuple[int, int], list[int]] = {}
    for i in range(G):
        windows.setdefault(((i // gw) // w, (i % gw) // w), []).append(i)
    q = k // len(windows)

    def best_first(idx):
        return sorted(idx, key=lambda i: (-scores[i], i))

    kept = {i for members in windows.values() for i in best_first(members)[:q]}
    rest = [i for i in best_first(range(G)) if i not in kept]
    return kept | set(rest[:k - len(kept)])


def _kept(scores: torch.Tensor, grid, k) -> list[set[int]]:
    out = stratified_scores(scores, grid, k)
    return [set(row.topk(k).indices.tolist()) for row in out]


@pytest.mark.parametrize("grid", [(14, 14), (5, 7), (1, 9), (8, 8), (3, 3), (6, 1)])
@pytest.mark.parametrize("B", [1, 3])
def test_kept_set_equals_the_plain_rule_for_every_k(grid, B):
    gh, gw = grid
    G = gh * gw
    g = torch.Generator().manual_seed(G + B)
    for k in range(1, G + 1) if G <= 64 else (1, 3, 10, 20, 49, 50, 97, 98, 147, 195, 196):
        for scores in (torch.randn(B, G, generator=g),
                       torch.randint(0, 4, (B, G), generator=g).float()):  # many ties
            got = _kept(scores, grid, k)
            for b in range(B):
                assert got[b] == plain_stratified(scores[b].tolist(), gh, gw, k), (grid, k, b)


def test_every_window_is_covered_where_plain_top_k_would_crowd():
    # 4 x 4 grid, k = 4: windows of 2 x 2, one patch each, although the 4 best scores all lie in the top-left
    scores = torch.zeros(1, 16)
    scores[0, [0, 1, 4, 5]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    scores[0, [2, 8, 10]] = torch.tensor([1.0, 2.0, 3.0])
    assert set(scores[0].topk(4).indices.tolist()) == {0, 1, 4, 5}
    assert _kept(scores, (4, 4), 4) == [{0, 2, 8, 10}]
    # k = 6: one per window, then the best two of the rest (patches 1 and 4)
    assert _kept(scores, (4, 4), 6) == [{0, 2, 8, 10, 1, 4}]
    assert stratified_windows((4, 4), 6) == (2, 4, 1)
    assert stratified_windows((14, 14), 20) == (4, 16, 1) and stratified_windows((14, 14), 98) == (2, 49, 2)
    assert stratified_windows((5, 7), 3) == (4, 4, 0)  # more windows than k: plain top-k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_non_contiguous_scores(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(35, 4, generator=g).to(dtype)
    scores = base.t()  # (4, 35), not contiguous
    assert not scores.is_contiguous()
    out = stratified_scores(scores, (5, 7), 9)
    assert out.dtype == torch.float32 and out.shape == (4, 35)
    for b in range(4):  # the rule on the values as given (half-precision ties ranked by index)
        assert set(out[b].topk(9).indices.tolist()) == plain_stratified(scores[b].float().tolist(), 5, 7, 9)
    # G - rank (rank 0 = best), plus G for the 9 reserved: no ties, whatever the input's ties
    _, n, q = stratified_windows((5, 7), 9)
    for b in range(4):
        vals = out[b].tolist()
        assert len(set(vals)) == 35 and sum(v > 35 for v in vals) == n * q and min(vals) >= 1 and max(vals) <= 70


@pytest.mark.parametrize("name", ["vit", "registers", "non-square", "dynamic", "no-class-token"])
def test_pruned_forward_equals_hand_written_forward_on_the_stratified_tokens(name):
    model = MODELS[name]()
    x = images_for(name)
    grid = token_layout(model, tuple(x.shape[-2:])).grid
    G = grid[0] * grid[1]
    scores = torch.randn(x.shape[0], G, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for ratio in (0.5, 0.25, 0.1):
            k = keep_count(ratio, G)
            pruned = prune_tokens(model, ratio, lambda im: scores, stratify=True)
            out = pruned(x)
            want = manual_forward(model, x, stratified_scores(scores, grid, k), k)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
            kept = [set(r.tolist()) for r in pruned.last_indices]
            assert kept == [plain_stratified(s.tolist(), *grid, k) for s in scores]
            assert kept != [set(s.topk(k).indices.tolist()) for s in scores], "same as plain top-k: proves nothing"
        assert torch.equal(prune_tokens(model, 1.0, lambda im: scores, stratify=True)(x), model(x))
    assert "stratify=True" in repr(prune_tokens(model, 0.5, lambda im: scores, stratify=True).pruner)


def test_method_spec_key_and_errors():
    spec = parse_method("random:keep=0.25:stratify=true,false")
    assert [p.label for p in spec.points] == ["keep=0.25 stratify=true", "keep=0.25 stratify=false"]
    assert [p.scorer for p in spec.points] == [{"keep_ratio": 0.25, "stratify": True},
                                               {"keep_ratio": 0.25, "stratify": False}]
    with pytest.raises(ValueError, match=r"^random:stratify=1: stratify: expected true or false, got 1$"):
        parse_method("random:stratify=1")


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 12), (3, 4), 0), "k: expected 1 .. 12 patches, got 0"),
    ((torch.zeros(2, 12), (3, 4), 13), "k: expected 1 .. 12 patches, got 13"),
    ((torch.zeros(2, 11), (3, 4), 2), "scores: expected (B, 12) for a 3x4 grid, got (2, 11)"),
    ((torch.zeros(12), (3, 4), 2), "scores: expected (B, 12) for a 3x4 grid, got (12,)"),
    ((torch.zeros(2, 12), (0, 4), 2), "grid: expected two sides >= 1, got (0, 4)"),
])
def test_bad_input_is_refused_in_one_line(args, message):
    with pytest.raises(ValueError) as e:
        stratified_scores(*args)
    assert str(e.value) == message


@pytest.mark.parametrize("keep, blocks", [(0.5, ()), (0.25, ()), ([0.375, 0.125], [1])])
def test_smerge_stratified_equals_smerge_on_the_stratified_scores(keep, blocks):
    from rollout_fast.prune.inner import prune_and_reduce

    model = MODELS["vit"]()
    x = images_for("vit")
    grid = token_layout(model, tuple(x.shape[-2:])).grid
    G = grid[0] * grid[1]
    scores = torch.randn(x.shape[0], G, generator=torch.Generator().manual_seed(7))
    k = keep_count(keep[0] if isinstance(keep, list) else keep, G)
    settings = {"keep_ratio": keep, "blocks": blocks}
    with torch.no_grad():
        got = prune_and_reduce(model, 1.0, lambda im: None, "smerge", {**settings, "stratify": True})(x, scores=scores)
        want = prune_and_reduce(model, 1.0, lambda im: None, "smerge", settings)(
            x, scores=stratified_scores(scores, grid, k))
        plain = prune_and_reduce(model, 1.0, lambda im: None, "smerge", settings)(x, scores=scores)
        unpruned = prune_and_reduce(model, 1.0, lambda im: None, "smerge", {"keep_ratio": 1.0, "stratify": True})(
            x, scores=scores)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, plain, atol=1e-4), "same as plain top-k: the test proves nothing"
    assert torch.equal(unpruned, model(x))


def test_smerge_stratify_setting_and_errors():
    from rollout_fast.prune.inner import prune_and_reduce

    spec = parse_method("student+smerge:keep=0.25:stratify=true")
    assert [(p.label, p.scorer, p.reducer) for p in spec.points] == [
        ("keep=0.25 stratify=true", {}, {"keep_ratio": 0.25, "stratify": True})]
    with pytest.raises(ValueError, match=r"^stratify: expected true or false, got 'yes'$"):
        prune_and_reduce(MODELS["vit"](), 1.0, lambda im: None, "smerge", {"keep_ratio": 0.5, "stratify": "yes"})
