"""Score-guided merging, ours (rollout_fast.prune.smerge): one stage against a plain per-image implementation,
the whole forward against a hand-written one, exact at keep 1.0, prune-eval's spec, and the errors."""

from __future__ import annotations

import pytest
import torch
from prune_testing import MODELS, StandInStudent, images_for, tiny_vit

from rollout_fast.capture import token_layout
from rollout_fast.reference import topk_gather_reference
from rollout_fast.prune import keep_count, reduce_tokens
from rollout_fast.prune.inner import prune_and_reduce
from rollout_fast.prune.smerge import scored_merge
from rollout_fast.prune.study import build_methods, compare_methods, parse_method


def plain_stage(x, scores, keep, size, metric, P, rest):
    """One stage, one image at a time: rank by score (stable, descending), keep the best; 'merge': each other
    token goes to the kept token of highest cosine similarity (first on a tie), size-weighted average; 'fuse':
    the others' size-weighted mean appended; 'drop': discarded."""
    if keep >= x.shape[1] - P:
        return x, scores, size
    xs, ss, zs = [], [], []
    for b in range(x.shape[0]):
        cand = sorted(range(x.shape[1] - P), key=lambda i: (-scores[b, i].item(), i))
        kept, gone = cand[:keep], cand[keep:]
        rows = [x[b, P + i].clone() for i in kept]
        sizes = [size[b, P + i, 0].clone() for i in kept]
        sc = [scores[b, i] for i in kept]
        if rest == "merge":
            m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
            acc = [x[b, P + i] * size[b, P + i, 0] for i in kept]
            for j in gone:
                sims = [float(m[P + j] @ m[P + i]) for i in kept]
                t = sims.index(max(sims))
                acc[t] = acc[t] + x[b, P + j] * size[b, P + j, 0]
                sizes[t] = sizes[t] + size[b, P + j, 0]
            rows = [a / s for a, s in zip(acc, sizes)]
        elif rest == "fuse":
            tot = sum(size[b, P + j, 0] for j in gone)
            rows.append(sum(x[b, P + j] * size[b, P + j, 0] for j in gone) / tot)
            sizes.append(tot)
            sc.append(min(sc) - 1)
        xs.append(torch.stack([x[b, i] for i in range(P)] + rows))
        zs.append(torch.stack([size[b, i, 0] for i in range(P)] + sizes)[:, None])
        ss.append(torch.stack(sc))
    return torch.stack(xs), torch.stack(ss), torch.stack(zs)


