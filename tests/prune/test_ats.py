"""ATS, training-free (rollout_fast.prune.ats): significance, CDF, sampled indices and duplicate removal against
a plain implementation written here (and hand-computed cases), the whole forward (padding + masking in a batch)
against a hand-written one image at a time, the no-reduction setting, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from prune_testing import MODELS, images_for, tiny_vit

from rollout_fast.capture import UnsupportedModelError
from rollout_fast.prune import reduce_tokens
from rollout_fast.prune.ats import ats_gather, ats_quantiles, ats_sample, ats_significance


def plain_significance(probs, v, P=1):
    """Eq. 3 of the paper for one image, with loops: probs (H, N, N) attention, v (H, N, Dh) values.
    a_j = the class token's attention to j summed over heads; ||v_j|| over all heads; normalised over j >= P."""
    H, N, _ = probs.shape
    raw = []
    for j in range(P, N):
        a = sum(float(probs[h, 0, j]) for h in range(H))
        norm = math.sqrt(sum(float(v[h, j, d]) ** 2 for h in range(H) for d in range(v.shape[-1])))
        raw.append(a * norm)
    total = sum(raw)
    return [r / total for r in raw]


def plain_sample(scores, K):
    """ATS's deterministic inverse transform sampling for one image, written out: sort ascending (stable), CDF,
    min-max normalised; K evenly spaced quantiles from the smallest non-zero normalised value y0 to 1 (K = 1: 1);
    each quantile picks the nearest CDF point (the first on a tie); duplicates removed. Returns sorted indices."""
    n = len(scores)
    order = sorted(range(n), key=lambda j: scores[j])
    cdf, run = [], 0.0
    for j in order:
        run += scores[j]
        cdf.append(run)
    if n == 1:
        return [0]
    ncdf = [(c - cdf[0]) / (cdf[-1] - cdf[0]) for c in cdf]
    y0 = min(c for c in ncdf if c > 0)
    ys = [1.0] if K == 1 else [y0 + i * (1 - y0) / (K - 1) for i in range(K)]
    picks = [min(range(n), key=lambda p: (abs(y - ncdf[p]), p)) for y in ys]
    return sorted({order[p] for p in picks})


def _kept(indices, keep, b):
    return indices[b][keep[b]].tolist()


def test_hand_computed_samples():
    # scores 0.1 0.4 0.2 0.3 -> sorted t0 t2 t3 t1, CDF .1 .3 .6 1, normalised 0 2/9 5/9 1, y0 = 2/9
    s = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert ats_sample(s, 3)[0].tolist() == [[1, 2, 3]]  # y = 2/9, 11/18, 1 -> t2, t3, t1; t0 dropped
    assert ats_sample(s, 2)[0].tolist() == [[1, 2]]     # y = 2/9, 1 -> t2, t1
    assert ats_sample(s, 1)[0].tolist() == [[1]]        # K = 1: the quantile 1, the most significant token
    # concentrated: 0.7 0.1 0.1 0.1 -> sorted t1 t2 t3 t0 (stable), normalised 0 1/9 2/9 1, y0 = 1/9;
    # K = 4: y = 1/9, 11/27, 19/27, 1 -> t2, t3, t0, t0: a duplicate, 3 tokens kept of K = 4
    # (the least significant token is never sampled: the quantiles start at y0 > 0)
    s = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    indices, keep = ats_sample(s, 4)
    assert _kept(indices, keep, 0) == [0, 2, 3]
    assert _kept(indices, keep, 1) == [1, 2, 3]  # y = 2/9, 13/27, 20/27, 1 -> t2, t3, t3, t1
    assert _kept(indices, keep, 2) == [1, 2, 3]  # uniform: normalised 0 1/3 2/3 1, y = 1/3 5/9 7/9 1 -> t1 t2 t3 t3
    assert keep.tolist() == [[True, True, True]] * 3
    assert ats_quantiles(torch.tensor([[0.25]]), 4).tolist() == [[0.25, 0.5, 0.75, 1.0]]


def test_significance_equals_plain():
    g = torch.Generator().manual_seed(0)
    B, H, N, Dh, P = 2, 3, 9, 4, 2
    probs = torch.rand(B, H, N, N, generator=g, dtype=torch.float64).softmax(-1)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64)
    got = ats_significance(probs[:, :, 0].mean(1), v, P)
    assert got.dtype == torch.float32 and got.shape == (B, N - P)
    for b in range(B):
        torch.testing.assert_close(got[b], torch.tensor(plain_significance(probs[b], v[b], P), dtype=torch.float32))
    valid = torch.ones(B, N - P, dtype=torch.bool)
    valid[0, 3] = False
    masked = ats_significance(probs[:, :, 0].mean(1), v, P, valid)
    assert masked[0, 3] == 0 and torch.allclose(masked.sum(1), torch.ones(B))


@pytest.mark.parametrize("K", [1, 2, 5, 12, 20])
def test_sample_equals_plain_with_padding(K):
    """Each image sampled over its own valid candidates only: the same as the plain sampler on those alone."""
    g = torch.Generator().manual_seed(K)
    B, n = 6, 12
    s = torch.rand(B, n, generator=g) ** 3  # skewed: duplicates at large K
    valid = torch.rand(B, n, generator=g) > 0.3
    valid[:, 0] = True
    valid[1] = True
    indices, keep = ats_sample(s, K, valid)
    counts = []
    for b in range(B):
        cand = [j for j in range(n) if valid[b, j]]
        want = [cand[i] for i in plain_sample([float(s[b, j]) for j in cand], K)]
        assert _kept(indices, keep, b) == want, b
        counts.append(len(want))
    assert keep.shape[1] == max(counts) and keep.sum(1).tolist() == counts
    if K >= 5:
        assert len(set(counts)) > 1  # the kept count adapts per image


