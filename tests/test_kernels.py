"""The fused rollout backends ("cpu", "cuda", "triton") against the reference, op registration, errors.

Inputs. Attention is softmax(2 * randn) quantised to multiples of 2**-16 (``make_attention``), the scheme of
test_reference.py: every float16/bfloat16 cast of such a value is again a multiple of 2**-16, and head
sums of up to 12 of them are exact in float32. So every backend and the reference see the same input
values and compute bit-identical fused matrices F (in any summation order); the per-sample discard
threshold, which makes the result discontinuous in F, then selects exactly the same entries (ties
included) everywhere, and the comparison is left with float32 rounding only. float16/bfloat16 inputs
are upcast to the same float32 values by the kernels and by the reference, so they get the float32
tolerance too.

Tolerance (float32, every dtype): ``|out - ref| <= 1e-5 * |ref| + 1e-5 * max|ref|``. The kernels
normalise rows in another summation order and chain row vectors (u^T M_L ... M_1) where the reference
multiplies matrices, so each entry is a reassociated sum of non-negative terms: relative error well
under 1e-6 in practice (measured <= 1.2e-6 of the map's scale on the grid below). The scale term covers
'minmax', whose subtraction of the minimum turns that into a larger relative error on small entries.
TF32 is off (conftest.py), so the reference's matmuls are true float32.

Coverage. ``CASES`` is a parametrised grid in which every value of every axis occurs at least once (B 1/3/8,
N 5/50/65/197/577, P 1/2/5, H 1/3/12, L 1/4/12, every fusion, discard 0/0.5/0.9/0.97, readout
cls/mean/full, normalize max/minmax/None, float32/float16/bfloat16, contiguous and three
non-contiguous layouts); the hypothesis test draws further shapes and ratios. Triton runs on CUDA, or
on the CPU in its interpreter (``TRITON_INTERPRET=1``, set only around the Triton tests) with the small
``TRITON_CPU_CASES``; CUDA tests skip without a GPU, saying why.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from gpu_compile import compile_for_gpu
from hypothesis import given, settings
from hypothesis import strategies as st

import rollout_fast
from rollout_fast import reference
from rollout_fast.kernels import _ext

HAS_EXT = _ext.loaded()
HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_EXT = f"compiled extension not available: {_ext.load_error()}"
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"

RTOL = 1e-5        # relative to each element
SCALE_TOL = 1e-5   # relative to the largest |reference| value

# (L, B, H, N, P, grid, head_fusion, discard_ratio, readout, normalize, dtype, layout)
CASES = [
    (1, 1, 1, 5, 1, None, "mean", 0.0, "cls", "max", torch.float32, "contiguous"),
    (4, 3, 3, 50, 1, None, "max", 0.5, "mean", "minmax", torch.float16, "permuted"),
    (12, 8, 12, 65, 1, None, "min", 0.9, "full", None, torch.bfloat16, "contiguous"),
    (4, 3, 12, 197, 1, None, "mean", 0.97, "cls", "max", torch.float32, "sliced"),
    (4, 1, 3, 577, 1, None, "mean", 0.9, "cls", "max", torch.float32, "contiguous"),
    (1, 8, 3, 577, 5, (22, 26), "max", 0.5, "mean", None, torch.float16, "contiguous"),
    (12, 1, 1, 197, 2, (13, 15), "min", 0.0, "mean", "max", torch.bfloat16, "transposed"),
    (4, 3, 12, 5, 2, (1, 3), "max", 0.97, "cls", "minmax", torch.float32, "contiguous"),
    (12, 3, 3, 50, 5, (5, 9), "mean", 0.9, "full", None, torch.float16, "sliced"),
    (4, 8, 1, 65, 5, (6, 10), "min", 0.5, "cls", "max", torch.float32, "permuted"),
    (1, 3, 12, 197, 5, (12, 16), "max", 0.9, "cls", "max", torch.bfloat16, "contiguous"),
    (4, 1, 12, 577, 2, (23, 25), "min", 0.97, "full", None, torch.float32, "contiguous"),
    (12, 8, 3, 197, 1, None, "mean", 0.9, "cls", "max", torch.float32, "contiguous"),
    (4, 3, 3, 65, 2, (7, 9), "mean", 0.5, "mean", "minmax", torch.bfloat16, "transposed"),
]
# Triton's interpreter is slow: small shapes, still every fusion, discard, readout, dtype and layout.
TRITON_CPU_CASES = [
    (1, 1, 1, 5, 1, None, "mean", 0.0, "cls", "max", torch.float32, "contiguous"),
    (4, 3, 3, 50, 1, None, "max", 0.5, "mean", "minmax", torch.float16, "permuted"),
    (4, 3, 12, 5, 2, (1, 3), "max", 0.97, "cls", "minmax", torch.float32, "contiguous"),
    (4, 1, 3, 65, 2, (7, 9), "mean", 0.9, "full", None, torch.bfloat16, "sliced"),
    (12, 1, 1, 50, 5, (5, 9), "min", 0.9, "cls", "max", torch.float32, "transposed"),
    (1, 8, 3, 65, 5, (6, 10), "min", 0.97, "mean", None, torch.float16, "contiguous"),
]


def _case_id(case) -> str:
    L, B, H, N, P, _, fusion, r, readout, norm, dtype, layout = case
    return f"L{L}-B{B}-H{H}-N{N}-P{P}-{fusion}-r{r}-{readout}-{norm}-{str(dtype)[6:]}-{layout}"


# ------------------------------------------------------------------------------------------ helpers
def make_attention(L, B, H, N, dtype=torch.float32, layout="contiguous", device="cpu", quantum=2.0 ** -16,
                   generator=None):
    """(L, B, H, N, N) softmax attention quantised to multiples of ``quantum``, in a given memory layout.

    Layouts: 'contiguous'; 'permuted' (stored as (B, L, ...)); 'sliced' (rows padded: row stride N + 5);
    'transposed' (stored transposed: last-dimension stride N).
    """
    logits = torch.randn(L, B, H, N, N, generator=generator) * 2.0
    att = ((logits.softmax(-1) / quantum).round() * quantum).to(dtype)
    if layout == "permuted":
        att = att.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    elif layout == "sliced":
        big = torch.zeros(L, B, H, N + 3, N + 5, dtype=dtype)
        big[..., :N, :N] = att
        att = big[..., :N, :N]
    elif layout == "transposed":
        att = att.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout != "contiguous":
        raise ValueError(layout)
    return att.to(device)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol=RTOL, scale_tol=SCALE_TOL) -> None:
    """Elementwise |actual - expected| <= rtol |expected| + scale_tol max|expected|; reports the worst."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == torch.float32, f"dtype {actual.dtype}, expected float32"
    assert actual.device == expected.device, f"device {actual.device} != {expected.device}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(a).all(), "output has non-finite values"
    bound = rtol * e.abs() + scale_tol * e.abs().max()
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{int(bad.sum())} of {e.numel()} elements differ; worst at {idx}: got {a[idx].item():.9g}, "
            f"expected {e[idx].item():.9g} (|diff| {err[idx].item():.3g} > allowed {bound[idx].item():.3g})")


