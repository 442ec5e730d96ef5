"""The method comparison (rollout_fast.prune.study: parse_method, build_methods, compare_methods) and the
scorer + in-network combination (rollout_fast.prune.inner.prune_and_reduce): the spec syntax, every method's
no-reduction setting equal to the unpruned model exactly, the combination against a hand-written forward, a
new registry entry usable with no other change, and the errors."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from prune_testing import StandInStudent, images_for, manual_forward, tiny_vit

from rollout_fast.prune import (
    METHODS,
    TokenReducer,
    method_names,
    prune_tokens,
    reduce_tokens,
    register_method,
)
from rollout_fast.prune.inner import prune_and_reduce
from rollout_fast.prune.scorers import RandomScorer, scorer_names
from rollout_fast.prune.study import PRESELECT_POINTS, build_methods, compare_methods, parse_method
from rollout_fast.reference import topk_gather_reference

# the no-reduction setting of each in-network method (a method registered without one here fails below)
NO_REDUCTION = {"tome": "r=0", "evit": "keep=1.0", "ats": "keep=1.0:blocks=[]", "smerge": "keep=1.0"}


def test_spec_syntax_points_labels_and_defaults():
    spec = parse_method("student+tome:keep=0.75,0.5:r=2,[4,3]")
    assert (spec.name, spec.scorer, spec.reducer) == ("student+tome", "student", "tome")
    assert [p.label for p in spec.points] == ["keep=0.75 r=2", "keep=0.75 r=[4,3]", "keep=0.5 r=2",
                                              "keep=0.5 r=[4,3]"]
    assert spec.points[1].scorer == {"keep_ratio": 0.75} and spec.points[1].reducer == {"r": [4, 3]}
    evit = parse_method("cls-attention+evit:keep=0.5:evit.keep=0.7:blocks=[0,1]")
    assert [(p.label, p.scorer, p.reducer) for p in evit.points] == [
        ("keep=0.5 evit.keep=0.7 blocks=[0,1]", {"keep_ratio": 0.5}, {"keep_ratio": 0.7, "blocks": [0, 1]})]
    assert [p.scorer for p in parse_method("student").points] == [{"keep_ratio": k} for k in PRESELECT_POINTS]
    assert [p.label for p in parse_method("tome").points] == [f"r={r}" for r in METHODS["tome"].operating_points["r"]]
    assert [p.label for p in parse_method("random:keep_ratio=0.5:seed=0,1").points] == [
        "keep=0.5 seed=0", "keep=0.5 seed=1"]
    assert [p.label for p in parse_method("student+tome:r=2").points] == [
        f"r=2 keep={k}" for k in PRESELECT_POINTS]  # a key left out takes the method's default points


@pytest.mark.parametrize("text, message", [
    ("foo:r=2", "foo:r=2: unknown method 'foo'; expected a scorer (" + ", ".join(scorer_names()) + "), an in-network "
     "method (" + ", ".join(method_names()) + ") or SCORER+METHOD (e.g. student+tome)"),
    ("tome+student", "tome+student: unknown method 'tome+student'; expected a scorer"),
    ("tome:keep=0.5", "tome:keep=0.5: unknown setting 'keep'; expected one of ['r', 'prop_attn']"),
    ("evit:keep=0", "evit:keep=0: keep_ratio: expected a number in (0, 1], got 0"),
    ("student:keep=0.5,1.5", "student:keep=0.5,1.5: keep_ratio: expected a number in (0, 1], got 1.5"),
    ("evit:keep=[0.5,1.2]", "evit:keep=[0.5,1.2]: keep_ratio: expected a number in (0, 1], got 1.2"),
    ("random:seed=0.5", "random:seed=0.5: seed: expected a non-negative int, got 0.5"),
    ("tome:r=2:r=4", "tome:r=2:r=4: r: given twice"),
    ("tome:r", "tome:r: expected KEY=VALUE[,VALUE...] after ':', got 'r'"),
    ("tome:r=2,", "tome:r=2,: r: expected comma-separated values, got '2,'"),
    ("student+tome:evit.keep=0.5", "student+tome:evit.keep=0.5: evit.keep: 'evit' is not part of this method"),
])
def test_bad_specs_raise_naming_the_spec(text, message):
    with pytest.raises(ValueError) as e:
        parse_method(text)
    assert str(e.value).startswith(message)


def _all_no_reduction_specs():
    assert set(NO_REDUCTION) == set(method_names()), "give the new method's no-reduction setting in NO_REDUCTION"
    from rollout_fast.prune import METHODS

    scored = [m for m in method_names() if METHODS[m].uses_scores]  # only after a scorer; keep is theirs
    plain = [m for m in method_names() if m not in scored]
    return ([f"{s}:keep=1.0" for s in scorer_names()] + [f"{m}:{NO_REDUCTION[m]}" for m in plain]
            + [f"{s}+{m}:keep=1.0:" + ":".join(f"{m}.{part}" for part in NO_REDUCTION[m].split(":"))
               for s in ("student", "cls-attention") for m in plain]
            + [f"{s}+{m}:{NO_REDUCTION[m]}" for s in ("student", "cls-attention") for m in scored])


@pytest.mark.parametrize("spec", _all_no_reduction_specs())
def test_every_method_at_its_no_reduction_setting_is_the_unpruned_model(spec):
    model, x = tiny_vit(), images_for("vit")
    if spec.split(":")[0].split("+")[0] == "ltpa":  # the LTPA scorer reads a Learn to Pay Attention model
        from rollout_fast.ltpa import create_attnvgg

        scorer_model = create_attnvgg({"type": "attnvgg", "img_size": 32, "num_classes": 10,
                                       "variant": "pc-softmax-after", "width": 1 / 16}).eval()
    else:
        scorer_model = tiny_vit(depth=1, embed_dim=24)
    (run,) = build_methods(model, [spec], (32, 32), student=StandInStudent((8, 8)), scorer_model=scorer_model)
    assert run.tokens == [65, 65] and not run.needs_scores
    with torch.no_grad():
        assert torch.equal(run.module(x), model(x)), spec


def test_preselect_then_merge_equals_hand_written_forward():
    """student + ToMe: the kept tokens (reference top-k gather of the same scores) run through the blocks with
    ToMe merging between them; keep 1.0 is ToMe alone and r=0 is the pre-selection alone, exactly."""
    model, x = tiny_vit(), images_for("vit")
    scores = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    combined = prune_and_reduce(model, 0.5, "random", "tome", {"r": 4})
    blocks = reduce_tokens(model, "tome", r=4).vit.blocks  # the same ReducingBlocks, here on the kept tokens
    with torch.no_grad():
        kept, _ = topk_gather_reference(model._pos_embed(model.patch_embed(x)), scores, 32, 1)
        manual = model.forward_head(model.norm(blocks(model.norm_pre(kept))))
        torch.testing.assert_close(combined(x, scores=scores), manual, rtol=0, atol=0)
        assert torch.equal(prune_and_reduce(model, 1.0, "random", "tome", {"r": 4})(x), reduce_tokens(model, "tome", r=4)(x))
        assert torch.equal(prune_and_reduce(model, 0.5, "random", "tome", {"r": 0})(x, scores=scores),
                           manual_forward(model, x, scores, 32))
    assert combined.vit.blocks.reducer.plan(33) == [33, 29, 25]
    assert model.blocks.__class__ is torch.nn.Sequential and not hasattr(model.blocks, "reducer")  # untouched


@pytest.mark.parametrize("block", [0, 1])
def test_combination_with_a_token_scorer_scores_inside_the_forward(block):
    """cls-attention scores the embedded tokens inside the pruned forward, on the combined model's blocks (which
    it slices): the same logits as with its scores computed apart."""
    from rollout_fast.prune import make_scorer

    model, x = tiny_vit(), images_for("vit")
    sc = make_scorer("cls-attention", block=block)
    combined = prune_and_reduce(model, 0.5, sc, "tome", {"r": 4})
    with torch.no_grad():
        torch.testing.assert_close(combined(x), combined(x, scores=sc.score(model, x)), rtol=0, atol=0)


def test_combination_too_many_merges_after_preselection_is_refused():
    model = tiny_vit()  # 64 patches + a class token, 2 blocks
    with pytest.raises(ValueError) as e:
        prune_and_reduce(model, 0.25, "random", "tome", {"r": 6})  # 17 tokens -> 11: at most 5 at block 1
    assert str(e.value) == ("r: 6 tokens to merge at block 1, but its 11 tokens (1 protected) allow at most 5; "
                            "lower r (after pre-selection keeps 16 of 64 patch tokens)")
    with pytest.raises(ValueError) as e:
        build_methods(model, ["random+tome:keep=0.5,0.25:r=6"], (32, 32))
    assert str(e.value).startswith("random+tome:keep=0.5,0.25:r=6: keep=0.25 r=6: r: 6 tokens to merge at block 1")
    with pytest.raises(ValueError, match="^student: keep=0.75: scorer: 'student' needs student="):
        build_methods(model, ["student"], (32, 32))


def test_compare_methods_rows_share_images_and_scores():
    model = tiny_vit()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = model(images).argmax(-1).detach()  # the full model is right on every image
    res = compare_methods(model, images, labels, ["random:keep=1.0,0.5", "tome:r=0,4", "evit:keep=0.5",
                                                  "random+tome:keep=0.5:r=2"],
                          batch_size=4, throughput_batches=(2,), throughput_time=0.0, progress=False)
    rows = {(r["method"], r["setting"]): r for r in res["rows"]}
    assert list(rows) == [("full", "-"), ("random", "keep=1.0"), ("random", "keep=0.5"), ("tome", "r=0"),
                          ("tome", "r=4"), ("evit", "keep=0.5"), ("random+tome", "keep=0.5 r=2")]
    assert res["meta"]["full_top1"] == 1.0 and res["meta"]["images"] == 6
    assert rows[("random", "keep=1.0")]["top1"] == rows[("tome", "r=0")]["top1"] == 1.0
    assert rows[("tome", "r=4")]["tokens"] == 63.0 and rows[("random+tome", "keep=0.5 r=2")]["tokens"] == 32.0
    assert all(r["batch"] == 2 and r["images_per_s"] > 0 for r in res["rows"]) and rows[("full", "-")]["speedup"] == 1.0
    # random at keep 0.5: the same seed-0 scores as a random pruned model run batch by batch
    pruned, sc = prune_tokens(model, 0.5, "random"), RandomScorer(0)
    with torch.no_grad():
        want = sum(int((pruned(images[s:s + 4], scores=sc.score(model, images[s:s + 4])).argmax(-1)
                        == labels[s:s + 4]).sum()) for s in (0, 4)) / 6
    assert rows[("random", "keep=0.5")]["top1"] == want
    only = compare_methods(model, images, labels, ["tome:r=4"], throughput_batches=(), progress=False)
    assert [(r["batch"], r["images_per_s"], r["speedup"]) for r in only["rows"]] == [(None, None, None)] * 2


def test_a_new_method_is_one_registry_entry_in_the_comparison():
    @register_method("drop-last-cmp")
    class DropLast(TokenReducer):
        operating_points: ClassVar[dict] = {"n": (1, 2)}

        def __init__(self, n=1):
            self.n = n

        def plan(self, num_tokens):
            return [num_tokens - self.n * i for i in range(3)]

        def after(self, block, x, state):
            return x[:, :-self.n] if self.n else x

    try:
        model = tiny_vit()
        runs = build_methods(model, ["drop-last-cmp", "random+drop-last-cmp:keep=0.5:n=3"], (32, 32))
        assert [(r.method, r.setting, r.tokens) for r in runs] == [
            ("drop-last-cmp", "n=1", [65, 64]), ("drop-last-cmp", "n=2", [65, 63]),
            ("random+drop-last-cmp", "keep=0.5 n=3", [33, 30])]
    finally:
        METHODS.pop("drop-last-cmp")


def test_compare_methods_reports_the_tokens_ats_really_kept():
    """ATS keeps a per-image count: the table's tokens/block is the mean over the evaluated images (at most the
    planned bound), alone and after a pre-selection."""
    model = tiny_vit()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(6, dtype=torch.int64)
    res = compare_methods(model, images, labels, ["ats:keep=1.0,0.5:blocks=[0]",
                                                  "random+ats:keep=0.5:ats.keep=1.0:ats.blocks=[0]"],
                          batch_size=4, throughput_batches=(), progress=False)
    rows = {(r["method"], r["setting"]): r["tokens"] for r in res["rows"]}
    for keep in (1.0, 0.5):
        red = reduce_tokens(model, "ats", keep_ratio=keep, blocks=[0])
        with torch.no_grad():
            red(images[:4]), red(images[4:])
        seen = red.method.observed_tokens()
        assert rows[("ats", f"keep={keep} blocks=[0]")] == round(sum(seen) / 2, 2)
        assert seen[0] == 65 and seen[1] <= 1 + 64 * keep
    assert rows[("ats", "keep=1.0 blocks=[0]")] < 65  # keep 1.0 still drops the tokens no quantile lands on
    assert rows[("random+ats", "keep=0.5 ats.keep=1.0 blocks=[0]")] < 33
