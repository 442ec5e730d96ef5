"""The fused top-k token gather (rollout_fast.ops.topk_gather) on every backend against torch.topk + torch.gather.

The reference (``topk_gather_reference``) runs ``torch.topk`` on distinct int64 keys (score order, then
lower index first) and ``torch.gather``; it is itself checked against a plain stable sort. Every backend must
return exactly the same tokens and indices (a gather copies values, so equality is bitwise), for every
token dtype, ties, signed zeros, keep counts 1 and G, prefix counts 0..5 and non-contiguous inputs. Triton
runs on CUDA, or on the CPU in its interpreter (``TRITON_INTERPRET=1``, conftest.py); CUDA tests skip
without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_GPU, HAS_TRITON, NO_CUDA_BUILD, compile_for_gpu
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_fast.ops import gather
from rollout_fast.ops.gather import topk_gather
from rollout_fast.reference import topk_gather_reference

HAS_OP = gather.load()
NO_OP = "compiled extension without rollout_fast::topk_gather (rebuild: pip install --no-build-isolation -e .)"
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _backends():
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not HAS_OP, reason=NO_OP)),
        pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU),
                                    pytest.mark.skipif(not (HAS_OP and gather.cuda_built()), reason=NO_CUDA_BUILD)]),
        pytest.param("triton", marks=[pytest.mark.triton,
                                      pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")]),
    ]


def _device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return "cuda"
    if backend == "triton":
        if not gather.triton_ops().INTERPRETED:
            pytest.skip("Triton kernels were built for the GPU in this process; run with TRITON_INTERPRET=1")
    return "cpu"


def _sorted_selection(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent spec: a stable descending sort of float32 scores (+0 for -0), first k, sorted by index."""
    s = scores.float() + 0.0
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def _assert_same(got, want, what=""):
    (kg, ig), (kw, iw) = got, want
    assert ig.dtype == torch.int64 and tuple(ig.shape) == tuple(iw.shape), f"{what} indices {ig.dtype} {ig.shape}"
    assert torch.equal(ig.cpu(), iw.cpu()), f"{what} indices differ: {ig.cpu().tolist()} vs {iw.cpu().tolist()}"
    assert kg.dtype == kw.dtype and kg.shape == kw.shape, f"{what} kept {kg.dtype} {tuple(kg.shape)}"
    assert torch.equal(kg.cpu(), kw.cpu()), f"{what} kept tokens differ"


# ------------------------------------------------------------------------------------- the reference
def test_reference_matches_stable_sort_and_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 0.0, 5.0, 5.0, 5.0, 1.0],
                           [0.0] * 9,
                           [-0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -0.0, 3.0, 3.0]])
    tokens = torch.arange(3 * 10 * 2, dtype=torch.float32).reshape(3, 10, 2)
    kept, idx = topk_gather_reference(tokens, scores, 4, 1)
    assert idx.tolist() == [[1, 5, 6, 7], [0, 1, 2, 3], [0, 2, 7, 8]]
    assert torch.equal(kept[:, 0], tokens[:, 0])
    assert torch.equal(kept[:, 1:], torch.stack([tokens[b, 1 + idx[b]] for b in range(3)]))
    gen = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (6, 50), generator=gen).float() - 1.5
    for k in (1, 7, 25, 50):
        assert torch.equal(topk_gather_reference(torch.zeros(6, 51, 1), s, k, 1)[1], _sorted_selection(s, k))


def test_keep_all_is_identity_and_keep_one_is_argmax():
    tokens = torch.randn(4, 17, 8)
    scores = torch.randn(4, 15)
    kept, idx = topk_gather(tokens, scores, 15, num_prefix_tokens=2)
    assert torch.equal(kept, tokens) and torch.equal(idx, torch.arange(15).expand(4, 15))
    kept, idx = topk_gather(tokens, scores, 1, num_prefix_tokens=2)
    assert torch.equal(idx[:, 0], scores.argmax(1))
    assert torch.equal(kept[:, 2], tokens[torch.arange(4), 2 + scores.argmax(1)])


# ------------------------------------------------------------------------------------------ backends
CASES = [  # (B, N, D, P, k, dtype, layout)
    (1, 65, 192, 1, 32, torch.float32, "contiguous"),
    (3, 197, 64, 1, 1, torch.float16, "contiguous"),
    (2, 197, 64, 1, 196, torch.bfloat16, "sliced"),
    (5, 17, 7, 0, 8, torch.float64, "contiguous"),
    (4, 50, 33, 2, 25, torch.float32, "transposed"),
    (2, 262, 24, 5, 100, torch.float16, "contiguous"),
    (8, 1030, 8, 1, 513, torch.float32, "contiguous"),  # G > one CUDA block of 256, several scan chunks
]


