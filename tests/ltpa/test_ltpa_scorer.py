"""Scorer 'ltpa' (rollout_fast.prune.cross.LTPAScorer): a Learn to Pay Attention model's attention picks the ViT's
tokens, on the full image or on the students' thumbnail (the image resized to the LTPA model's input size); its
cost (scorer_cost) measured as the students' cards measure a student's; prune-eval --scorers ltpa end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from ltpa_testing import saved_ltpa, saved_vit, tiny_ltpa, write_images

from rollout_fast.cli import main
from rollout_fast.cli import prune_eval as prune_eval_command
from rollout_fast.ltpa import ltpa_saliency
from rollout_fast.prune import LTPAScorer, keep_count, make_scorer, prune_tokens
from rollout_fast.prune.study import scorer_cost
from rollout_fast.reference import topk_gather_reference
from rollout_fast.students import count_macs


def tiny_vit():
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=10).eval()


def manual_forward(model, x, scores, k):
    """patch_embed -> _pos_embed -> reference top-k gather -> norm_pre -> blocks -> norm -> head."""
    t = model._pos_embed(model.patch_embed(x))
    kept, _ = topk_gather_reference(t, scores, k, model.num_prefix_tokens)
    return model.forward_head(model.norm(model.blocks(model.norm_pre(kept))))


def test_scores_are_the_ltpa_maps_on_the_vit_grid_and_select_the_tokens():
    vit, ltpa = tiny_vit(), tiny_ltpa()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pruned = prune_tokens(vit, 0.5, "ltpa", scorer_model=ltpa)
    with torch.no_grad():
        _, levels = ltpa(x)
        want = ltpa_saliency(levels, (8, 8)).flatten(1)
        got = pruned.scorer.score(vit, x)
        out = pruned(x)
    assert isinstance(pruned.scorer, LTPAScorer) and pruned.scorer.name == "ltpa"
    assert torch.equal(got, want) and got.dtype == torch.float32 and got.shape == (3, 64)
    torch.testing.assert_close(out, manual_forward(vit, x, want, keep_count(0.5, 64)), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(prune_tokens(vit, 1.0, "ltpa", scorer_model=ltpa)(x), vit(x))


def test_thumbnail_model_sees_the_image_resized_and_renormalised():
    """A 16 px LTPA model (the CIFAR students' thumbnail) scores the 32 px ViT's 8x8 grid: the images are
    re-normalised from the ViT's mean/std to its own and resized to 16 px (bilinear, antialiased)."""
    vit, thumb = tiny_vit(), tiny_ltpa(img_size=16)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    norm_in, norm_model = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3))
    sc = make_scorer("ltpa", scorer_model=(thumb, {"mean": norm_model[0], "std": norm_model[1]}), image_norm=norm_in)
    m, s = (torch.tensor(t).view(1, 3, 1, 1) for t in norm_model)
    expect_in = F.interpolate((x * 0.5 + 0.5 - m) / s, size=(16, 16), mode="bilinear", antialias=True,
                              align_corners=False)
    torch.testing.assert_close(sc.prepare(x), expect_in, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        _, levels = thumb(sc.prepare(x))
        assert [tuple(a.shape[-2:]) for a in levels] == [(8, 8), (4, 4), (2, 2)]
        assert torch.equal(sc.score(vit, x), ltpa_saliency(levels, (8, 8)).flatten(1))
    assert sc.input_size == (16, 16) and sc.module() is thumb


def test_scorer_cost_is_the_ltpa_models_own():
    vit, thumb = tiny_vit(), tiny_ltpa(img_size=16)
    cost = scorer_cost(make_scorer("ltpa", scorer_model=thumb), vit, (32, 32), batch_size=2, repeats=1)
    assert cost["scorer"] == "ltpa"
    assert cost["params"] == sum(p.numel() for p in thumb.parameters())
    assert cost["macs_per_image"] == count_macs(thumb, torch.zeros(1, 3, 16, 16))  # the resize counts nothing
    assert cost["latency_ms_batch1"] > 0 and cost["ms_per_image_batch2"] > 0
    assert scorer_cost(make_scorer("random"), vit, (32, 32)) is None


def test_missing_or_wrong_scorer_model_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        make_scorer("ltpa")
    assert str(e.value) == ("scorer: 'ltpa' needs scorer_model= (a Learn to Pay Attention AttnVGG, or a name for "
                            "rollout_fast.zoo.load_teacher: 'cifar10-ltpa', 'cifar10-ltpa-thumb' once installed, an "
                            "AttnVGG .safetensors path; --scorer-model on the command line)")
    with pytest.raises(ValueError) as e:
        make_scorer("ltpa", scorer_model=tiny_vit())
    assert str(e.value) == ("scorer model: expected an attention-gated Learn to Pay Attention model (AttnVGG), got "
                            "VisionTransformer")
    with pytest.raises(ValueError, match=r"got AttnVGG variant 'vgg' \(no attention\)$"):
        make_scorer("ltpa", scorer_model=str(saved_ltpa(tmp_path, "vgg")))


def _run(argv):
    parser = argparse.ArgumentParser()
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_prune_eval_with_the_ltpa_scorer(tmp_path, capsys):
    from rollout_fast.zoo import load_teacher

    data = write_images(tmp_path / "data", n=4, classes=2)
    vit, ltpa = saved_vit(tmp_path), saved_ltpa(tmp_path, img_size=16)
    out = tmp_path / "out"
    rc = _run(["prune-eval", "--model", str(vit), "--data", str(data), "--batch-size", "3", "--throughput-batches",
               "2", "--throughput-time", "0", "--out", str(out), "--no-progress", "--scorer-model", str(ltpa),
               "--scorers", "random,ltpa", "--keep", "1.0,0.5", "--seeds", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err == (f"rollout-fast prune-eval: note: --scorer-model {ltpa} takes 16x16 images; the 32x32 "
                            "inputs are resized for it\n")
    res = json.loads((out / "results.json").read_text())
    rows = {(r["scorer"], r["keep_ratio"]): r for r in res["rows"]}
    assert rows[("ltpa", 1.0)]["top1"] == res["meta"]["full_top1"] and rows[("ltpa", 0.5)]["tokens_kept"] == 32
    assert {(t["scorer"], t["keep_ratio"]) for t in res["throughput"]} == {("full", 1.0), ("random", 0.5),
                                                                           ("ltpa", 0.5)}
    model, _ = load_teacher(ltpa)
    [cost] = res["scorer_cost"]
    assert cost["scorer"] == "ltpa" and cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["macs_per_image"] == count_macs(model, torch.zeros(1, 3, 16, 16))
    md = (out / "results.md").read_text()
    assert "| scorer (its network alone) | params | MACs/image | latency batch 1 | ms/image batch 2 |" in md
    assert f"| ltpa | {cost['params'] / 1e6:.3f} M | {cost['macs_per_image'] / 1e6:.2f} M |" in md


@pytest.mark.parametrize("argv, message", [
    (["--scorers", "ltpa"], ("--scorers: scorer 'ltpa' needs --scorer-model NAME_OR_PATH (the Learn to Pay "
                             "Attention model whose attention picks the tokens, e.g. cifar10-ltpa or cifar10-ltpa-thumb)")),
    (["--scorers", "ltpa,model-rollout", "--scorer-model", "x"], ("--scorers: 'model-rollout' (a ViT) and 'ltpa' (a "
     "Learn to Pay Attention model) both read --scorer-model; run them in separate prune-eval runs")),
    (["--scorers", "random", "--scorer-model", "x"], ("--scorer-model: no scorer uses it; add model-rollout, "
                                                      "model-grad-rollout or ltpa to --scorers")),
])
def test_prune_eval_ltpa_misuse_is_one_line(tmp_path, capsys, argv, message):
    data = write_images(tmp_path / "data", n=2, classes=2)
    rc = main(["prune-eval", "--model", str(saved_vit(tmp_path)), "--data", str(data), "--out", str(tmp_path / "o"),
               *argv])
    assert rc == 2 and capsys.readouterr().err == f"rollout-fast prune-eval: {message}\n"
    assert not (tmp_path / "o").exists()


def test_prune_eval_refuses_a_vit_as_the_ltpa_scorer_model(tmp_path, capsys):
    data = write_images(tmp_path / "data", n=2, classes=2)
    vit = saved_vit(tmp_path)
    rc = main(["prune-eval", "--model", str(vit), "--data", str(data), "--out", str(tmp_path / "o"), "--scorers",
               "ltpa", "--scorer-model", str(vit)])
    assert rc == 2 and capsys.readouterr().err == (
        f"rollout-fast prune-eval: --scorer-model: cannot use {str(vit)!r}: scorer model: expected an "
        "attention-gated Learn to Pay Attention model (AttnVGG), got VisionTransformer\n")