def rollout_kwargs(case):
    _, _, _, _, P, grid, fusion, r, readout, norm, _, _ = case
    return dict(head_fusion=fusion, discard_ratio=r, num_prefix_tokens=P, grid=grid, readout=readout,
                normalize=norm)


# --------------------------------------------------------------------------- equality with the reference
@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_matches_reference(case):
    L, B, H, N, *_, dtype, layout = case
    att = make_attention(L, B, H, N, dtype, layout)
    kw = rollout_kwargs(case)
    assert_matches(rollout_fast.attention_rollout(att, backend="cpu", **kw),
                   reference.attention_rollout(att, **kw))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason="the extension was built without CUDA")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_matches_reference(case):
    L, B, H, N, *_, dtype, layout = case
    att = make_attention(L, B, H, N, dtype, layout, device="cuda")
    kw = rollout_kwargs(case)
    out = rollout_fast.attention_rollout(att, backend="cuda", **kw)
    assert_matches(out, reference.attention_rollout(att, **kw))
    assert_matches(out.cpu(), reference.attention_rollout(att.cpu(), **kw))


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES + [c for c in TRITON_CPU_CASES if c not in CASES], ids=_case_id)
def test_triton_matches_reference(case, triton_device):
    if triton_device == "cpu" and case not in TRITON_CPU_CASES:
        pytest.skip("large shape: run on a GPU (Triton's CPU interpreter is too slow for it)")
    L, B, H, N, *_, dtype, layout = case
    att = make_attention(L, B, H, N, dtype, layout, device=triton_device)
    kw = rollout_kwargs(case)
    assert_matches(rollout_fast.attention_rollout(att, backend="triton", **kw),
                   reference.attention_rollout(att, **kw))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 4), B=st.integers(1, 3), H=st.integers(1, 4), N=st.integers(2, 40),
       P=st.integers(0, 3), fusion=st.sampled_from(reference.HEAD_FUSIONS),
       ratio=st.one_of(st.just(0.0), st.floats(0.0, 0.999)), readout=st.sampled_from(reference.READOUTS),
       normalize=st.sampled_from(reference.NORMALIZATIONS), protect=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2 ** 31))
