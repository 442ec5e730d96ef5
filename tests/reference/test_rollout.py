"""The reference rollout against an independent, plainly written per-sample loop (float64, sorting).

Inputs are quantised to multiples of 2**-16 (``_attention``): every fp32/fp16/bf16 cast of them is
still such a multiple, head sums of up to 12 of them are exact in fp32, so the fused values and hence
the discard decisions (including ties) are identical in the fp32 reference and the fp64 loop; what is
left is fp32 rounding of the normalisation and of L chained (N, N) products. Tolerance: a fp32 dot
product of N <= 197 terms has relative error <~ N * 6e-8 in the worst case; L <= 4 chained products
stay under 1e-4 relative, and typical errors are ~1e-6, so rtol 1e-4 / atol 1e-6 on maps in [0, 1].
"""

from __future__ import annotations

import math

import pytest
import torch

import rollout_fast
from rollout_fast import reference

# (N, P, grid) with N - P = gh * gw; grid None where it is square and must be inferred.
LAYOUTS = [(5, 1, None), (50, 1, None), (65, 1, None), (197, 1, None),
           (5, 2, (1, 3)), (50, 2, (6, 8)), (65, 2, (7, 9)), (197, 2, (13, 15)),
           (50, 5, (5, 9)), (65, 5, (6, 10)), (197, 5, (12, 16))]
FUSIONS = ["mean", "max", "min"]
DISCARDS = [0.0, 0.5, 0.9, 0.97]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL, ATOL = 1e-4, 1e-6


def _attention(L, B, H, N, quantum=2.0 ** -16, dtype=torch.float32):
    """Softmax attention (rows sum to ~1) quantised to multiples of ``quantum``: ties at small N."""
    logits = torch.randn(L, B, H, N, N) * 2.0
    att = (logits.softmax(-1) / quantum).round() * quantum
    return att.to(dtype)


def _loop_rollout(att, head_fusion, discard_ratio, P, protect=True):
    """vit-explain's algorithm, defects fixed, one sample at a time in float64 with explicit loops."""
    L, B, H, N, _ = att.shape
    out = []
    for b in range(B):
        R = torch.eye(N, dtype=torch.float64)
        for layer in range(L):
            heads = att[layer, b].double()
            if head_fusion == "mean":
                F = sum(heads[h] for h in range(H)) / H
            elif head_fusion == "max":
                F = heads[0].clone()
                for h in range(1, H):
                    F = torch.maximum(F, heads[h])
            else:
                F = heads[0].clone()
                for h in range(1, H):
                    F = torch.minimum(F, heads[h])
            k = math.floor(discard_ratio * N * N)
            if k >= 1:
                values = sorted(F.flatten().tolist())
                t = values[k]  # the (k+1)-th smallest, duplicates counted
                keep00 = F[0, 0].item()
                F = torch.where(F < t, torch.zeros_like(F), F)
                if protect and P >= 1:
                    F[0, 0] = keep00
            M = F + torch.eye(N, dtype=torch.float64)
            for i in range(N):
                M[i] = M[i] / M[i].sum()
            R = M @ R
        out.append(R)
    return torch.stack(out)  # (B, N, N) float64


def _max_norm(m):
    hi = m.amax(dim=-1, keepdim=True)
    return torch.where(hi > 0, m / hi.clamp_min(1e-300), torch.zeros_like(m))


CASES = [(n, p, g, f, d) for (n, p, g) in LAYOUTS for f in FUSIONS for d in DISCARDS]


@pytest.mark.parametrize("N,P,grid,fusion,discard", CASES)
def test_reference_matches_independent_loop(N, P, grid, fusion, discard):
    i = CASES.index((N, P, grid, fusion, discard))
    B = (1, 3)[i % 2]
    dtype = DTYPES[i % 3]
    L, H = (2, 3) if N >= 197 else (4, 3)
    att = _attention(L, B, H, N, quantum=2.0 ** -16 if i % 4 else 2.0 ** -8, dtype=dtype)
    gh, gw = grid or (math.isqrt(N - P),) * 2
    R = _loop_rollout(att, fusion, discard, P)
    expected = {"full": R, "cls": R[:, 0, P:], "mean": R[:, P:, P:].mean(1)}
    for readout, want in expected.items():
        got = reference.attention_rollout(att, head_fusion=fusion, discard_ratio=discard,
                                          num_prefix_tokens=P, grid=grid, readout=readout)
        assert got.dtype == torch.float32
        if readout == "full":
            assert got.shape == (B, N, N)
            torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
        else:
            assert got.shape == (B, gh, gw)
            torch.testing.assert_close(got.reshape(B, -1).double(), _max_norm(want), rtol=RTOL, atol=ATOL)


