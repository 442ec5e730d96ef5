"""Capture from timm ViTs (fused attention on) equals an explicit non-fused attention computation,
and leaves the model exactly as it was. ``AttentionRollout`` runs its default capture ('auto': the
fused-chunked path on the CPU, see test_fused_capture.py for every path); the per-head capture is the
'qk-hooks' path."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import explicit_attention, peaky_vit
from torch import nn

from rollout_fast import AttentionRollout, reference
from rollout_fast.capture import UnsupportedModelError, capture_attention, token_layout

# name -> (builder, input (H, W), expected prefix tokens, expected grid)
ARCHS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3), (64, 64), 1, (4, 4)),
    "deit_distilled": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=3),
                       (64, 64), 2, (4, 4)),
    "registers": (lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2,
                                            embed_dim=64, num_heads=4), (56, 56), 5, (4, 4)),
    "nonsquare_48x32": (lambda: timm.models.VisionTransformer(img_size=(48, 32), patch_size=8, embed_dim=64,
                                                              depth=3, num_heads=4, num_classes=7),
                        (48, 32), 1, (6, 4)),
    "qknorm_layerscale": (lambda: timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3,
                                                                num_heads=4, qk_norm=True, init_values=0.5),
                          (32, 32), 1, (4, 4)),
    "no_class_token_gap": (lambda: timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                                 num_heads=2, class_token=False,
                                                                 global_pool="avg", reg_tokens=1),
                           (32, 32), 1, (4, 4)),
}


def _build(name):
    builder, size, P, grid = ARCHS[name]
    return peaky_vit(builder), size, P, grid


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("head_fusion,discard", [("mean", 0.0), ("max", 0.9), ("min", 0.5)])
def test_captured_rollout_equalsexplicit_attention(name, head_fusion, discard):
    model, (H, W), P, grid = _build(name)
    images = torch.randn(3, 3, H, W)
    layout = token_layout(model, (H, W))
    assert (layout.num_prefix_tokens, layout.grid) == (P, grid)

    logits_ref, att = explicit_attention(model, images)
    readout = "cls" if model.cls_token is not None else "mean"
    want = reference.attention_rollout(att, head_fusion=head_fusion, discard_ratio=discard,
                                       num_prefix_tokens=P, grid=grid, readout=readout)
    explainer = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard)
    maps, logits = explainer.explain(images)
    assert maps.shape == (3, *grid) and maps.dtype == torch.float32
    # fp32 attention rebuilt from the same q, k: equal to ~1e-6; SDPA vs explicit logits likewise.
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    if discard == 0.0:
        assert maps.std() > 0.01  # maps are informative, not uniform


def test_per_head_capture_equalsexplicit_attention():
    model, (H, W), _, _ = _build("qknorm_layerscale")
    images = torch.randn(2, 3, H, W)
    _, want = explicit_attention(model, images)
    _, got = capture_attention(model, images, head_fusion=None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_model_is_unchanged_after_calls():
    model, (H, W), _, _ = _build("deit_distilled")
    model.train()  # user's mode must be restored; dropout rates are 0 so outputs are deterministic
    model.head.train(False)
    images = torch.randn(2, 3, H, W)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    hooks = _hooks(model)
    flags = [m.training for m in model.modules()]
    fused = [blk.attn.fused_attn for blk in model.blocks]
    with torch.no_grad():
        before = model(images)
    explainer = AttentionRollout(model, discard_ratio=0.9)
    first = explainer(images)
    for _ in range(3):
        again = explainer(images)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert _hooks(model) == hooks
    assert [m.training for m in model.modules()] == flags
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert torch._C._len_torch_function_stack() == 0  # the SDPA interception is gone


def test_batch_of_one_equals_rows_of_batch():
    model, (H, W), _, _ = _build("vit")
    images = torch.randn(4, 3, H, W)
    explainer = AttentionRollout(model)
    batch = explainer(images)
    for i in range(4):
        torch.testing.assert_close(explainer(images[i:i + 1])[0], batch[i], rtol=1e-5, atol=1e-6)


def test_dynamic_image_size_reads_grid_from_input():
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          dynamic_img_size=True).eval()
    maps = AttentionRollout(model)(torch.randn(2, 3, 40, 24))
    assert maps.shape == (2, 5, 3)


def test_works_with_grad_enabled_and_leaves_no_graph():
    model, (H, W), _, _ = _build("vit")
    maps = AttentionRollout(model)(torch.randn(1, 3, H, W))
    assert not maps.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_on_cuda_matches_cpu():
    model, (H, W), _, _ = _build("registers")
    images = torch.randn(2, 3, H, W)
    cpu = AttentionRollout(model)(images)
    gpu = AttentionRollout(model.cuda())(images.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)


def test_not_a_vit_is_rejected_clearly():
    with pytest.raises(UnsupportedModelError, match="model"):
        AttentionRollout(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="model"):
        AttentionRollout(timm.create_model("resnet18", num_classes=10))


def test_bad_explainer_arguments():
    model, (H, W), _, _ = _build("vit")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="sum")
    with pytest.raises(ValueError, match="readout"):
        AttentionRollout(model, readout="full")
    with pytest.raises(ValueError, match="images"):
        AttentionRollout(model)(torch.randn(3, H, W))
    with pytest.raises(ValueError, match="images"):
        AttentionRollout(model)(torch.randn(1, 3, H + 16, W))
