"""The rollout kernels step by step: per-layer steps 1-3, threshold selection and ties, the CPU kernel's
schedules and ISA levels, op registration (opcheck, torch.compile) and compiling the Triton kernels for GPUs.
Inputs and tolerance: tests/ops/test_rollout.py's docstring.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    HAS_EXT,
    HAS_GPU,
    HAS_TRITON,
    NO_CUDA_BUILD,
    NO_EXT,
    NO_GPU,
    assert_matches,
    compile_for_gpu,
    make_attention,
)

import rollout_fast
from rollout_fast import reference
from rollout_fast.ops import _ext
from rollout_fast.ops import rollout as rollout_ops


# ------------------------------------------------------------- per-layer steps, threshold selection, ties
def _reference_layers(att, fusion, ratio, protect):
    return torch.stack([reference.residual_normalize(reference.discard_lowest(
        reference.fuse_heads(layer, fusion), ratio, protect_first=protect)) for layer in att])


def _fused_layers(backend, att, fusion, ratio, protect):
    if backend == "triton":
        return rollout_ops.triton_ops().fused_layers_triton(att, fusion, ratio, protect)
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
    # signed zeros, subnormals and huge magnitudes (H = 1: F is the input, exactly); negative values are
    # refused by every rollout op (test_compiled_op_checks_its_arguments, tests/ops/test_rollout_contract.py)
    "zeros_and_ranges": lambda g: torch.cat([
        torch.rand(2, 2, 1, 9, 4, generator=g),
        torch.tensor([-0.0, 0.0, 1e-40, 1e-45, 3e38]).expand(2, 2, 1, 9, 5)], dim=-1),
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
    """The per-sample schedule (batch >= threads) and the split one (batch < threads) agree bit for bit (more
    cases: tests/ops/test_rollout_schedules.py)."""
    att = make_attention(4, 3, 3, 50)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # B = 3 >= 1 thread: one pass per sample, layers last to first
        per_sample = torch.ops.rollout_fast.rollout(att, "mean", 0.9, 1, True, "cls", "max")
        torch.set_num_threads(4)  # B = 3 < 4 threads: the matrices shared out, the chains as they are ready
        split = torch.ops.rollout_fast.rollout(att, "mean", 0.9, 1, True, "cls", "max")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(per_sample, split)


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
    for args in _op_args("cpu"):  # the CPU kernel's row check (row_tolerance)
        torch.library.opcheck(torch.ops.rollout_fast.rollout.default, args + (1e-2,))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason=NO_CUDA_BUILD)
def test_opcheck_compiled_cuda():
    _opcheck_all(torch.ops.rollout_fast.rollout.default, torch.ops.rollout_fast.fused_layers.default, "cuda")


@pytest.mark.triton
def test_opcheck_triton(triton_device):
    rollout_ops.triton_ops()  # defines the ops and their fakes
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
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason=NO_CUDA_BUILD)
def test_torch_compile_cuda():
    _compiled_vs_eager(torch.ops.rollout_fast.rollout, "cuda")


@pytest.mark.triton
@pytest.mark.skipif(not HAS_GPU, reason="torch.compile sees into Triton kernels only on the GPU (the "
                    "interpreter's kernels are opaque; covered by test_opcheck_triton)")
def test_torch_compile_triton(triton_device):
    rollout_ops.triton_ops()
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


# ----------------------------------------------------------------------------- the op's own checks
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
    ((torch.rand(2, 3, 2, 9, 9).index_put_((torch.tensor(1), torch.tensor(2)) + (torch.tensor(1),) * 3,
                                           torch.tensor(-1e-30)), "max", 0.5, 1, True, "cls", "max"),
     "rollout_fast: attentions contains negative values"),
    (((-torch.rand(1, 1, 3, 70, 70)).to(torch.bfloat16), "min", 0.0, 1, True, "full", None),
     "rollout_fast: attentions contains negative values"),
])
def test_compiled_op_checks_its_arguments(args, match):
    """Called directly (no Python validation), the op raises instead of reading garbage."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rollout_fast.rollout(*args)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed", "permuted"])
def test_cpu_kernel_checks_every_row_during_its_read(dtype, layout, monkeypatch):
    """With a row tolerance the CPU kernel refuses one bad row wherever it is (first and last row of a matrix,
    rows whose end is a tail past the 8-lane vectors, any head), in both schedules (the per-sample pipeline for
    'cls', the stored layers for 'full'; contiguous rows and not), at every ISA level; without one it runs,
    and the row check changes no bit of the result."""
    top = _ext.load().cpu_isa()
    tol = reference.ROW_SUM_TOLERANCE[dtype]
    for isa in CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(top):]:
        monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", isa)
        for N in (9, 70):
            att = make_attention(2, 3, 6, N, dtype=dtype, layout=layout)
            for readout in ("cls", "full"):
                args = (att, "max", 0.5, 1, True, readout, None)
                plain = torch.ops.rollout_fast.rollout(*args)
                assert torch.equal(torch.ops.rollout_fast.rollout(*args, tol), plain)
            for pos in ((0, 0, 0, 0), (1, 2, 5, N - 1), (1, 0, 3, N // 2)):
                for total in (1 + 2 * tol, 1 - 2 * tol):
                    bad = att.clone()
                    bad[pos] = 0.0
                    bad[pos + (N // 3,)] = total
                    for readout in ("cls", "full"):
                        with pytest.raises(RuntimeError, match="contains a row that does not sum to 1"):
                            torch.ops.rollout_fast.rollout(bad, "max", 0.5, 1, True, readout, None, tol)
                        torch.ops.rollout_fast.rollout(bad, "max", 0.5, 1, True, readout, None)
    with pytest.raises(RuntimeError, match="row_tolerance must be None or a finite number >= 0"):
        torch.ops.rollout_fast.rollout(att, "max", 0.5, 1, True, "cls", None, -1.0)


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_unknown_cpu_isa_value_is_refused(monkeypatch):
    monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", "avx-512")
    with pytest.raises(ValueError, match="ROLLOUT_FAST_CPU_ISA: expected 'avx512', 'avx2' or 'baseline'"):
        _ext.load().cpu_isa()
    with pytest.raises(ValueError, match="ROLLOUT_FAST_CPU_ISA"):
        torch.ops.rollout_fast.rollout(make_attention(1, 1, 1, 5), "mean", 0.0, 1, True, "cls", "max")
    monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", "avx512")  # an explicit top level is allowed
    assert _ext.load().cpu_isa() in CPU_ISA_LEVELS


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
