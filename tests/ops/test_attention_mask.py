"""rollout_fast.ops.fused_attention with SDPA's ``attn_mask``: an additive float bias (timm's relative-position
ViTs and BEiT pass theirs to SDPA as ``attn_mask``) or a bool mask (True = take part), broadcast to
(B, H, Nq, Nk). Every kernel ("chunked" PyTorch, "triton" in one and two passes) gives SDPA's output and
the head-fused ``softmax(q k^T * scale + mask)``: float32 F within 2e-6, the output within 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import F32_TOL, make_qkv

from rollout_fast import reference
from rollout_fast.ops import attention as fa
from rollout_fast.reference import fused_attention_reference


def _masks(B, H, N, g):
    """name -> attn_mask, every shape SDPA broadcasts: a per-head bias as relpos/BEiT give it, a full
    (B, H, N, N) bias, a 2-D bias, a bool key-padding mask (B, 1, 1, N) and a bool (N, N) mask."""
    keep = torch.rand(B, 1, 1, N, generator=g) > 0.3
    keep[..., 0] = True  # no row fully masked
    tri = torch.rand(N, N, generator=g) > 0.5
    tri.fill_diagonal_(True)
    return {
        "bias_1hnn": torch.randn(1, H, N, N, generator=g) * 2,
        "bias_bhnn": torch.randn(B, H, N, N, generator=g),
        "bias_nn": torch.randn(N, N, generator=g),
        "bool_keys": keep,
        "bool_nn": tri,
    }


def _explicit(q, k, v, mask, head_fusion):
    qf, kf, vf = q.float(), k.float(), v.float()
    logits = qf @ kf.transpose(-2, -1) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    probs = logits.softmax(-1)
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask), reference.fuse_heads(probs, head_fusion)


def _check(q, k, v, mask, out, fused, head_fusion):
    want_out, want_fused = _explicit(q, k, v, mask, head_fusion)
    torch.testing.assert_close(fused.cpu(), want_fused, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(out.float().cpu(), want_out, rtol=1e-5, atol=1e-5)
    unmasked = fa.fused_attention_chunked(q, k, v, head_fusion=head_fusion)[1]
    assert (unmasked.cpu() - fused.cpu()).abs().max() > 1e-3, "the mask changed nothing: test cannot fail"


@pytest.mark.parametrize("mask_name", ["bias_1hnn", "bias_bhnn", "bias_nn", "bool_keys", "bool_nn"])
@pytest.mark.parametrize("head_fusion", reference.HEAD_FUSIONS)
def test_chunked_with_mask_equals_sdpa(mask_name, head_fusion):
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(3, 2, 17, 8)
    mask = _masks(3, 2, 17, g)[mask_name]
    for chunk_bytes in (fa.DEFAULT_CHUNK_BYTES, 1):
        out, fused = fa.fused_attention_chunked(q, k, v, head_fusion=head_fusion, chunk_bytes=chunk_bytes,
                                                attn_mask=mask)
        _check(q, k, v, mask, out, fused, head_fusion)
    _, ref_fused = fused_attention_reference(q, k, v, head_fusion=head_fusion, attn_mask=mask)
    torch.testing.assert_close(fused, ref_fused, rtol=0, atol=F32_TOL)
    probs = fa.fused_probs_chunked(q, k, scale=8 ** -0.5, head_fusion=head_fusion, attn_mask=mask, chunk_bytes=1)
    torch.testing.assert_close(probs[:, 0], ref_fused, rtol=0, atol=F32_TOL)


@pytest.mark.triton
@pytest.mark.parametrize("mask_name", ["bias_1hnn", "bias_bhnn", "bool_keys"])
@pytest.mark.parametrize("block_n", [None, 16], ids=["one-pass", "two-pass"])
def test_triton_with_mask_equals_sdpa(mask_name, block_n, triton_device):
    g = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 3, 37, 16, device=triton_device)
    mask = _masks(2, 3, 37, g)[mask_name].to(triton_device)
    head_fusion = "mean" if block_n is None else "max"
    out, fused = fa.fused_attention_triton(q.float(), k, v, head_fusion=head_fusion, block_n=block_n,
                                           attn_mask=mask)
    _check(q, k, v, mask.cpu(), out, fused, head_fusion)


def test_opcheck_with_mask():
    q, k, v = make_qkv(2, 3, 17, 16)
    bias = torch.randn(1, 3, 17, 17).expand(2, 3, 17, 17)
    torch.library.opcheck(torch.ops.rollout_fast.fused_attention.default,
                          (q, k, v, torch.empty(2, 17, 17), 0.25, "mean", fa.DEFAULT_CHUNK_BYTES, bias))


@pytest.mark.parametrize("mask, exc, match", [
    ("bias", TypeError, "attn_mask: expected a tensor"),
    (torch.zeros(17, 17, dtype=torch.int64), TypeError, "attn_mask: expected a bool or floating"),
    (torch.zeros(3, 17, 17), ValueError, "attn_mask: shape"),
    (torch.zeros(1, 1, 1, 17, 17), ValueError, "attn_mask: shape"),
])
def test_bad_masks(mask, exc, match):
    q, k, v = make_qkv(2, 2, 17, 8)
    with pytest.raises(exc, match=match):
        fa.fused_attention(q, k, v, attn_mask=mask)
