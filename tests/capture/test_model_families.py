"""Capture from the timm model families users bring: plain ViT, distilled DeiT (2 prefix tokens), DeiT III,
Dinov2 with and without registers, CLIP and SigLIP (no class token) towers, FlexiViT, dynamic image size,
and those whose attention is not plain ``softmax(q k^T * scale)``: relative-position bias passed to SDPA as
``attn_mask`` (vit_relpos, BEiT), rotary embeddings applied after q/k norm (EVA02, RoPE ViTs), a model
without a class token (GAP). Random-init depth-2 models, biases randomised so they matter.

The independent computation is timm's own explicit (non-fused) path on a deep copy, hooked at attn_drop:
the attention the model computes, bias, mask and RoPE included. Every capture path ('auto', 'qk-hooks',
per-head, the explicit path itself) equals it within 1e-5 (float32), maps equal the reference rollout
of it, gradient rollout equals the reference grad rollout of the explicit path's attention and gradient,
and the model is left exactly as it was. Before issue 12 the 'qk-hooks' capture read q and k at
q_norm/k_norm (before RoPE, without the bias) and returned wrong maps without a word.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import explicit_attention
from torch import nn

from rollout_fast import AttentionRollout, reference
from rollout_fast.capture import (
    UnsupportedModelError,
    capture_attention,
    capture_attention_grad,
    token_layout,
)

ATOL = 1e-5
SMALL = dict(depth=2, num_classes=5)
# name -> (timm name, kwargs, input (H, W), prefix tokens, grid)
FAMILIES = {
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 0, (4, 4)),
    "beit": ("beit_base_patch16_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 1, (4, 4)),
    "eva02_rope": ("eva02_tiny_patch14_224", dict(img_size=56), (56, 56), 1, (4, 4)),
    "vit_rope": ("vit_small_patch16_rope_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 1, (4, 4)),
    "gap_no_cls": ("vit_medium_patch16_gap_256", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 0,
                   (4, 4)),
    "vit": ("vit_tiny_patch16_224", dict(img_size=64), (64, 64), 1, (4, 4)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64), (64, 64), 2, (4, 4)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 1, (4, 4)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, embed_dim=64, num_heads=4), (56, 56), 1, (4, 4)),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, embed_dim=64, num_heads=4), (56, 56), 5,
                  (4, 4)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 1, (4, 4)),
    "siglip_no_cls": ("vit_base_patch16_siglip_224", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 0,
                      (4, 4)),
    "flexivit": ("flexivit_small", dict(img_size=64, embed_dim=64, num_heads=4), (64, 64), 1, (4, 4)),
    "dynamic_size": ("vit_tiny_patch16_224", dict(img_size=64, dynamic_img_size=True), (48, 80), 1, (3, 5)),
}
# families whose pruning is refused up front (position information applied inside the blocks)
PRUNE_REFUSED = {"relpos": "relative-position bias", "beit": "relative-position bias", "eva02_rope": "RoPE",
                 "vit_rope": "RoPE"}


def build(name):
    timm_name, kw, size, P, grid = FAMILIES[name]
    torch.manual_seed(3)
    model = timm.create_model(timm_name, **SMALL, **kw).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "rel_pos" in pname or "relative_position" in pname:
                p.normal_(0.0, 1.0)  # zero-initialised tables would make the bias a no-op
            elif pname.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)  # peaky attention: maps far from uniform
    return model, size, P, grid


def _images(size, B=2):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(0))


def _state(model):
    return ([(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            [m.training for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            [getattr(b.attn, "fused_attn", None) for b in model.blocks])


def _assert_unchanged(model, before):
    hooks, flags, state, fused = _state(model)
    assert hooks == before[0] and flags == before[1] and fused == before[3]
    assert all(torch.equal(state[k], v) for k, v in before[2].items())
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_captured_attention_is_the_models_own(name):
    model, size, P, grid = build(name)
    images = _images(size)
    has_cls = name not in ("relpos", "gap_no_cls", "siglip_no_cls")
    assert token_layout(model, size) == token_layout(model, size).__class__(P, grid, has_cls)
    logits_ref, att = explicit_attention(model, images)  # (L, B, H, N, N), timm's explicit path
    before = _state(model)
    for capture in ("auto", "qk-hooks"):
        for head_fusion in ("mean", "max"):
            res = capture_attention(model, images, head_fusion=head_fusion, capture=capture)
            want = reference.fuse_heads(att.flatten(0, 1), head_fusion).unflatten(0, att.shape[:2])
            assert res.path == ("fused-chunked" if capture == "auto" else "qk-hooks")
            torch.testing.assert_close(res.attention[:, :, 0], want, rtol=0, atol=ATOL)
            torch.testing.assert_close(res.output, logits_ref, rtol=1e-4, atol=1e-4)
    per_head = capture_attention(model, images, head_fusion=None)
    torch.testing.assert_close(per_head.attention, att, rtol=0, atol=ATOL)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_explicit_path_models_are_read_at_attn_drop(name):
    """fused_attn=False (the vit-explain recipe): the probabilities at attn_drop, never q/k before RoPE."""
    model, size, _, _ = build(name)
    images = _images(size)
    _, att = explicit_attention(model, images)
    unfused = copy.deepcopy(model)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    for capture in ("auto", "qk-hooks"):
        res = capture_attention(unfused, images, head_fusion="mean", capture=capture)
        assert res.path == "attn-drop"
        torch.testing.assert_close(res.attention[:, :, 0], att.mean(2), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("head_fusion,discard", [("mean", 0.0), ("min", 0.5)])
def test_maps_equal_reference_rollout(name, head_fusion, discard):
    model, size, P, grid = build(name)
    images = _images(size, B=3)
    _, att = explicit_attention(model, images)
    readout = "mean" if name in ("relpos", "gap_no_cls", "siglip_no_cls") else "cls"
    want = reference.attention_rollout(att, head_fusion=head_fusion, discard_ratio=discard,
                                       num_prefix_tokens=P, grid=grid, readout=readout)
    maps = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard)(images)
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=ATOL)
    if discard == 0.0:
        assert maps.std() > 0.01


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grad_capture_includes_bias_and_rope(name):
    """Gradient capture answers SDPA with the explicit softmax(q k^T * scale + bias) of the post-RoPE q, k:
    attention and gradient equal those read at attn_drop of timm's explicit path."""
    model, size, _, _ = build(name)
    images = _images(size)
    fused = capture_attention_grad(model, images, targets=[1, 3])
    unfused = copy.deepcopy(model)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    explicit = capture_attention_grad(unfused, images, targets=[1, 3])
    assert fused.path == "sdpa-explicit" and explicit.path == "attn-drop"
    torch.testing.assert_close(fused.attentions, explicit.attentions, rtol=0, atol=ATOL)
    torch.testing.assert_close(fused.gradients, explicit.gradients, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruning_runs_or_is_refused_up_front(name):
    """keep 1.0 is the unpruned model exactly; keep 0.5 runs on the kept tokens, or prune_tokens refuses."""
    from rollout_fast import prune_tokens
    model, size, P, grid = build(name)
    images = _images(size)
    if name in PRUNE_REFUSED:
        with pytest.raises(UnsupportedModelError, match=PRUNE_REFUSED[name]):
            prune_tokens(model, 0.5, "random")
        return
    with torch.no_grad():
        full = model(images)
        torch.testing.assert_close(prune_tokens(model, 1.0, "rollout")(images), full, rtol=0, atol=0)
        pruned = prune_tokens(model, 0.5, "rollout")
        out = pruned(images)
    G = grid[0] * grid[1]
    assert out.shape == full.shape and pruned.last_indices.shape == (2, int(0.5 * G + 0.5))  # k = round half up


class _CausalAttention(nn.Module):
    """A block attention calling SDPA causally: the capture cannot reproduce it and must say so."""

    def __init__(self, attn):
        super().__init__()
        self.inner, self.num_heads, self.attn_drop = attn, attn.num_heads, attn.attn_drop

    def forward(self, x, **kw):
        B, N, C = x.shape
        q, k, v = self.inner.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.inner.proj(o.transpose(1, 2).reshape(B, N, C))


def test_attention_that_cannot_be_reproduced_is_refused():
    model, size, _, _ = build("gap_no_cls")
    model.blocks[1].attn = _CausalAttention(model.blocks[1].attn)
    for capture in ("auto", "qk-hooks"):
        with pytest.raises(UnsupportedModelError, match=r"blocks\[1\].*causal"):
            AttentionRollout(model, capture=capture)(_images(size))
    with pytest.raises(UnsupportedModelError, match=r"blocks\[1\].*causal"):
        AttentionRollout(model).grad_rollout(_images(size))


def test_flat_grad_rollout_warns_once():
    """Issue 12: grad rollout of a model without a class token came out flat (1/G everywhere) silently."""
    import warnings

    import rollout_fast.explain as ex

    model, size, _, _ = build("gap_no_cls")
    ex._warned_flat = False
    explainer = AttentionRollout(model)
    with pytest.warns(UserWarning, match="flat.*no class token.*AttentionRollout"):
        maps = explainer.grad_rollout(_images(size))
    assert (maps.amax() - maps.amin()) < 1e-3  # the warning is true
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer.grad_rollout(_images(size))  # once


def test_informative_grad_rollout_does_not_warn():
    import warnings

    from helpers import peaky_vit

    import rollout_fast.explain as ex

    ex._warned_flat = False
    model = peaky_vit(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                num_classes=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = AttentionRollout(model).grad_rollout(torch.randn(2, 3, 32, 32))
    assert maps.std() > 0.01


def test_reduced_precision_capture_is_not_held_to_float32_row_sums():
    """bf16 autocast: the captured rows sum to 1 only within bf16 rounding; the capture says what it was
    computed from and AttentionRollout does not apply the float32 row check to it (issue 19's GPU precision)."""
    model, size, P, grid = build("vit")
    images = _images(size, B=4)
    assert capture_attention(model, images).source_dtypes == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = capture_attention(model, images)
        maps = AttentionRollout(model)(images)
    assert res.source_dtypes == {torch.bfloat16}
    want = reference.attention_rollout(res.attention, num_prefix_tokens=P, grid=grid, check_rows=False)
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-6)


def test_reduced_precision_explicit_path_rollout_and_grad_rollout():
    """timm's explicit path under bf16 autocast: probabilities computed in bf16 (rows off by up to ~4e-3), read
    at attn_drop; plain and gradient rollout run on them (checked at bf16 tolerance at capture)."""
    model, size, P, grid = build("vit")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    images = _images(size, B=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = capture_attention(model, images)
        maps = AttentionRollout(model)(images)
        grad_maps = AttentionRollout(model).grad_rollout(images, targets=1)
        cap = capture_attention_grad(model, images, targets=1)
    assert res.path == "attn-drop" and res.source_dtypes == {torch.bfloat16}
    want = reference.attention_rollout(res.attention, num_prefix_tokens=P, grid=grid, check_rows=False)
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-6)
    want_grad = reference.grad_rollout(cap.attentions, cap.gradients, num_prefix_tokens=P, grid=grid)
    torch.testing.assert_close(grad_maps, want_grad, rtol=1e-5, atol=1e-6)