@pytest.mark.parametrize("P", [0, 1, 3])
@pytest.mark.parametrize("rest", ["merge", "fuse", "drop"])
def test_stage_equals_plain(P, rest):
    g = torch.Generator().manual_seed(P)
    N = 13
    x = torch.randn(2, N, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(2, N, 4, generator=g, dtype=torch.float64)
    scores = torch.randint(0, 5, (2, N - P), generator=g).double()  # ties: the earlier token first
    size = torch.randint(1, 4, (2, N, 1), generator=g).double()
    for keep in range(1, N - P):
        got = scored_merge(x, scores, keep, size, metric, P, rest)
        want = plain_stage(x, scores, keep, size, metric, P, rest)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert scored_merge(x, scores, N - P, size, metric, P, rest)[0] is x


def test_merge_defaults_to_unit_sizes_and_the_tokens_as_metric():
    g = torch.Generator().manual_seed(3)
    x, scores = torch.randn(2, 9, 5, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    got = scored_merge(x, scores, 3)
    want = plain_stage(x, scores, 3, torch.ones(2, 9, 1, dtype=torch.float64), x, 1, "merge")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def plain_smerge_forward(model, images, scores, ratios, blocks=(), rest="merge", prop_attn=True, tokens=None):
    """The smerge forward written out: a stage on the embedded tokens, explicit attention with + log(size) on
    the keys, a stage at the chosen blocks' outputs (merging by the block's head-averaged keys). ``tokens``:
    the embedded tokens after a pre-selection (their scores in ``scores``), instead of all of ``images``'."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)) if tokens is None else tokens)
    G = x.shape[1] - P  # the ratios are fractions of the patch tokens entering the blocks
    one = torch.ones(x.shape[0], x.shape[1], 1)
    x, scores, size = plain_stage(x, scores, keep_count(ratios[0], G), one, x, P, rest)
    merged = rest != "drop"
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q @ k.transpose(-1, -2)) * a.scale
        if prop_attn and merged:
            logits = logits + size.log()[:, None, None, :, 0]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.ls1(a.proj(a.norm(o)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if i in blocks:
            x, scores, size = plain_stage(x, scores, keep_count(ratios[1 + list(blocks).index(i)], G), size,
                                          k.mean(1), P, rest)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["vit", "deit-distilled", "qknorm-layerscale", "registers"])
@pytest.mark.parametrize("setting", [
    {"keep_ratio": 0.5},
    {"keep_ratio": 0.25, "prop_attn": False},
    {"keep_ratio": [0.5, 0.25], "blocks": [0]},
    {"keep_ratio": [0.5, 0.25], "blocks": [0], "rest": "fuse"},
    {"keep_ratio": [0.75, 0.25], "blocks": [1], "rest": "drop"},
])
def test_forward_equals_plain(name, setting):
    model, x = MODELS[name](), images_for(name, B=2)
    layout = token_layout(model, tuple(x.shape[-2:]))
    student = StandInStudent(layout.grid)
    ratios = setting["keep_ratio"] if isinstance(setting["keep_ratio"], list) else [setting["keep_ratio"]]
    with torch.no_grad():
        got = prune_and_reduce(model, 1.0, "student", "smerge", setting, scorer_options={"student": student})(x)
        want = plain_smerge_forward(model, x, student(x).flatten(1), ratios, setting.get("blocks", ()),
                                    setting.get("rest", "merge"), setting.get("prop_attn", True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prop_attn_reaches_the_fused_attention():
    model, x = tiny_vit(), images_for("vit", B=2)
    student = StandInStudent((8, 8))
    with torch.no_grad():
        on = prune_and_reduce(model, 1.0, "student", "smerge", {"keep_ratio": 0.25},
                              scorer_options={"student": student})(x)
        off = plain_smerge_forward(model, x, student(x).flatten(1), [0.25], prop_attn=False)
    assert not torch.allclose(on, off, rtol=1e-5, atol=1e-5)


def test_after_a_dropping_scorer_the_scores_follow_the_kept_tokens():
    """smerge after a pre-selection that drops (keep 0.75): its stages rank the 48 kept tokens by their own
    scores, and its ratios are fractions of those 48 (0.25: 12 tokens after block 0)."""
    model, x = tiny_vit(), images_for("vit", B=2)
    student = StandInStudent((8, 8))
    s = student(x).flatten(1)
    with torch.no_grad():
        got = prune_and_reduce(model, 0.75, "student", "smerge", {"keep_ratio": [1.0, 0.25], "blocks": [0]},
                               scorer_options={"student": student})(x)
        kept, idx = topk_gather_reference(model._pos_embed(model.patch_embed(x)), s, 48, 1)
        want = plain_smerge_forward(model, x, s.gather(1, idx), [1.0, 0.25], [0], tokens=kept)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "deit-distilled", "registers", "qknorm-layerscale", "non-square"])
def test_no_reduction_is_exact(name):
    model, x = MODELS[name](), images_for(name)
    student = StandInStudent(token_layout(model, tuple(x.shape[-2:])).grid)
    with torch.no_grad():
        want = model(x)
        for setting in ({"keep_ratio": 1.0}, {"keep_ratio": [1.0, 1.0], "blocks": [1]}):
            pruned = prune_and_reduce(model, 1.0, "student", "smerge", setting, scorer_options={"student": student})
            assert torch.equal(pruned(x), want)


def test_tokens_per_block():
    model = tiny_vit(depth=3)
    st = StandInStudent((8, 8))
    plan = lambda **kw: prune_and_reduce(model, 1.0, "student", "smerge", kw,  # noqa: E731
                                         scorer_options={"student": st}).vit.blocks.reducer.plan(65)
    assert plan(keep_ratio=0.375) == [25] * 4
    assert plan(keep_ratio=[0.5, 0.125], blocks=[1]) == [33, 33, 9, 9]
    assert plan(keep_ratio=[0.5, 0.125], blocks=[1], rest="fuse") == [34, 34, 10, 10]


@pytest.mark.parametrize("setting, match", [
    ({"keep_ratio": 0.0}, "keep_ratio: expected a number in"),
    ({"keep_ratio": 1.5}, "keep_ratio: expected a number in"),
    ({"keep_ratio": [0.25, 0.5], "blocks": [1]}, "non-increasing"),
    ({"keep_ratio": [0.5, 0.25]}, r"2 ratio\(s\) for a pre-block stage and blocks \[\]"),
    ({"keep_ratio": 0.5, "blocks": [2]}, r"blocks: expected increasing block indices in \[0, 2\)"),
    ({"keep_ratio": [0.5, 0.4, 0.3], "blocks": [1, 0]}, "blocks: expected increasing"),
    ({"keep_ratio": 0.5, "rest": "average"}, "rest: expected one of"),
])
def test_bad_settings_raise(setting, match):
    with pytest.raises(ValueError, match=match):
        prune_and_reduce(tiny_vit(), 1.0, "student", "smerge", setting,
                         scorer_options={"student": StandInStudent((8, 8))})


def test_needs_a_scorer():
    with pytest.raises(ValueError, match="ranks tokens by a scorer's scores; use it after one"):
        reduce_tokens(tiny_vit(), "smerge", keep_ratio=0.5)
    with pytest.raises(ValueError, match="smerge:keep=0.5: keep=0.5: method: 'smerge' ranks tokens"):
        build_methods(tiny_vit(), ["smerge:keep=0.5"], (32, 32))


def test_prune_eval_spec():
    spec = parse_method("student+smerge:keep=0.5,[0.5,0.25]:blocks=[],[1]")
    assert [p.label for p in spec.points] == ["keep=0.5 blocks=[]", "keep=0.5 blocks=[1]",
                                              "keep=[0.5,0.25] blocks=[]", "keep=[0.5,0.25] blocks=[1]"]
    assert all(p.scorer == {} for p in spec.points)  # the scorer drops nothing itself; keep is smerge's
    default = parse_method("student+smerge")
    assert [p.reducer["keep_ratio"] for p in default.points] == [0.625, 0.5, 0.375, 0.25, 0.1875]
    with pytest.raises(ValueError, match="unknown setting 'student.keep'"):
        parse_method("student+smerge:student.keep=0.5")
    model, x = tiny_vit(), images_for("vit", B=4)
    built = build_methods(model, ["student+smerge:keep=0.5,1.0"], (32, 32), student=StandInStudent((8, 8)))
    assert [b.needs_scores for b in built] == [True, False]  # keep 1.0: the unpruned model, nothing scored
    assert built[0].tokens == [33, 33] and built[1].tokens == [65, 65]
    res = compare_methods(model, x, torch.zeros(4, dtype=torch.long), ["student+smerge:keep=0.5,1.0"],
                          throughput_batches=(), student=StandInStudent((8, 8)), progress=False)
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["keep=1.0"]["top1"] == res["meta"]["full_top1"]


def test_mask_through_the_block_or_the_interception_agree(monkeypatch):
    """The proportional-attention bias goes in as the block's attn_mask (timm's Block takes one), or, for a
    block whose forward does not take one, through the SDPA interception: the same output."""
    from rollout_fast.prune import inner

    model, x = tiny_vit(), images_for("vit", B=2)
    student = StandInStudent((8, 8))
    make = lambda: prune_and_reduce(model, 1.0, "student", "smerge", {"keep_ratio": [0.5, 0.25], "blocks": [0]},  # noqa: E731
                                    scorer_options={"student": student})
    with torch.no_grad():
        direct = make()(x)
        monkeypatch.setattr(inner, "_takes_attn_mask", lambda block: False)
        tapped = make()(x)
    torch.testing.assert_close(direct, tapped, rtol=1e-6, atol=1e-6)