def test_cpu_fuzz_against_reference(L, B, H, N, P, fusion, ratio, readout, normalize, protect, dtype, seed):
    P = min(P, N - 1)
    if readout == "cls" and P == 0:
        readout = "mean"
    gen = torch.Generator().manual_seed(seed)
    att = make_attention(L, B, H, N, dtype, generator=gen)
    kw = dict(head_fusion=fusion, discard_ratio=ratio, num_prefix_tokens=P,
              grid=None if readout == "full" else (1, N - P), readout=readout, normalize=normalize,
              protect_prefix=protect)
    assert_matches(rollout_fast.attention_rollout(att, backend="cpu", **kw),
                   reference.attention_rollout(att, **kw))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("H", range(1, 18))
def test_cpu_every_head_count_matches_reference(H):
    """The CPU kernel compiles its head-fusion loop for the common head counts (1, 3, 4, 6, 8, 12, 16) and
    runs a generic loop for the rest: each count, both kinds, every fusion, against the reference. N = 75
    (N*N > 4096: the sampled threshold bracket) and a row tail; batch 4 >= threads: the pipelined schedule."""
    att = make_attention(2, 4, H, 75, torch.float32, generator=torch.Generator().manual_seed(H))
    for fusion in reference.HEAD_FUSIONS:
        kw = dict(head_fusion=fusion, discard_ratio=0.9, num_prefix_tokens=1, grid=(1, 74), readout="cls",
                  normalize="max")
        assert_matches(rollout_fast.attention_rollout(att, backend="cpu", **kw),
                       reference.attention_rollout(att, **kw))
        assert_matches(torch.ops.rollout_fast.fused_layers(att, fusion, 0.9, True),
                       _reference_layers(att, fusion, 0.9, True))


# ------------------------------------------------------------- per-layer steps, threshold selection, ties
def _reference_layers(att, fusion, ratio, protect):
    return torch.stack([reference.residual_normalize(reference.discard_lowest(
        reference.fuse_heads(layer, fusion), ratio, protect_first=protect)) for layer in att])


def _fused_layers(backend, att, fusion, ratio, protect):
    if backend == "triton":
        from rollout_fast import triton as rt

        return rt.fused_layers_triton(att, fusion, ratio, protect)
    return torch.ops.rollout_fast.fused_layers(att, fusion, ratio, protect)