def _make(B, N, D, P, dtype, layout, device, ties, gen):
    tokens = torch.randn(B, N, D, generator=gen).to(dtype)
    if layout == "sliced":
        tokens = torch.randn(B, N + 3, D + 5, generator=gen).to(dtype)[:, 2:N + 2, 3:D + 3]
    elif layout == "transposed":
        tokens = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    G = N - P
    if ties:
        scores = torch.randint(-2, 3, (B, G), generator=gen).float() * 0.5
        scores[scores == 0] = -0.0  # signed zeros must tie with +0
        scores[:, ::3] = 0.0
    else:
        scores = torch.randn(B, G, generator=gen)
    return tokens.to(device), scores.to(device)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-D{c[2]}-P{c[3]}-k{c[4]}-{str(c[5])[6:]}-{c[6]}")
def test_backend_matches_reference(backend, ties, case):
    B, N, D, P, k, dtype, layout = case
    device = _device(backend)
    if backend == "triton" and device == "cpu" and N > 100:
        pytest.skip("large shape: Triton's CPU interpreter is too slow for it; runs on a GPU")
    tokens, scores = _make(B, N, D, P, dtype, layout, device, ties, torch.Generator().manual_seed(N + k))
    got = topk_gather(tokens, scores, k, P, backend=backend)
    assert got[0].device.type == device
    want = topk_gather_reference(tokens.cpu(), scores.cpu(), k, P)
    _assert_same(got, want, backend)
    assert torch.equal(want[1], _sorted_selection(scores.cpu(), k))
    assert got[0].is_contiguous()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k", [1, 2, 31, 63, 64])
def test_keep_counts_with_all_equal_scores(backend, k):
    """Every score equal: the k lowest indices win, on every backend; k = G is the identity."""
    device = _device(backend)
    tokens = torch.randn(3, 65, 16).to(device)
    scores = torch.full((3, 64), 0.25, device=device)
    kept, idx = topk_gather(tokens, scores, k, 1, backend=backend)
    assert idx.cpu().tolist() == [list(range(k))] * 3
    assert torch.equal(kept.cpu(), tokens[:, :1 + k].cpu())


@pytest.mark.parametrize("backend", _backends())
def test_zero_width_tokens_still_select(backend):
    """D = 0: nothing to copy, but the indices are an output too and must equal the reference's."""
    device = _device(backend)
    tokens = torch.zeros(3, 10, 0, device=device)
    scores = torch.randn(3, 9, generator=torch.Generator().manual_seed(3)).to(device)
    got = topk_gather(tokens, scores, 4, 1, backend=backend)
    _assert_same(got, topk_gather_reference(tokens.cpu(), scores.cpu(), 4, 1), backend)


@pytest.mark.skipif(not HAS_OP, reason=NO_OP)
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 4), G=st.integers(1, 80), P=st.integers(0, 3), D=st.integers(1, 9),
       levels=st.integers(1, 6), seed=st.integers(0, 2 ** 31), data=st.data())
def test_cpu_fuzz_against_reference(B, G, P, D, levels, seed, data):
    k = data.draw(st.integers(1, G))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, P + G, D, generator=gen)
    scores = torch.randint(0, levels, (B, G), generator=gen).float() * torch.randn(1, generator=gen)
    _assert_same(topk_gather(tokens, scores, k, P, backend="cpu"), topk_gather_reference(tokens, scores, k, P))


def test_result_responds_to_scores():
    """Guards against a test suite that cannot fail: other scores select other tokens."""
    tokens = torch.randn(2, 10, 4)
    s = torch.arange(9.0).expand(2, 9).clone()
    a = topk_gather(tokens, s, 3, 1)[1]
    b = topk_gather(tokens, -s, 3, 1)[1]
    assert a.tolist() == [[6, 7, 8]] * 2 and b.tolist() == [[0, 1, 2]] * 2


# ------------------------------------------------------------------------------------ op registration
@pytest.mark.skipif(not HAS_OP, reason=NO_OP)
def test_opcheck_compiled_cpu():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        tokens = torch.randn(3, 12, 5, generator=gen).to(dtype)
        torch.library.opcheck(torch.ops.rollout_fast.topk_gather.default, (tokens, torch.randn(3, 11), 4, 1))
    tokens = torch.randn(3, 12, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.rollout_fast.topk_gather.default, (tokens, torch.randn(3, 10), 4, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_OP and gather.cuda_built()), reason=NO_CUDA_BUILD)
