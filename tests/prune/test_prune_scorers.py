"""The patch scorers (rollout_fast.prune.scorers): what each scores, and the name -> factory registry."""

from __future__ import annotations

import pytest
import torch
from prune_testing import MODELS, StandInStudent, images_for, manual_forward

from rollout_fast.capture import capture_attention
from rollout_fast.prune import (
    ClsAttentionScorer,
    GradRolloutScorer,
    PrunedViT,
    RandomScorer,
    RolloutScorer,
    keep_count,
    prune_tokens,
)


def test_cls_attention_scorer_is_the_captured_class_token_attention():
    model = MODELS["qknorm-layerscale"]()
    x = images_for("vit")
    att = capture_attention(model, x, head_fusion="mean").attention  # (L, B, 1, N, N)
    for block in (0, 1):
        got = ClsAttentionScorer(block).score(model, x)
        torch.testing.assert_close(got, att[block, :, 0, 0, 1:], rtol=1e-4, atol=1e-7)


def test_cls_attention_selects_inside_the_forward():
    """The token-side scorer gives the same kept indices inside the forward as from the images."""
    model = MODELS["deit-distilled"]()
    x = images_for("vit")
    pruned = prune_tokens(model, 0.25, "cls-attention")
    with torch.no_grad():
        pruned(x)
        s = ClsAttentionScorer(0).score(model, x)
    assert torch.equal(pruned.last_indices, s.topk(keep_count(0.25, 64), dim=1).indices.sort(dim=1).values)


def test_rollout_scorer_uses_the_models_rollout():
    import rollout_fast

    model = MODELS["vit"]()
    x = images_for("vit")
    want = rollout_fast.AttentionRollout(model, discard_ratio=0.9)(x).flatten(1)
    assert torch.equal(RolloutScorer().score(model, x), want)
    want0 = rollout_fast.AttentionRollout(model, discard_ratio=0.0)(x).flatten(1)
    assert torch.equal(RolloutScorer(discard_ratio=0.0).score(model, x), want0)


def test_grad_rollout_scorer_uses_the_models_gradient_rollout():
    """The scores are the model's gradient rollout for its predicted class, also under inference mode (the
    scorer runs its backward outside it), and the pruned model's parameters get no ``.grad``."""
    import rollout_fast

    model = MODELS["vit"]()
    x = images_for("vit")
    want = rollout_fast.AttentionRollout(model).grad_rollout(x).flatten(1)
    assert torch.equal(GradRolloutScorer().score(model, x), want)
    with torch.inference_mode():
        got = GradRolloutScorer().score(model, x)
        out = prune_tokens(model, 0.5, "grad-rollout")(x)
    assert torch.equal(got, want)
    kept = keep_count(0.5, want.shape[1])
    assert torch.equal(out, manual_forward(model, x, want, kept))
    assert all(p.grad is None for p in model.parameters())


def test_random_scorer_is_reproducible_and_seed_dependent():
    model = MODELS["vit"]()
    x = images_for("vit")
    a, b, c = RandomScorer(0), RandomScorer(0), RandomScorer(1)
    sa = a.score(model, x)
    assert torch.equal(sa, b.score(model, x)) and not torch.equal(sa, c.score(model, x))
    a.reset()
    assert torch.equal(a.score(model, x), sa)


def test_student_scorer_on_a_thumbnail():
    model = MODELS["vit"]()
    x = images_for("vit")
    student = StandInStudent((8, 8))
    pruned = prune_tokens(model, 0.5, "student", student=student, thumbnail=16)
    with torch.no_grad():
        pruned(x)
    assert student.seen == (16, 16)
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
    want = student(small).flatten(1).topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(pruned.last_indices, want)
    assert isinstance(pruned, PrunedViT) and pruned.student is student


def test_thumbnail_is_refused_for_a_student_that_makes_its_own():
    from rollout_fast.students import create_student

    student = create_student("resnet-cifar", strategy="lowres", factor=2, input_size=(32, 32), grid=(8, 8))
    with pytest.raises(ValueError, match="thumbnail: this student makes its own \\(16, 16\\) thumbnail"):
        prune_tokens(MODELS["vit"](), 0.5, "student", student=student, thumbnail=16)
    assert prune_tokens(MODELS["vit"](), 0.5, "student", student=student) is not None


# ----------------------------------------------------------------------------------------------- registry
def test_registry_lists_the_built_in_scorers_in_order():
    from rollout_fast.prune import SCORERS, scorer_names

    assert SCORERS == ("random", "rollout", "grad-rollout", "cls-attention", "student")
    assert scorer_names()[:len(SCORERS)] == SCORERS


def test_a_new_scorer_is_one_registered_factory():
    from rollout_fast.prune import PatchScorer, make_scorer, register_scorer, scorer_names
    from rollout_fast.prune.scorers import _FACTORIES

    class _FirstPatches(PatchScorer):
        name = "first-patches"

        def __init__(self, seed):
            self.seed = seed

        def score(self, model, images):
            G = keep_count(1.0, 64)
            return torch.arange(G, 0, -1, dtype=torch.float32).expand(images.shape[0], G)

    @register_scorer("first-patches")
    def _first(*, seed=0, **_):
        return _FirstPatches(seed)

    try:
        assert "first-patches" in scorer_names()
        sc = make_scorer("first-patches", seed=5)
        assert isinstance(sc, _FirstPatches) and sc.seed == 5
        pruned = prune_tokens(MODELS["vit"](), 0.25, "first-patches")
        with torch.no_grad():
            pruned(images_for("vit"))
        assert torch.equal(pruned.last_indices, torch.arange(16).expand(3, 16))
        with pytest.raises(ValueError, match="already registered"):
            register_scorer("first-patches")(_first)
    finally:
        _FACTORIES.pop("first-patches", None)