def _layer_backends():
    return [pytest.param("compiled", marks=pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)),
            pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", _layer_backends())
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("fusion", reference.HEAD_FUSIONS)
def test_fused_layers_discard_exactly_like_reference(backend, ratio, fusion, request):
    """Steps 1-3 per layer: the same entries are zeroed as in the reference (exact mask), values close."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    att = make_attention(3, 2, 3, 37, device=device)
    got = _fused_layers(backend, att, fusion, ratio, True)
    want = _reference_layers(att, fusion, ratio, True)
    assert torch.equal(got == 0, want == 0), "the discarded entries differ from the reference's"
    if ratio > 0:
        assert int((want == 0).sum()) > 0, "the reference discarded nothing: the test would prove nothing"
    assert_matches(got, want)


def _sample_aliasing(g, N, samples=1024):
    flat = torch.rand(N * N, generator=g)
    flat[(torch.arange(samples) * (N * N)) // samples] += 10.0
    return flat.reshape(1, 1, 1, N, N).expand(1, 2, 1, N, N).contiguous()


ADVERSARIAL = {
    # every entry equal: the threshold ties with all of them, nothing is discarded
    "all_equal": lambda g: torch.full((2, 2, 1, 9, 9), 0.25),
    # few distinct values: the threshold lands inside a block of ties, which must survive
    "ties": lambda g: torch.randint(0, 3, (2, 2, 1, 9, 9), generator=g).float() / 4,
    # white-box, for the CPU kernel's sampled bracket (N*N > 4096, 1024 evenly strided samples): the
    # sampled entries are the large ones, so the bracket misses the rank and the exact fallback runs
    "sample_aliasing": lambda g: _sample_aliasing(g, 72),
    # negative values, signed zeros, subnormals and huge magnitudes (H = 1: F is the input, exactly)
    "signs_and_ranges": lambda g: torch.cat([
        torch.randn(2, 2, 1, 9, 4, generator=g),
        torch.tensor([-0.0, 0.0, 1e-40, -1e-40, 3e38]).expand(2, 2, 1, 9, 5)], dim=-1),
}


@pytest.mark.parametrize("backend", _layer_backends())
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.97])
@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_threshold_selection_adversarial(backend, ratio, kind, request):
    """The radix select returns the (k+1)-th smallest value for ties, signs, zeros and extreme ranges."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    att = ADVERSARIAL[kind](torch.Generator().manual_seed(1)).to(device)
    for protect in (True, False):
        got = _fused_layers(backend, att, "max", ratio, protect)
        want = _reference_layers(att, "max", ratio, protect)
        assert torch.equal(got == 0, want == 0), f"{kind}, protect={protect}: discarded entries differ"
    if kind == "all_equal":
        assert int((got == 0).sum()) == 0


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_cpu_threshold_fallback_on_a_large_matrix(ratio):
    """White-box: N*N = 17161 >= 16384 and the sampled entries are the largest, so the CPU kernel's bracket
    misses and its exact select over all keys runs (the histogram path with interleaved copies)."""
    att = _sample_aliasing(torch.Generator().manual_seed(2), 131)
    got = _fused_layers("compiled", att, "max", ratio, True)
    want = _reference_layers(att, "max", ratio, True)
    assert torch.equal(got == 0, want == 0), "discarded entries differ"
    assert_matches(got, want)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_cpu_schedules_bitwise_equal():
    """The per-sample schedule (batch >= threads) and the per-row one (batch < threads) agree bit for bit."""
    att = make_attention(4, 3, 3, 50)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # B = 3 >= 1 thread: one pass per sample, layers last to first
        per_sample = torch.ops.rollout_fast.rollout(att, "mean", 0.9, 1, True, "cls", "max")
        torch.set_num_threads(4)  # B = 3 < 4 threads: stored M_l, then the chain
        per_row = torch.ops.rollout_fast.rollout(att, "mean", 0.9, 1, True, "cls", "max")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(per_sample, per_row)


