"""The cross-model scorer (rollout_fast.prune.cross): another ViT's rollout / gradient rollout picks the tokens;
its input resized and re-normalised for it; a scorer model on another patch grid refused before any forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prune_testing import images_for, manual_forward, tiny_vit

import rollout_fast
from rollout_fast.prune import ModelRolloutScorer, keep_count, make_scorer, prune_tokens


def small_vit(**kw):
    return tiny_vit(depth=1, embed_dim=24, num_heads=2, **kw)


def test_scores_are_the_scorer_models_rollout_and_select_the_kept_tokens():
    big, small, x = tiny_vit(), small_vit(), images_for("vit")
    pruned = prune_tokens(big, 0.5, "model-rollout", scorer_model=small, rollout_discard_ratio=0.0)
    want = rollout_fast.AttentionRollout(small, discard_ratio=0.0)(x).flatten(1)
    with torch.no_grad():
        got = pruned.scorer.score(big, x)
        out = pruned(x)
    assert torch.equal(got, want)
    torch.testing.assert_close(out, manual_forward(big, x, want, keep_count(0.5, 64)), rtol=0, atol=0)
    assert isinstance(pruned.scorer, ModelRolloutScorer) and pruned.scorer.name == "model-rollout"


def test_grad_variant_is_the_scorer_models_gradient_rollout():
    big, small, x = tiny_vit(), small_vit(), images_for("vit")
    sc = make_scorer("model-grad-rollout", scorer_model=small)
    want = rollout_fast.AttentionRollout(small).grad_rollout(x).flatten(1)
    with torch.inference_mode():
        got = sc.score(big, x)
    assert sc.name == "model-grad-rollout" and torch.equal(got, want)
    assert all(p.grad is None for p in small.parameters())


def test_input_resized_and_renormalised_for_the_scorer_model():
    """A scorer model built for 64 px with patch 8 has the 8x8 grid of a 32 px / patch 4 model: the 32 px images
    are resized (bilinear, antialiased) to 64 px, and re-normalised from the images' mean/std to its own."""
    big, x = tiny_vit(), images_for("vit")
    small = small_vit(img_size=64, patch_size=8)
    norm_in, norm_model = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3))
    sc = make_scorer("model-rollout", scorer_model=(small, {"mean": norm_model[0], "std": norm_model[1]}),
                     image_norm=norm_in, rollout_discard_ratio=0.0)
    sc.check_model(big)
    raw = x * 0.5 + 0.5
    m, s = (torch.tensor(t).view(1, 3, 1, 1) for t in norm_model)
    expect_in = F.interpolate((raw - m) / s, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(sc.prepare(x), expect_in, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(sc.score(big, x),
                                   rollout_fast.AttentionRollout(small, discard_ratio=0.0)(expect_in).flatten(1),
                                   rtol=1e-5, atol=1e-6)
    same = ModelRolloutScorer(small, renormalize=(norm_in, norm_in))
    assert same.renormalize is None and same.input_size == (64, 64) and same.grid == (8, 8)


def test_scorer_model_with_another_grid_is_refused_before_any_forward():
    big = tiny_vit()  # 32 px, patch 4: 8x8
    calls = []
    other = small_vit(patch_size=8)  # 32 px, patch 8: 4x4
    other.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as e:
        prune_tokens(big, 0.5, "model-rollout", scorer_model=other)
    assert str(e.value) == ("scorer model: its patch grid is 4x4 at its 32x32 input, the pruned model's is 8x8; "
                            "use a scorer model with the same patch grid")
    assert calls == []


def test_missing_or_bad_scorer_model_errors():
    with pytest.raises(ValueError) as e:
        prune_tokens(tiny_vit(), 0.5, "model-rollout")
    assert str(e.value) == ("scorer: 'model-rollout' needs scorer_model= (a ViT, or a name for "
                            "rollout_fast.zoo.load_teacher: 'cifar10-vit', a timm name, a .safetensors path; "
                            "--scorer-model on the command line)")
    with pytest.raises(ValueError) as e:
        ModelRolloutScorer(small_vit(), method="gradient")
    assert str(e.value) == "method: expected one of ('attention', 'grad'), got 'gradient'"
    with pytest.raises(ValueError, match=r"^renormalize: expected \(\(mean, std\), \(model_mean, model_std\)\)"):
        ModelRolloutScorer(small_vit(), renormalize=((0.5, 0.5), (0.5, 0.5)))
    with pytest.raises(ValueError, match=r"^scorer_model: expected a ViT module"):
        make_scorer("model-rollout", scorer_model=3)


def test_keep_one_is_the_unpruned_model_and_the_name_loads_through_the_zoo():
    big, x = tiny_vit(), images_for("vit")
    with torch.no_grad():
        assert torch.equal(prune_tokens(big, 1.0, "model-rollout", scorer_model=small_vit())(x), big(x))
    sc = make_scorer("model-rollout", scorer_model="cifar10-vit")  # the embedded teacher, by name
    assert sc.grid == (8, 8) and sc.input_size == (32, 32)