def test_opcheck_compiled_cuda():
    tokens = torch.randn(3, 12, 5, device="cuda")
    torch.library.opcheck(torch.ops.rollout_fast.topk_gather.default,
                          (tokens, torch.randn(3, 11, device="cuda"), 4, 1))


@pytest.mark.triton
def test_opcheck_triton():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    device = _device("triton")
    tg = gather.triton_ops()
    tokens = torch.randn(3, 12, 5, device=device)
    torch.library.opcheck(tg.topk_gather_triton._opoverload if hasattr(tg.topk_gather_triton, "_opoverload")
                          else torch.ops.rollout_fast.topk_gather_triton.default,
                          (tokens, torch.randn(3, 11, device=device), 4, 1))


@pytest.mark.parametrize("backend", _backends())
def test_gradient_flows_to_kept_tokens_only(backend):
    device = _device(backend)
    dtype = torch.float64
    tokens = torch.randn(2, 9, 3, dtype=dtype, device=device, requires_grad=True)
    scores = torch.randn(2, 8, dtype=dtype, device=device)
    kept, idx = topk_gather(tokens, scores, 3, 1, backend=backend)
    kept.sum().backward()
    want = torch.zeros(2, 9, 3, dtype=dtype)
    want[:, 0] = 1
    for b in range(2):
        want[b, 1 + idx[b].cpu()] = 1
    assert torch.equal(tokens.grad.cpu(), want)


@pytest.mark.skipif(not HAS_OP, reason=NO_OP)
def test_torch_compile_fullgraph():
    def f(t, s):
        kept, idx = torch.ops.rollout_fast.topk_gather(t, s, 5, 1)
        return kept * 2, idx

    t, s = torch.randn(2, 12, 4), torch.randn(2, 11)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(t, s)  # traces through the fake kernel
    want = f(t, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


_KERNELS = """
from rollout_fast.triton import gather as tg

assert not tg.INTERPRETED
kernels = [
    (tg._select_kernel, dict(s_ptr="*fp32", idx_ptr="*i64", G="i32", k="i32", s_b="i64", BLOCK_G="constexpr"),
     dict(BLOCK_G=256)),
    (tg._copy_kernel, dict(t_ptr="*bf16", idx_ptr="*i64", o_ptr="*bf16", k="i32", P="i32", D="i32", t_b="i64",
                           t_n="i64", BLOCK_D="constexpr"), dict(BLOCK_D=256)),
]
"""


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_gpu():
    """The Triton kernels compile to cubins for sm_80 and sm_90 without a GPU (fresh process, no interpreter)."""
    res = compile_for_gpu(_KERNELS, "80", "90")
    assert res.returncode == 0, res.stderr[-4000:]


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, exc, match", [
    (lambda: (torch.randn(2, 5), torch.randn(2, 4), 2, 1), ValueError, "tokens: expected a \\(B, N, D\\)"),
    (lambda: (torch.randint(0, 3, (2, 5, 3)), torch.randn(2, 4), 2, 1), TypeError, "tokens"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 5), 2, 1), ValueError, "scores: expected shape"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 4), 0, 1), ValueError, "k: expected 1 <= k <= G"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 4), 5, 1), ValueError, "k: expected 1 <= k <= G"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 0), 1, 5), ValueError, "num_prefix_tokens"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[0.0, float("nan"), 1, 2]] * 2), 2, 1), ValueError, "NaN"),
    (lambda: (torch.randn(2, 5, 3), torch.randint(0, 3, (2, 4)), 2, 1), TypeError, "scores"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 4), 2.0, 1), TypeError, "k: expected an int"),
])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        topk_gather(*make())


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="backend"):
        topk_gather(torch.randn(1, 3, 2), torch.randn(1, 2), 1, 1, backend="fastest")
    if not HAS_GPU:
        with pytest.raises(ValueError, match="not available"):
            topk_gather(torch.randn(1, 3, 2), torch.randn(1, 2), 1, 1, backend="cuda")


@pytest.mark.skipif(not HAS_OP, reason=NO_OP)
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 5), torch.randn(2, 4), 2, 1), "tokens must be \\(B, N, D\\)"),
    ((torch.randn(2, 5, 3), torch.randn(2, 4, dtype=torch.float64), 2, 1), "scores must be float32"),
    ((torch.randn(2, 5, 3), torch.randn(2, 3), 2, 1), "scores must be \\(B, N - P\\)"),
    ((torch.randn(2, 5, 3), torch.randn(2, 4), 5, 1), "k must satisfy"),
    ((torch.randn(2, 5, 3), torch.randn(2, 4), 2, 5), "num_prefix_tokens"),
])
def test_compiled_op_checks_its_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rollout_fast.topk_gather(*args)
