"""EViT off the shelf (rollout_fast.prune.evit): class-token attention, keep + fuse against a plain
implementation, the whole forward against a hand-written one, exact keep 1.0, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from prune_testing import MODELS, images_for, tiny_vit

from rollout_fast.capture import UnsupportedModelError
from rollout_fast.prune import reduce_tokens
from rollout_fast.prune.evit import cls_attention, evit_keep_count, evit_reduce


def plain_evit(x, cls_attn, keep, P=1, fuse=True):
    """EViT's keep + fuse, one image at a time: the top-`keep` non-prefix tokens by class attention
    (descending), then sum over the others of attention * token."""
    out = []
    for b in range(x.shape[0]):
        cand = list(range(P, x.shape[1]))
        ranked = sorted(cand, key=lambda i: -cls_attn[b, i].item())
        rows = [x[b, i] for i in range(P)] + [x[b, i] for i in ranked[:keep]]
        if fuse:
            rows.append(sum(cls_attn[b, i] * x[b, i] for i in ranked[keep:]))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("fuse", [True, False])
def test_keep_and_fuse_equal_plain(P, fuse):
    g = torch.Generator().manual_seed(P)
    x = torch.randn(3, 17, 8, generator=g, dtype=torch.float64)
    attn = torch.rand(3, 17, generator=g, dtype=torch.float64).softmax(-1)
    for keep in range(1, 17 - P):
        got = evit_reduce(x, attn, keep, P, fuse)
        torch.testing.assert_close(got, plain_evit(x, attn, keep, P, fuse), rtol=0, atol=1e-12)
    assert evit_reduce(x, attn, 17 - P, P, fuse) is x


def test_cls_attention_is_row_zero_of_the_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    full = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(cls_attention(q, k, 0.5), full[:, :, 0].mean(1), rtol=0, atol=1e-7)
    bias = torch.randn(2, 1, 1, 9, generator=g)
    masked = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1)
    torch.testing.assert_close(cls_attention(q, k, 0.5, bias), masked[:, :, 0].mean(1), rtol=0, atol=1e-7)
    allowed = torch.ones(9, dtype=torch.bool)
    allowed[3] = False
    got = cls_attention(q, k, 0.5, allowed)
    assert torch.all(got[:, 3] == 0) and torch.allclose(got.sum(-1), torch.ones(2))


def plain_evit_forward(model, images, keep_ratio, blocks, fuse=True):
    """The EViT forward written out: explicit attention, keep + fuse at the chosen blocks' outputs."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
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
            keep = math.ceil(keep_ratio * (N - P) - 1e-9)
            if keep < N - P:
                x = plain_evit(x, probs[:, :, 0].mean(1), keep, P, fuse)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["vit", "deit-distilled", "registers", "qknorm-layerscale"])
@pytest.mark.parametrize("fuse", [True, False])
def test_evit_forward_equals_plain(name, fuse):
    model, x = MODELS[name](), images_for(name, B=2)
    with torch.no_grad():
        red = reduce_tokens(model, "evit", keep_ratio=0.5, blocks=[0, 1], fuse=fuse)
        torch.testing.assert_close(red(x), plain_evit_forward(model, x, 0.5, [0, 1], fuse), rtol=1e-5, atol=1e-5)
    P = model.num_prefix_tokens
    n0 = 64 + P
    n1 = P + 32 + fuse
    assert red.tokens_per_block((32, 32)) == [n0, n1, P + math.ceil((n1 - P) / 2) + fuse]


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"no-class-token"}))
def test_keep_one_is_exact(name):
    model, x = MODELS[name](), images_for(name)
    with torch.no_grad():
        assert torch.equal(reduce_tokens(model, "evit", keep_ratio=1.0, blocks=[0, 1])(x), model(x))


def test_defaults_and_counts():
    red = reduce_tokens(tiny_vit(depth=12), "evit")
    assert red.method.keep == {3: 0.7, 6: 0.7, 9: 0.7}
    assert evit_keep_count(0.7, 10) == 7 and evit_keep_count(0.7, 64) == 45 and evit_keep_count(0.01, 5) == 1
    red = reduce_tokens(tiny_vit(depth=4), "evit", keep_ratio=[0.5, 0.25], blocks=[1, 2])
    assert red.tokens_per_block((32, 32)) == [65, 65, 34, 11, 11]  # 33 candidates: ceil(8.25) = 9 kept + 1 fused


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.1, float("nan"), True, "0.5"])
def test_keep_outside_range_raises_at_build(keep):
    with pytest.raises(ValueError, match=r"keep_ratio: expected a number in \(0, 1\]"):
        reduce_tokens(tiny_vit(), "evit", keep_ratio=keep)


@pytest.mark.parametrize("blocks", [[2], [-1], [1, 0], [0, 0], ["a"], [0.5]])
def test_bad_blocks_raise(blocks):
    with pytest.raises(ValueError, match=r"blocks: expected increasing block indices in \[0, 2\)"):
        reduce_tokens(tiny_vit(), "evit", blocks=blocks)


def test_keep_list_length_and_class_token():
    with pytest.raises(ValueError, match="keep_ratio: 2 ratios for 1 blocks"):
        reduce_tokens(tiny_vit(), "evit", keep_ratio=[0.5, 0.5], blocks=[0])
    with pytest.raises(UnsupportedModelError, match="no class token"):
        reduce_tokens(MODELS["no-class-token"](), "evit", keep_ratio=0.5)
