"""Helpers shared by the capture tests (pytest puts tests/ on sys.path, so test files import this module)."""

from __future__ import annotations

import copy

import torch


def peaky_vit(builder):
    """``builder()`` seeded, with its qkv weights scaled by 8 (peakier attention than timm's init, so
    rollout maps are far from uniform), in eval mode."""
    torch.manual_seed(1)
    model = builder()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8.0)
    return model.eval()


def explicit_attention(model, images):
    """Per-head attention from a deep copy running timm's non-fused path, hooked at attn_drop:
    ``(logits, (L, B, H, N, N) attention)``."""
    twin = copy.deepcopy(model).eval()
    probs = []
    for blk in twin.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.detach()))
    with torch.no_grad():
        logits = twin(images)
    return logits, torch.stack(probs)
