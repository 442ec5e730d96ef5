"""rollout_fast.ops.attention_rollout: every backend ("cpu", "cuda", "triton") against the reference, errors,
dispatch (per-layer steps, ISA levels and op registration: test_rollout_kernels.py).

Inputs. Attention is softmax(2 * randn) quantised to multiples of 2**-16 (``make_attention``), the scheme of
tests/reference/test_rollout.py: every float16/bfloat16 cast of such a value is again a multiple of 2**-16, and head
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

import os

import pytest
import torch
from helpers import (
    HAS_EXT,
    HAS_GPU,
    NO_CUDA_BUILD,
    NO_EXT,
    NO_GPU,
    assert_matches,
    make_attention,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import rollout_fast
from rollout_fast import reference
from rollout_fast.ops import _ext, registry
from rollout_fast.ops import rollout as rollout_ops

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
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason=NO_CUDA_BUILD)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5])
@pytest.mark.parametrize("H", [2, 6])  # the generic head loop and a compiled-in head count
def test_cpu_backend_finds_bad_values_itself(bad, dtype, H):
    """The CPU kernel checks finiteness and signs during its one read, so the backend raises the reference's
    ValueError even when the separate Python pass (check_values) is skipped."""
    for N in (9, 70):  # a row tail only, and full 8-wide vectors
        att = make_attention(2, 3, H, N, dtype=dtype)
        att[1, 2, H - 1, N - 1, N // 2] = bad
        args = reference.check_rollout_args(att, grid=(1, N - 1), check_values=False)
        want = ("attentions: contains NaN or infinite values" if bad != -0.5 else
                "attentions: contains negative values (the first: -0.5 at (layer, batch, head, query, key) = "
                f"(1, 2, {H - 1}, {N - 1}, {N // 2})); rollout needs post-softmax attention probabilities, which "
                "are >= 0")
        with pytest.raises(ValueError) as info:
            rollout_ops.run_compiled(args)
        assert str(info.value) == want


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
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    att = make_attention(2, 1, 2, 10)
    assert registry.pick("rollout", "auto", att.device)[1] is registry.entry("rollout", "cpu")


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
@pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason=NO_CUDA_BUILD)
def test_cuda_op_rejects_cpu_tensors_and_mixed_devices():
    with pytest.raises(ValueError, match="differs|on cuda"):
        rollout_fast.attention_rollout([torch.rand(1, 1, 5, 5, device="cuda"), torch.rand(1, 1, 5, 5)])
    with pytest.raises(ValueError, match="does not run on cpu"):
        rollout_fast.attention_rollout(torch.rand(1, 1, 1, 5, 5), backend="cuda")
