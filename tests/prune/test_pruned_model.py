"""The pruned model (rollout_fast.prune.prune_tokens, PrunedViT): correctness on the timm ViT kinds, errors.

The pruned forward is checked against a hand-written one (patch_embed -> _pos_embed -> reference top-k
gather -> norm_pre -> blocks -> norm -> head) on small random-weight timm models of every kind the
foundation issue covers (class token, distilled, registers, q/k norm + LayerScale, no class token,
non-square and dynamic image size); keep 1.0 must give the unpruned model's output exactly, and the original
model must come out unchanged (same modules, parameters, outputs).
"""

from __future__ import annotations

import pytest
import torch
from prune_testing import MODELS, StandInStudent, images_for, manual_forward
from torch.overrides import TorchFunctionMode

from rollout_fast.capture import UnsupportedModelError, token_layout
from rollout_fast.prune import StudentScorer, keep_count, prune_tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_forward_equals_hand_written_forward(name):
    model = MODELS[name]()
    x = images_for(name)
    gh, gw = token_layout(model, tuple(x.shape[-2:])).grid
    G = gh * gw
    scores = torch.randn(x.shape[0], G, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        for ratio in (0.5, 0.1, 1 / G):
            k = keep_count(ratio, G)
            pruned = prune_tokens(model, ratio, lambda im: scores)
            out = pruned(x)
            torch.testing.assert_close(out, manual_forward(model, x, scores, k), rtol=1e-5, atol=1e-6)
            assert tuple(pruned.last_indices.shape) == (x.shape[0], k)
            assert not torch.allclose(out, full, atol=1e-4), "pruning changed nothing: the test proves nothing"
        assert torch.equal(prune_tokens(model, 1.0, lambda im: scores)(x), full)


@pytest.mark.parametrize("scorer", ["random", "rollout", "grad-rollout", "cls-attention"])
def test_keep_one_equals_unpruned_model_exactly(scorer):
    model = MODELS["deit-distilled"]()
    x = images_for("vit", B=5)
    with torch.no_grad():
        assert torch.equal(prune_tokens(model, 1.0, scorer)(x), model(x))


def _snapshot(model):
    return ([(n, id(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            [(id(m), m.training) for m in model.modules()])


def test_original_model_is_not_modified():
    model = MODELS["qknorm-layerscale"]()
    x = images_for("vit")
    before = _snapshot(model)
    patch_drop = model.patch_drop
    fused = [blk.attn.fused_attn for blk in model.blocks]
    with torch.no_grad():
        out_before = model(x)
        pruned = prune_tokens(model, 0.5, "cls-attention")
        pruned(x)
        prune_tokens(model, 0.25, "rollout")(x)
        out_after = model(x)
    after = _snapshot(model)
    assert model.patch_drop is patch_drop and not isinstance(model.patch_drop, type(pruned.pruner))
    assert before[0] == after[0] and before[2] == after[2]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert torch.equal(out_before, out_after)
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    # parameters are shared, not copied
    assert pruned.vit.blocks is model.blocks and pruned.vit.cls_token is model.cls_token


class _CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.lengths = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.lengths.append(args[0].shape[2])
        return func(*args, **(kwargs or {}))


def test_fused_attention_runs_on_the_short_sequence():
    model = MODELS["vit"]()
    assert all(blk.attn.fused_attn for blk in model.blocks)
    x = images_for("vit")
    pruned = prune_tokens(model, 0.25, "random")
    with torch.no_grad(), _CountSDPA() as mode:
        pruned(x)
    assert mode.lengths == [1 + keep_count(0.25, 64)] * len(model.blocks)


def test_static_shapes_for_a_fixed_ratio():
    model = MODELS["registers"]()
    pruned = prune_tokens(model, 0.4, "random", seed=3)
    for B in (1, 4):
        with torch.no_grad():
            pruned(images_for("vit", B))
        assert tuple(pruned.last_indices.shape) == (B, keep_count(0.4, 64))
        assert bool((pruned.last_indices.diff(dim=1) > 0).all()), "kept indices must be ascending"


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_keep_ratio(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        prune_tokens(MODELS["vit"](), ratio, "random")


@pytest.mark.parametrize("scores, match", [
    (lambda im: torch.rand(im.shape[0], 63), "shape"),
    (lambda im: torch.rand(im.shape[0], 4, 16), "shape"),
    (lambda im: torch.rand(im.shape[0] + 1, 64), "shape"),
    (lambda im: torch.full((im.shape[0], 64), float("nan")), "NaN or infinite"),
    (lambda im: torch.full((im.shape[0], 8, 8), float("inf")), "NaN or infinite"),
    (lambda im: torch.ones(im.shape[0], 64, dtype=torch.int64), "floating-point"),
    (lambda im: None, "floating-point"),
])
def test_bad_scorer_output(scores, match):
    pruned = prune_tokens(MODELS["vit"](), 0.5, scores)
    with pytest.raises(ValueError, match=match):
        pruned(images_for("vit"))


def test_student_grid_mismatch():
    model = MODELS["vit"]()
    with pytest.raises(ValueError, match="student: predicts a 7x7 grid but the model's patch grid is 8x8"):
        prune_tokens(model, 0.5, "student", student=StandInStudent((7, 7)))
    bare = lambda im: torch.rand(im.shape[0], 7, 7)
    with pytest.raises(ValueError, match="shape \\(3, 7, 7\\)"):
        prune_tokens(model, 0.5, StudentScorer(bare))(images_for("vit"))


def test_bad_scorer_and_model():
    model = MODELS["vit"]()
    with pytest.raises(ValueError, match="scorer: expected one of"):
        prune_tokens(model, 0.5, "entropy")
    with pytest.raises(ValueError, match="needs student="):
        prune_tokens(model, 0.5, "student")
    with pytest.raises(TypeError, match="scorer"):
        prune_tokens(model, 0.5, 3)
    with pytest.raises(UnsupportedModelError):
        prune_tokens(torch.nn.Linear(3, 3), 0.5, "random")
    with pytest.raises(UnsupportedModelError, match="no class token"):  # at construction, not at the forward
        prune_tokens(MODELS["no-class-token"](), 0.5, "cls-attention")


# Families whose blocks use position by token index (issue 12): refused by prune_tokens itself, with the
# reason, never at the first forward or as an AttributeError.
REFUSED = {
    "vit_relpos_small_patch16_224": ("relative-position bias", {}),
    "beit_base_patch16_224": ("relative-position bias", {"embed_dim": 64, "num_heads": 4}),
    "eva02_tiny_patch14_224": ("rotary position embeddings", {}),
    "vit_small_patch16_rope_224": ("rotary position embeddings", {"embed_dim": 64, "num_heads": 4}),
}


@pytest.mark.parametrize("timm_name", sorted(REFUSED))
@pytest.mark.parametrize("scorer", ["random", "cls-attention"])
def test_rope_and_relative_bias_models_are_refused_at_prune_tokens(timm_name, scorer):
    import timm

    why, kw = REFUSED[timm_name]
    model = timm.create_model(timm_name, depth=1, img_size=64, num_classes=3, **kw)
    with pytest.raises(UnsupportedModelError, match=why):
        prune_tokens(model, 0.5, scorer)
