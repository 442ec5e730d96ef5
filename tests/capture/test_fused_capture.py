"""The fused attention capture in timm models: the capture paths give the rollout of the explicit
attention, the model's outputs stay its SDPA outputs, and the model is left unchanged, also when the forward
raises. The kernels themselves: tests/ops/test_attention.py.
"""

from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import HAS_GPU, explicit, explicit_attention, make_qkv, peaky_vit

from rollout_fast import AttentionRollout, reference
from rollout_fast.capture import capture_attention

# ------------------------------------------------------------------------------------- model capture
ARCHS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=48, depth=3), (48, 48), 1, (3, 3)),
    "deit_distilled": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2),
                       (64, 64), 2, (4, 4)),
    "registers_qknorm": (lambda: timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, qk_norm=True, init_values=0.5,
                                                               reg_tokens=2, num_classes=5),
                         (32, 32), 3, (4, 4)),
}


def _build(name):
    builder, size, P, grid = ARCHS[name]
    return peaky_vit(builder), size, P, grid


@pytest.mark.triton
def test_triton_capture_in_a_model(triton_device):
    """capture='fused-triton': the Triton kernel answers every block's SDPA call; rollout equals the
    explicit attention's, logits equal the plain forward's."""
    model, (H, W), P, grid = _build("registers_qknorm")
    model = model.to(triton_device)
    images = torch.randn(2, 3, H, W, device=triton_device)
    explainer = AttentionRollout(model, head_fusion="max", discard_ratio=0.5, capture="fused-triton")
    maps, logits = explainer.explain(images)
    assert explainer.info["last_capture"] == "fused-triton"
    logits_ref, att = explicit_attention(model.cpu(), images.cpu())
    want = reference.attention_rollout(att, head_fusion="max", discard_ratio=0.5, num_prefix_tokens=P, grid=grid)
    torch.testing.assert_close(maps.cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.cpu(), logits_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("capture", ["auto", "fused-chunked", "qk-hooks"])
@pytest.mark.parametrize("head_fusion, discard", [("mean", 0.0), ("min", 0.9)])
def test_capture_paths_equalexplicit_attention(name, capture, head_fusion, discard):
    model, (H, W), P, grid = _build(name)
    images = torch.randn(3, 3, H, W)
    _, att = explicit_attention(model, images)
    readout = "cls" if model.cls_token is not None else "mean"
    want = reference.attention_rollout(att, head_fusion=head_fusion, discard_ratio=discard, num_prefix_tokens=P,
                                       grid=grid, readout=readout)
    explainer = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard, capture=capture)
    maps, logits = explainer.explain(images)
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = model(images)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # the model's SDPA output
    ran = "fused-chunked" if capture == "auto" else capture  # no GPU: auto is the chunked path on the CPU
    if capture != "auto" or not HAS_GPU:
        assert explainer.info["last_capture"] == ran
        assert f"last_capture={ran!r}" in repr(explainer) and f"capture={capture!r}" in repr(explainer)
    assert explainer.info["last_layer_captures"] == (explainer.info["last_capture"],) * len(model.blocks)


def test_capture_returns_one_preallocated_buffer_and_reports_path():
    model, (H, W), _, _ = _build("vit")
    res = capture_attention(model, torch.randn(2, 3, H, W), capture="fused-chunked")
    output, attention = res
    assert attention.shape == (3, 2, 1, 10, 10) and attention.is_contiguous()
    assert res.path == "fused-chunked" and res.output is output
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, 1, 10))  # mean fusion: rows sum to 1


def test_unfused_blocks_are_read_at_attn_drop():
    """Blocks running timm's explicit path (fused_attn False) never call SDPA: their exact probabilities are
    read at attn_drop."""
    model, (H, W), _, _ = _build("vit")
    mixed = copy.deepcopy(model)
    mixed.blocks[1].attn.fused_attn = False
    images = torch.randn(2, 3, H, W)
    explainer = AttentionRollout(mixed, discard_ratio=0.5)
    maps = explainer(images)
    assert explainer.info["last_layer_captures"] == ("fused-chunked", "attn-drop", "fused-chunked")
    assert explainer.info["last_capture"] == "fused-chunked+attn-drop"
    torch.testing.assert_close(maps, AttentionRollout(model, discard_ratio=0.5)(images), rtol=1e-4, atol=1e-5)


def test_bfloat16_model_on_cpu():
    model, (H, W), _, _ = _build("deit_distilled")
    images = torch.randn(2, 3, H, W)
    want = AttentionRollout(model)(images)
    low = copy.deepcopy(model).to(torch.bfloat16)
    maps, logits = AttentionRollout(low).explain(images.to(torch.bfloat16))
    with torch.no_grad():
        plain = low(images.to(torch.bfloat16))
    assert maps.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), plain.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(maps, want, rtol=0.05, atol=0.05)


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


def test_model_unchanged_even_when_the_forward_raises():
    model, (H, W), _, _ = _build("vit")
    model.train()
    hooks = _hooks(model)
    flags = [m.training for m in model.modules()]
    images = torch.randn(2, 3, H, W)

    def boom(module, args, output):
        raise RuntimeError("boom inside attention")

    handle = model.blocks[1].attn.proj.register_forward_hook(boom)  # fires while the SDPA mode is pushed
    try:
        with pytest.raises(RuntimeError, match="boom inside attention"):
            AttentionRollout(model)(images)
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0, "the SDPA interception mode was left pushed"
    assert _hooks(model) == hooks
    assert [m.training for m in model.modules()] == flags
    with torch.no_grad():  # and SDPA calls outside rollout are not intercepted any more
        q, k, v = make_qkv(1, 2, 5, 8)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), explicit(q, k, v, "mean")[0])


def test_capture_choice_errors():
    model, (H, W), _, _ = _build("vit")
    with pytest.raises(ValueError, match="capture: expected one of"):
        AttentionRollout(model, capture="flash")
    if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="capture: 'fused-triton' cannot run on cpu"):
            AttentionRollout(model, capture="fused-triton")(torch.randn(1, 3, H, W))
    with pytest.raises(ValueError, match="capture: 'fused-chunked' keeps only head-fused"):
        capture_attention(model, torch.randn(1, 3, H, W), head_fusion=None, capture="fused-chunked")
    per_head = capture_attention(model, torch.randn(1, 3, H, W), head_fusion=None)  # auto -> qk-hooks
    assert per_head.path == "qk-hooks" and per_head.attention.shape == (3, 1, 3, 10, 10)
