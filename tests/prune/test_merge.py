"""ToMe (rollout_fast.prune.merge) and the in-network API (rollout_fast.prune.inner): the merge against the
paper's algorithm written plainly, proportional attention against a hand-written forward, exact no-reduction
output, the registry and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from prune_testing import MODELS, images_for, tiny_vit

from rollout_fast.capture import UnsupportedModelError
from rollout_fast.prune import METHODS, ReducedViT, TokenReducer, reduce_tokens, register_method
from rollout_fast.prune.merge import bipartite_soft_matching, max_merge, merge_wavg


def plain_tome_merge(x, metric, r, P, size=None):
    """ToMe's merge, one image at a time, with loops: A = even positions, B = odd; each unprotected A token's
    edge is its most cosine-similar unprotected B token; the r strongest edges merge (size-weighted) into
    their B token. Output: prefix tokens in order, unmerged A tokens ascending, B tokens."""
    B, N, _ = x.shape
    size = torch.ones(B, N, 1, dtype=x.dtype) if size is None else size
    xs, ss = [], []
    for b in range(B):
        A = [i for i in range(0, N, 2)]
        Bs = [j for j in range(1, N, 2)]
        edges = []
        for i in A:
            if i < P:
                continue
            sims = [(torch.nn.functional.cosine_similarity(metric[b, i], metric[b, j], dim=0).item(), j)
                    for j in Bs if j >= P]
            best = max(sims)
            edges.append((best[0], i, best[1]))
        edges.sort(key=lambda e: -e[0])
        merged = {i: j for _, i, j in edges[:r]}
        tot = {j: (x[b, j] * size[b, j], size[b, j].clone()) for j in Bs}
        for i, j in merged.items():
            tot[j] = (tot[j][0] + x[b, i] * size[b, i], tot[j][1] + size[b, i])
        unm = [i for i in A if i not in merged]
        order = [("a", i) if i % 2 == 0 else ("b", i) for i in range(P)]
        order += [("a", i) for i in unm if i >= P] + [("b", j) for j in Bs if j >= P]
        rows, sizes = [], []
        for kind, i in order:
            if kind == "a":
                rows.append(x[b, i])
                sizes.append(size[b, i])
            else:
                rows.append(tot[i][0] / tot[i][1])
                sizes.append(tot[i][1])
        xs.append(torch.stack(rows))
        ss.append(torch.stack(sizes))
    return torch.stack(xs), torch.stack(ss)


@pytest.mark.parametrize("P", [0, 1, 2, 3])
@pytest.mark.parametrize("N", [11, 12])
def test_merge_equals_plain_tome(P, N):
    g = torch.Generator().manual_seed(N + P)
    x = torch.randn(2, N, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(2, N, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, N, 1), generator=g).double()
    for r in range(max_merge(N, P) + 1):
        for s in (None, size):
            got_x, got_s = merge_wavg(bipartite_soft_matching(metric, r, P), x, s)
            want_x, want_s = plain_tome_merge(x, metric, r, P, s)
            assert got_x.shape == (2, N - r, 6)
            torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-12)
            assert torch.equal(got_s, want_s)
            assert got_s.sum().item() == (2 * N if s is None else size.sum().item())


def test_merge_rejects_too_many():
    with pytest.raises(ValueError, match="r: cannot merge 6 of 11 tokens"):
        bipartite_soft_matching(torch.randn(1, 11, 4), 6, 1)


def plain_tome_forward(model, images, r, prop_attn=True):
    """The ToMe forward written out: explicit attention with + log(size) on the keys, merge at block output."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    for blk in model.blocks:
        a = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q @ k.transpose(-1, -2)) * a.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.ls1(a.proj(a.norm(o)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        x, size = plain_tome_merge(x, k.mean(1), r, P, size)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["vit", "deit-distilled", "qknorm-layerscale", "no-class-token"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_forward_equals_plain(name, prop_attn):
    model, x = MODELS[name](), images_for(name, B=2)
    with torch.no_grad():
        got = reduce_tokens(model, "tome", r=6, prop_attn=prop_attn)(x)
        want = plain_tome_forward(model, x, 6, prop_attn)
        other = plain_tome_forward(model, x, 6, not prop_attn)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, other, rtol=1e-5, atol=1e-5)  # the size bias reaches the fused attention


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_reduction_is_exact(name):
    model, x = MODELS[name](), images_for(name)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(reduce_tokens(model, "tome", r=0)(x), want)
        assert torch.equal(reduce_tokens(model, "tome", r=[0, 0])(x), want)


def test_copy_shares_parameters_and_leaves_original():
    model = tiny_vit()
    blocks, keys = model.blocks, list(model.state_dict())
    red = reduce_tokens(model, "tome", r=4)
    assert isinstance(red, ReducedViT) and model.blocks is blocks and type(blocks) is torch.nn.Sequential
    assert list(red.vit.state_dict()) == keys
    assert all(p is q for p, q in zip(red.vit.parameters(), model.parameters()))
    assert red.tokens_per_block((32, 32)) == [65, 61, 57]


@pytest.mark.parametrize("r, match", [
    (33, r"r: 33 tokens to merge at block 0, but its 65 tokens \(1 protected\) allow at most 32"),
    ([30, 30], r"r: 30 tokens to merge at block 1, but its 35 tokens"),
    (-1, "r: expected a non-negative int"),
    (2.5, "r: expected a non-negative int"),
    ([1, 2, 3], "r: expected 2 non-negative ints"),
])
def test_bad_r_raises_at_build(r, match):
    with pytest.raises(ValueError, match=match):
        reduce_tokens(tiny_vit(), "tome", r=r)


def test_bad_r_for_a_dynamic_size_raises_at_forward():
    red = reduce_tokens(tiny_vit(dynamic_img_size=True), "tome", r=[16, 16])  # fine for 65 tokens
    with pytest.raises(ValueError, match="r: 16 tokens to merge at block 1"):
        red(torch.randn(1, 3, 16, 32))  # 33 tokens


def test_unsupported_models_and_methods():
    with pytest.raises(UnsupportedModelError, match="timm VisionTransformer"):
        reduce_tokens(torch.nn.Linear(2, 2), "tome", r=1)
    slow = tiny_vit()
    for blk in slow.blocks:
        blk.attn.fused_attn = False
    with pytest.raises(UnsupportedModelError, match=r"model.blocks\[0\]: fused_attn is False"):
        reduce_tokens(slow, "tome", r=1)
    with pytest.raises(ValueError, match="method: expected one of"):
        reduce_tokens(tiny_vit(), "nope")
    with pytest.raises(ValueError, match=r"tome: unknown setting\(s\) \['keep_ratio'\]"):
        reduce_tokens(tiny_vit(), "tome", keep_ratio=0.5)


def test_a_new_method_is_one_registry_entry():
    @register_method("drop-last-test")
    class DropLast(TokenReducer):
        def __init__(self, n=1):
            self.n = n

        def plan(self, num_tokens):
            return [num_tokens - self.n * i for i in range(3)]

        def after(self, block, x, state):
            return x[:, :-self.n]

    try:
        model, x = tiny_vit(), images_for("vit")
        red = reduce_tokens(model, "drop-last-test", n=2)
        with torch.no_grad():
            manual = model.forward_head(model.norm(model.blocks[1](model.blocks[0](
                model._pos_embed(model.patch_embed(x)))[:, :-2])[:, :-2]))
            torch.testing.assert_close(red(x), manual, rtol=0, atol=0)
        assert red.tokens_per_block((32, 32)) == [65, 63, 61]
    finally:
        METHODS.pop("drop-last-test")


def test_max_merge():
    assert [max_merge(n, 1) for n in (1, 2, 3, 65)] == [0, 0, 1, 32]
    assert math.isclose(max_merge(197, 1), 98)