def test_sequence_and_stacked_inputs_agree_and_public_entry_point_calls_reference():
    att = _attention(3, 2, 4, 50)
    stacked = reference.attention_rollout(att, discard_ratio=0.5)
    as_list = reference.attention_rollout(list(att), discard_ratio=0.5)
    public = rollout_fast.attention_rollout(tuple(att), discard_ratio=0.5, backend="reference")
    torch.testing.assert_close(stacked, as_list, rtol=0, atol=0)
    torch.testing.assert_close(stacked, public, rtol=0, atol=0)


def test_non_contiguous_input_equals_contiguous():
    att = _attention(2, 3, 3, 65)
    non_contig = att.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not non_contig.is_contiguous()
    torch.testing.assert_close(reference.attention_rollout(non_contig, discard_ratio=0.9),
                               reference.attention_rollout(att, discard_ratio=0.9), rtol=0, atol=0)


def test_rows_of_each_layer_matrix_sum_to_one():
    att = _attention(1, 3, 4, 50)
    for fusion in FUSIONS:
        fused = reference.discard_lowest(reference.fuse_heads(att[0], fusion), 0.9)
        M = reference.residual_normalize(fused)
        torch.testing.assert_close(M.sum(-1), torch.ones(3, 50), rtol=1e-6, atol=1e-6)


def test_batch_one_without_discard_is_plain_product_of_half_residual():
    L, N = 4, 65
    att = torch.randn(L, 1, 6, N, N).softmax(-1)  # rows sum to 1, so M = (mean_h A + I) / 2
    R = torch.eye(N, dtype=torch.float64)
    for layer in range(L):
        R = ((att[layer, 0].double().mean(0) + torch.eye(N, dtype=torch.float64)) / 2) @ R
    got = reference.attention_rollout(att, readout="full")[0]
    torch.testing.assert_close(got.double(), R, rtol=1e-5, atol=1e-7)


def test_discard_keeps_all_ties_at_threshold():
    fused = torch.full((2, 7, 7), 0.25)
    fused[1, 3, 3] = 0.1  # the single smallest in sample 1
    out = reference.discard_lowest(fused, 0.5)
    assert torch.equal(out[0], fused[0])  # k = 24 < 49 entries, all tied at t: nothing discarded
    assert out[1, 3, 3] == 0 and (out[1] > 0).sum() == 48


def test_discard_is_per_sample_and_zeroes_exactly_k_without_ties():
    fused = torch.rand(3, 10, 10) + 0.01
    out = reference.discard_lowest(fused, 0.5, protect_first=False)
    for b in range(3):
        assert (out[b] == 0).sum() == 50  # each sample, not only sample 0 (vit-explain's defect)
        assert out[b][out[b] > 0].min() >= fused[b].flatten().sort().values[50]


def test_first_prefix_self_attention_is_protected_unless_switched_off():
    fused = torch.rand(1, 6, 6) + 0.5
    fused[0, 0, 0] = 0.0001
    assert reference.discard_lowest(fused, 0.5)[0, 0, 0] == 0.0001
    assert reference.discard_lowest(fused, 0.5, protect_first=False)[0, 0, 0] == 0
    att = fused.unsqueeze(1).unsqueeze(0)
    a = reference.attention_rollout(att, discard_ratio=0.5, readout="full")
    b = reference.attention_rollout(att, discard_ratio=0.5, readout="full", protect_prefix=False)
    assert not torch.allclose(a, b)


def test_discard_changes_the_map():
    att = _attention(4, 2, 3, 50)
    assert not torch.allclose(reference.attention_rollout(att), reference.attention_rollout(att, discard_ratio=0.9))