CPU_ISA_LEVELS = ["avx512", "avx2", "baseline"]  # what ROLLOUT_FAST_CPU_ISA can cap the kernel to


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_isa_builds_bitwise_equal(dtype, monkeypatch):
    """Every ISA level this CPU runs gives the same bits, for both schedules: the AVX2 build (explicit SIMD
    loads, row entries, fused-loop order), the same with its AVX-512 bracket gather, and the baseline build."""
    top = _ext.load().cpu_isa()
    levels = CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(top):]
    if len(levels) < 2:
        pytest.skip("this CPU runs the baseline build only (no AVX2+FMA+F16C)")
    att = make_attention(3, 4, 3, 75, dtype=dtype)  # N*N > 4096: the sampled threshold bracket runs
    results = {}
    for isa in levels:
        monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", isa)
        assert _ext.load().cpu_isa() == isa
        results[isa] = [torch.ops.rollout_fast.rollout(att, fusion, 0.9, 1, True, "mean", "minmax")
                        for fusion in reference.HEAD_FUSIONS]
        results[isa] += [torch.ops.rollout_fast.fused_layers(att, fusion, 0.9, True)
                         for fusion in reference.HEAD_FUSIONS]
    for isa in levels[1:]:
        for got, want in zip(results[isa], results[levels[0]]):
            assert torch.equal(got, want), f"{isa} differs from {levels[0]}"


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_results_respond_to_input_and_discard():
    """Guards against a test suite that cannot fail: a perturbed input or another ratio changes the map."""
    att = make_attention(4, 2, 3, 50)
    base = rollout_fast.attention_rollout(att, backend="cpu", discard_ratio=0.9)
    perturbed = att.clone()
    perturbed[-1, 0, :, 0, 1:] = perturbed[-1, 0, :, 0, 1:].flip(-1)  # last layer's CLS row, sample 0
    moved = rollout_fast.attention_rollout(perturbed, backend="cpu", discard_ratio=0.9)
    assert not torch.allclose(moved[0], base[0], rtol=1e-3, atol=1e-3)
    assert torch.equal(moved[1], base[1]), "samples must be independent"
    no_discard = rollout_fast.attention_rollout(att, backend="cpu", discard_ratio=0.0)
    assert not torch.allclose(no_discard, base, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- op registration and compile
def _op_args(device="cpu"):
    att = make_attention(2, 2, 3, 17, device=device)
    return [
        (att, "mean", 0.5, 1, True, "cls", "max"),
        (att.to(torch.float16), "max", 0.0, 1, False, "mean", None),
        (att, "min", 0.9, 1, True, "full", None),
    ]


def _opcheck_all(op_rollout, op_layers, device):
    for args in _op_args(device):
        torch.library.opcheck(op_rollout, args)
    torch.library.opcheck(op_layers, (make_attention(2, 2, 3, 17, device=device), "mean", 0.5, True))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_opcheck_compiled_cpu():
    _opcheck_all(torch.ops.rollout_fast.rollout.default, torch.ops.rollout_fast.fused_layers.default, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason="the extension was built without CUDA")
def test_opcheck_compiled_cuda():
    _opcheck_all(torch.ops.rollout_fast.rollout.default, torch.ops.rollout_fast.fused_layers.default, "cuda")


@pytest.mark.triton
def test_opcheck_triton(triton_device):
    from rollout_fast import triton as rt

    rt.interpreted()  # defines the ops
    _opcheck_all(torch.ops.rollout_fast.rollout_triton.default,
                 torch.ops.rollout_fast.fused_layers_triton.default, triton_device)


def _compiled_vs_eager(op, device):
    att = make_attention(3, 2, 3, 50, device=device)

    def f(a):
        return op(a, "mean", 0.9, 1, True, "cls", "max").reshape(a.shape[1], 7, 7)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(att), f(att))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_torch_compile_compiled_cpu():
    _compiled_vs_eager(torch.ops.rollout_fast.rollout, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason="the extension was built without CUDA")
def test_torch_compile_cuda():
    _compiled_vs_eager(torch.ops.rollout_fast.rollout, "cuda")


@pytest.mark.triton
@pytest.mark.skipif(not HAS_GPU, reason="torch.compile sees into Triton kernels only on the GPU (the "
                    "interpreter's kernels are opaque; covered by test_opcheck_triton)")
def test_torch_compile_triton(triton_device):
    from rollout_fast import triton as rt

    rt.interpreted()
    _compiled_vs_eager(torch.ops.rollout_fast.rollout_triton, triton_device)


_KERNELS = """
from rollout_fast.triton import rollout as tr

assert not tr.INTERPRETED
i32, i64, f32, c = "i32", "i64", "*fp32", "constexpr"
kernels = [
    (tr._fuse_kernel, dict(att_ptr="*bf16", f_ptr=f32, B=i32, H=i32, N=i32, s_l=i64, s_b=i64, s_h=i64,
                           s_i=i64, FUSION=c, BLOCK=c), dict(FUSION=0, BLOCK=1024)),
    (tr._fuse_kernel, dict(att_ptr="*fp16", f_ptr=f32, B=i32, H=i32, N=i32, s_l=i32, s_b=i32, s_h=i32,
                           s_i=i32, FUSION=c, BLOCK=c), dict(FUSION=1, BLOCK=1024)),
    (tr._select_kernel, dict(f_ptr=f32, t_ptr=f32, NN=i32, k=i32, BLOCK=c), dict(BLOCK=4096)),
    (tr._normalize_kernel, dict(f_ptr=f32, t_ptr=f32, N=i32, HAS_T=c, PROTECT=c, ROWS=c, BLOCK_N=c),
     dict(HAS_T=True, PROTECT=True, ROWS=16, BLOCK_N=256)),
    (tr._vecmat_kernel, dict(m_ptr=f32, v_in=f32, v_out=f32, N=i32, BLOCK_I=c, BLOCK_J=c),
     dict(BLOCK_I=32, BLOCK_J=128)),
    (tr._finalize_kernel, dict(v_ptr=f32, out_ptr=f32, N=i32, P=i32, G=i32, MEAN=c, NORM=c, BLOCK_G=c),
     dict(MEAN=True, NORM=2, BLOCK_G=256)),
]
"""


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_gpu():
    """Every Triton kernel compiles to a cubin for sm_80 and sm_90 without a GPU (in a fresh process,
    without the interpreter): the interpreter does not type-check like the compiler, so this catches
    GPU-only breakage on CPU-only CI."""
    res = compile_for_gpu(_KERNELS, "80", "90")
    assert res.returncode == 0, res.stderr[-4000:]