def test_sample_single_candidate_and_errors():
    indices, keep = ats_sample(torch.tensor([[0.3, 0.5]]), 4, torch.tensor([[False, True]]))
    assert _kept(indices, keep, 0) == [1]
    with pytest.raises(ValueError, match=r"^num_samples: expected an int >= 1, got 0$"):
        ats_sample(torch.rand(1, 3), 0)
    with pytest.raises(ValueError, match=r"^valid: an image has no valid candidate token$"):
        ats_sample(torch.rand(1, 3), 2, torch.zeros(1, 3, dtype=torch.bool))


def test_gather_pads_with_zeros():
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    out = ats_gather(x, torch.tensor([[0, 3], [2, 0]]), torch.tensor([[True, True], [True, False]]), 1)
    assert torch.equal(out[0], x[0, [0, 1, 4]]) and torch.equal(out[1, :2], x[1, [0, 3]])
    assert torch.equal(out[1, 2], torch.zeros(2))


def plain_ats_forward(model, image, keep_ratio, blocks):
    """ATS written out for ONE image (no padding): explicit attention, and at each stage block's output the
    plain significance and sampling with K = ceil(keep * most tokens the stage can receive)."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
    bound, counts = x.shape[1] - P, []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        probs = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1)
        x = x + blk.ls1(a.proj(a.norm((probs @ v).transpose(1, 2).reshape(B, N, C))))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if i in blocks:
            bound = max(1, math.ceil(keep_ratio * bound - 1e-9))
            kept = plain_sample(plain_significance(probs[0], v[0], P), bound)
            x = torch.cat([x[:, :P], x[:, [P + j for j in kept]]], dim=1)
            counts.append(len(kept))
    return model.forward_head(model.norm(x)), counts


@pytest.mark.parametrize("name", ["vit", "deit-distilled", "registers", "qknorm-layerscale"])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_forward_in_a_batch_equals_plain_one_image_at_a_time(name, keep):
    """Padding + the -inf key mask: each image's logits in a batch equal its own unpadded computation."""
    model, x = MODELS[name](), images_for(name, B=4)
    red = reduce_tokens(model, "ats", keep_ratio=keep, blocks=[0, 1])
    with torch.no_grad():
        got = red(x)
        plain = [plain_ats_forward(model, x[b], keep, [0, 1]) for b in range(4)]
    torch.testing.assert_close(got, torch.cat([p[0] for p in plain]), rtol=1e-4, atol=1e-5)
    if keep == 1.0 and name == "vit":
        assert len({tuple(p[1]) for p in plain}) > 1  # counts differ: the batch really was padded
    P = model.num_prefix_tokens
    seen = red.method.observed_tokens()
    assert seen[0] == 64 + P and seen[1] == pytest.approx(P + sum(p[1][0] for p in plain) / 4)


def test_plan_counts_and_defaults():
    red = reduce_tokens(tiny_vit(depth=12), "ats")
    assert red.method.keep == {3: 0.7, 6: 0.7, 9: 0.7}
    red = reduce_tokens(tiny_vit(depth=4), "ats", keep_ratio=[0.5, 0.25], blocks=[1, 2])
    assert red.tokens_per_block((32, 32)) == [65, 65, 33, 9, 9]  # K = 32, then ceil(0.25 * 32) = 8
    assert reduce_tokens(tiny_vit(), "ats", keep_ratio=1.0).tokens_per_block((32, 32)) == [65, 65, 65]


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"no-class-token"}))
def test_no_stage_is_exact(name):
    model, x = MODELS[name](), images_for(name)
    with torch.no_grad():
        assert torch.equal(reduce_tokens(model, "ats", blocks=[])(x), model(x))


@pytest.mark.parametrize("keep, shown", [(0, "0"), (1.5, "1.5"), (-0.1, "-0.1"), (True, "True"), ("0.5", "'0.5'"),
                                         ([0.5, 0.0], "0.0")])
def test_keep_outside_range_raises_at_build(keep, shown):
    with pytest.raises(ValueError) as e:
        reduce_tokens(tiny_vit(), "ats", keep_ratio=keep, blocks=[0, 1])
    assert str(e.value) == f"keep_ratio: expected a number in (0, 1], got {shown}"


@pytest.mark.parametrize("blocks", [[2], [-1], [1, 0], [0, 0], [0.5]])
def test_block_out_of_range_raises(blocks):
    with pytest.raises(ValueError) as e:
        reduce_tokens(tiny_vit(), "ats", blocks=blocks)
    assert str(e.value) == f"blocks: expected increasing block indices in [0, 2), got {blocks!r}"


def test_models_ats_refuses():
    with pytest.raises(ValueError) as e:
        reduce_tokens(tiny_vit(), "ats", keep_ratio=[0.5, 0.5], blocks=[0])
    assert str(e.value) == "keep_ratio: 2 ratios for 1 blocks [0]"
    with pytest.raises(UnsupportedModelError) as e:
        reduce_tokens(MODELS["no-class-token"](), "ats")
    assert str(e.value) == ("model: ATS samples tokens by the class token's attention, and this model has no "
                            "class token")
    with pytest.raises(UnsupportedModelError) as e:
        reduce_tokens(tiny_vit(global_pool="avg"), "ats")
    assert str(e.value) == ("model: ATS pads each image's kept tokens to the batch's largest count and needs the "
                            "class-token readout (global_pool='token'), not 'avg'")