def test_normalisations_and_zero_maps_stay_zero():
    maps = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]]])
    mx = reference.normalize_maps(maps, "max")
    mm = reference.normalize_maps(maps, "minmax")
    assert torch.equal(mx[0], torch.zeros(2, 2)) and torch.equal(mm[0], torch.zeros(2, 2))
    torch.testing.assert_close(mx[1], maps[1] / 4)
    torch.testing.assert_close(mm[1], (maps[1] - 1) / 3)
    assert torch.equal(reference.normalize_maps(maps, None), maps)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(discard_ratio=1.0), ValueError, "discard_ratio"),
    (dict(discard_ratio=-0.1), ValueError, "discard_ratio"),
    (dict(discard_ratio="0.5"), TypeError, "discard_ratio"),
    (dict(head_fusion="median"), ValueError, "head_fusion"),
    (dict(readout="first"), ValueError, "readout"),
    (dict(normalize="sum"), ValueError, "normalize"),
    (dict(grid=(5, 10)), ValueError, "grid"),
    (dict(num_prefix_tokens=2), ValueError, "grid"),  # 48 patches: not square, no grid given
    (dict(num_prefix_tokens=0), ValueError, "readout"),  # 'cls' needs a class token
    (dict(num_prefix_tokens=50), ValueError, "num_prefix_tokens"),
    (dict(backend="cuda-fast"), ValueError, "backend"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    att = _attention(2, 1, 2, 50)
    with pytest.raises(exc, match=name):
        rollout_fast.attention_rollout(att, **kwargs)


def test_bad_attention_inputs():
    with pytest.raises(ValueError, match="attentions"):
        reference.attention_rollout(torch.rand(2, 3, 5, 5))  # rank 4 tensor
    with pytest.raises(ValueError, match="attentions"):
        reference.attention_rollout([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 6, 6)])
    with pytest.raises(ValueError, match="attentions"):
        reference.attention_rollout(torch.rand(1, 1, 2, 5, 6))
    with pytest.raises(TypeError, match="attentions"):
        reference.attention_rollout(torch.ones(1, 1, 1, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="attentions"):
        reference.attention_rollout("not attention")
    bad = torch.rand(1, 1, 2, 5, 5)
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="attentions.*NaN"):
        reference.attention_rollout(bad)
    bad[0, 0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="attentions"):
        reference.attention_rollout(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_all_finite_finds_each_kind_of_non_finite_value(dtype, bad):
    x = torch.rand(2, 3, 4, 5, 5).to(dtype).transpose(-1, -2)  # non-contiguous too
    if bad is not None:
        x[1, 2, 3, 4, 0] = bad
    assert reference.all_finite(x) is (bad is None)


def test_scalar_arguments_of_any_real_type():
    """numpy scalars and 0-d tensors are numbers too (issue 12: np.float32(0.5) was rejected)."""
    import numpy as np

    att = torch.rand(2, 1, 2, 5, 5).softmax(-1)
    want = reference.attention_rollout(att, discard_ratio=0.5, num_prefix_tokens=1, grid=(2, 2))
    for ratio, prefix, grid in ((np.float32(0.5), np.int64(1), (np.int64(2), 2)),
                                (torch.tensor(0.5), torch.tensor(1), (2, 2)), (np.float64(0.5), 1, (2, 2))):
        got = reference.attention_rollout(att, discard_ratio=ratio, num_prefix_tokens=prefix, grid=grid)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad, exc in ((True, TypeError), (np.bool_(True), TypeError), ("0.5", TypeError), (1.0, ValueError)):
        with pytest.raises(exc, match="discard_ratio"):
            reference.attention_rollout(att, discard_ratio=bad, grid=(2, 2))
    with pytest.raises(TypeError, match="num_prefix_tokens"):
        reference.attention_rollout(att, num_prefix_tokens=np.float32(1.0), grid=(2, 2))


def test_empty_sequence_says_how_to_get_attention_from_hugging_face():
    with pytest.raises(ValueError, match='attn_implementation="eager".*rollout_fast.AttentionRollout'):
        reference.attention_rollout(())