# ----------------------------------------------------------------------------------- errors, dispatch
BAD_INPUTS = [
    (lambda: torch.rand(2, 3, 5, 5), {}, ValueError, "expected a \\(L, B, H, N, N\\) tensor"),
    (lambda: torch.rand(1, 1, 1, 5, 4), {}, ValueError, "last two dimensions must be equal"),
    (lambda: torch.randint(0, 2, (1, 1, 1, 5, 5)), {}, TypeError, "floating-point dtype"),
    (lambda: torch.rand(1, 1, 1, 5, 5), {"discard_ratio": 1.0}, ValueError, "discard_ratio"),
    (lambda: torch.rand(1, 1, 1, 5, 5), {"discard_ratio": -0.1}, ValueError, "discard_ratio"),
    (lambda: torch.rand(1, 1, 1, 5, 5), {"head_fusion": "sum"}, ValueError, "head_fusion"),
    (lambda: torch.rand(1, 1, 1, 5, 5), {"num_prefix_tokens": 5}, ValueError, "num_prefix_tokens"),
    (lambda: torch.rand(1, 1, 1, 6, 6), {}, ValueError, "not a square number"),
    (lambda: [torch.rand(1, 1, 5, 5), torch.rand(1, 1, 5, 5, dtype=torch.float64)], {}, ValueError, "dtype"),
    (lambda: torch.full((1, 1, 1, 5, 5), float("nan")), {}, ValueError, "NaN"),
]


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("make, kwargs, exc, match", BAD_INPUTS)
def test_bad_input_same_errors_as_reference(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        reference.attention_rollout(make(), **kwargs)
    with pytest.raises(exc, match=match):
        rollout_fast.attention_rollout(make(), backend="cpu", **kwargs)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("args, match", [
    ((torch.rand(2, 5, 5), "mean", 0.0, 1, True, "cls", "max"), "must be \\(L, B, H, N, N\\)"),
    ((torch.rand(1, 1, 1, 5, 4), "mean", 0.0, 1, True, "cls", "max"), "square"),
    ((torch.rand(1, 1, 1, 5, 5), "sum", 0.0, 1, True, "cls", "max"), "head_fusion"),
    ((torch.rand(1, 1, 1, 5, 5), "mean", 1.5, 1, True, "cls", "max"), "discard_ratio"),
    ((torch.rand(1, 1, 1, 5, 5), "mean", 0.0, 5, True, "cls", "max"), "num_prefix_tokens"),
    ((torch.rand(1, 1, 1, 5, 5), "mean", 0.0, 0, True, "cls", "max"), "'cls' needs"),
    ((torch.rand(1, 1, 1, 5, 5), "mean", 0.0, 1, True, "row", "max"), "readout"),
    ((torch.rand(1, 1, 1, 5, 5), "mean", 0.0, 1, True, "cls", "l2"), "normalize"),
    ((torch.randint(0, 2, (1, 1, 1, 5, 5)), "mean", 0.0, 1, True, "cls", "max"), "float16, bfloat16"),
    ((torch.full((2, 3, 2, 9, 9), float("nan")), "max", 0.5, 1, True, "cls", "max"), "NaN or infinite"),
    ((torch.rand(2, 1, 2, 9, 9).index_put_((torch.tensor(1), torch.tensor(0)) + (torch.tensor(1),) * 3,
                                           torch.tensor(float("inf"))), "mean", 0.0, 1, True, "full", None),
     "NaN or infinite"),
])
def test_compiled_op_checks_its_arguments(args, match):
    """Called directly (no Python validation), the op raises instead of reading garbage."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rollout_fast.rollout(*args)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_unknown_cpu_isa_value_is_refused(monkeypatch):
    monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match="ROLLOUT_FAST_CPU_ISA: expected 'avx512', 'avx2' or 'baseline'"):
        _ext.load().cpu_isa()
    with pytest.raises(ValueError, match="ROLLOUT_FAST_CPU_ISA"):
        torch.ops.rollout_fast.rollout(make_attention(1, 1, 1, 5), "mean", 0.0, 1, True, "cls", "max")
    monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", "avx512")  # an explicit top level is allowed
    assert _ext.load().cpu_isa() in CPU_ISA_LEVELS


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("H", [2, 6])  # the generic head loop and a compiled-in head count
def test_cpu_backend_finds_non_finite_values_itself(bad, dtype, H):
    """The CPU kernel checks finiteness during its one read, so the backend raises the reference's
    ValueError even when the separate Python pass (check_finite) is skipped."""
    from rollout_fast.kernels import backends

    for N in (9, 70):  # a row tail only, and full 8-wide vectors
        att = make_attention(2, 3, H, N, dtype=dtype)
        att[1, 2, H - 1, N - 1, N // 2] = bad
        args = reference.check_rollout_args(att, grid=(1, N - 1), check_finite=False)
        with pytest.raises(ValueError, match="attentions: contains NaN or infinite values"):
            backends.run_compiled(args)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_cuda_kernels_were_compiled_where_a_toolkit_exists():
    """CI has nvcc but no GPU: the CUDA kernels must still be compiled and linked into the extension (so a
    CUDA compile error fails CI), unless the build was told to skip them."""
    import shutil

    if shutil.which("nvcc") is None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        pytest.skip("no CUDA toolkit on this machine (no nvcc on PATH, CUDA_HOME unset)")
    if os.environ.get("ROLLOUT_FAST_NO_CUDA", "") not in ("", "0"):
        pytest.skip("ROLLOUT_FAST_NO_CUDA is set: the CPU-only build was asked for")
    assert _ext.cuda_built(), "a CUDA toolkit is installed but rollout_fast._C was built without CUDA kernels"


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 (tests, debugging) 'triton' is available on CPU tensors, but 'auto' takes
    the compiled CPU kernel: the interpreter is orders of magnitude slower."""
    from rollout_fast import ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    att = make_attention(2, 1, 2, 10)
    assert ops._pick("auto", att.device) is ops._BACKENDS["cpu"][2]


def test_backend_selection_and_errors():
    att = make_attention(1, 1, 1, 5)
    assert "reference" in rollout_fast.available_backends()
    with pytest.raises(ValueError, match="backend"):
        rollout_fast.attention_rollout(att, backend="fastest")
    if not HAS_GPU:
        with pytest.raises(ValueError, match="not available"):
            rollout_fast.attention_rollout(att, backend="cuda")
    if HAS_EXT:
        assert "cpu" in rollout_fast.available_backends()
        assert torch.equal(rollout_fast.attention_rollout(att), rollout_fast.attention_rollout(att, backend="cpu"))
    else:
        assert "cpu" not in rollout_fast.available_backends()
        assert "pip install --no-build-isolation -e ." in _ext.load_error()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason="the extension was built without CUDA")
def test_cuda_op_rejects_cpu_tensors_and_mixed_devices():
    with pytest.raises(ValueError, match="differs|on cuda"):
        rollout_fast.attention_rollout([torch.rand(1, 1, 5, 5, device="cuda"), torch.rand(1, 1, 5, 5)])
    with pytest.raises(ValueError, match="does not run on cpu"):
        rollout_fast.attention_rollout(torch.rand(1, 1, 1, 5, 5), backend="cuda")


@pytest.mark.parametrize("backend", _layer_backends())
def test_discard_count_at_integer_boundaries(backend, request):
    """k = floor(r N^2) in double precision as in the reference, at ratios where r N^2 is (nearly) an
    integer; distinct values, so the zero count pins k down."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(2)
    att = (torch.rand(1, 1, 1, 9, 9, generator=gen) + 0.5).to(device)  # distinct, diagonal + 1 never 0
    for ratio in (1 / 81, 40 / 81, 80 / 81, 0.1 + 0.2, 0.7):
        got = _fused_layers(backend, att, "mean", ratio, False)
        want = _reference_layers(att, "mean", ratio, False)
        assert torch.equal(got == 0, want == 0), f"ratio {ratio!r}"
