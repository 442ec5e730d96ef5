"""rollout_fast.ops.fused_attention: attention output + head-fused attention without per-head probabilities.

Kernels ("chunked" PyTorch, "triton") against ``F.scaled_dot_product_attention`` for the output and the
explicit float32 ``softmax(q k^T * scale)`` fused over heads for F, on odd sizes (N 5, 17, 50; H 1-3; head
dim 8 and 16), every fusion, strided q/k/v as timm makes them, float32 and low precision:

- float32: F within 2e-6 absolute (probabilities are at most 1), the output within 1e-5 relative + 1e-5
  absolute (outputs up to ~5 here): float32 rounding only, accumulated in another order.
- float16/bfloat16: F is computed in float32 from the same q, k, so it keeps the float32 tolerance; the output
  follows flash-attention's rule: its error against the float32 SDPA output is at most 2x that of PyTorch's
  own SDPA in the same dtype, plus 1e-3.

The Triton kernel runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, conftest.py);
``test_triton_kernel_compiles_for_gpu`` compiles it for sm_80 and sm_90 without a GPU. The registered op
``torch.ops.rollout_fast.fused_attention`` passes ``torch.library.opcheck`` and compiles with
``torch.compile(fullgraph=True)``, alone and inside AttentionRollout's capture.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    F32_TOL,
    HAS_GPU,
    HAS_TRITON,
    NO_GPU,
    check_outputs,
    explicit,
    make_qkv,
    peaky_vit,
    run_without_interpreter,
)

from rollout_fast import AttentionRollout, reference
from rollout_fast.capture import capture_attention
from rollout_fast.ops import attention as fa
from rollout_fast.reference import fused_attention_reference

# (B, H, N, D)
SHAPES = [(1, 1, 5, 8), (2, 3, 17, 16), (3, 2, 50, 8), (2, 3, 50, 16)]


# ------------------------------------------------------------------------------- chunked PyTorch path
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("head_fusion", reference.HEAD_FUSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_matches_sdpa_and_explicit_fusion(shape, head_fusion, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype)
    for chunk_bytes in (fa.DEFAULT_CHUNK_BYTES, 1):  # one chunk; one sample per chunk
        out, fused = fa.fused_attention_chunked(q, k, v, head_fusion=head_fusion, chunk_bytes=chunk_bytes)
        check_outputs(q, k, v, out, fused, head_fusion)


def test_chunked_never_holds_the_whole_batch_of_heads(monkeypatch):
    """The per-head float32 probabilities exist for one chunk of the batch at a time."""
    seen = []
    real = fa._probs
    monkeypatch.setattr(fa, "_probs", lambda q, k, s, m=None: seen.append(q.shape[0]) or real(q, k, s, m))
    q, k, v = make_qkv(8, 3, 17, 8)
    per_sample = 3 * 17 * 17 * 4
    out, fused = fa.fused_attention_chunked(q, k, v, chunk_bytes=3 * per_sample)
    assert seen == [3, 3, 2]
    check_outputs(q, k, v, out, fused, "mean")


def test_fused_out_buffer_and_scale():
    q, k, v = make_qkv(2, 2, 17, 8, contiguous=True)
    buf = torch.full((3, 2, 17, 17), -1.0)
    out, fused = fa.fused_attention_chunked(q, k, v, scale=0.3, head_fusion="max", fused_out=buf[1])
    assert fused.data_ptr() == buf[1].data_ptr() and (buf[0] == -1).all() and (buf[2] == -1).all()
    probs = (q @ k.transpose(-2, -1) * 0.3).softmax(-1)
    torch.testing.assert_close(fused, probs.amax(1), rtol=0, atol=F32_TOL)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, k, v: fa.fused_attention(q, k, v, head_fusion="sum"), ValueError, "head_fusion"),
    (lambda q, k, v: fa.fused_attention(q[0], k, v), ValueError, r"q: expected shape \(B, H, N, D\)"),
    (lambda q, k, v: fa.fused_attention(q, k[:, :1], v), ValueError, "q, k, v: shapes"),
    (lambda q, k, v: fa.fused_attention(q, k, v[..., :3, :]), ValueError, "q, k, v: shapes"),
    (lambda q, k, v: fa.fused_attention(q.double(), k.double(), v.double()), TypeError, "q: expected float16"),
    (lambda q, k, v: fa.fused_attention(q, k.half(), v), TypeError, "q, k, v: dtypes differ"),
    (lambda q, k, v: fa.fused_attention(q, k, v, scale=-1.0), ValueError, "scale"),
    (lambda q, k, v: fa.fused_attention(q, k, v, impl="cuda"), ValueError, "impl"),
    (lambda q, k, v: fa.fused_attention_chunked(q, k, v, chunk_bytes=0), ValueError, "chunk_bytes"),
    (lambda q, k, v: fa.fused_attention_chunked(q, k, v, fused_out=torch.empty(2, 17, 16)), ValueError,
     "fused_out"),
    (lambda q, k, v: fa.fused_attention(q, "k", v), TypeError, "k: expected a tensor"),
])
def test_bad_arguments(call, exc, match):
    q, k, v = make_qkv(2, 2, 17, 8)
    with pytest.raises(exc, match=match):
        call(q, k, v)


# --------------------------------------------------------------------------------------- Triton kernel
TRITON_CASES = [  # (B, H, N, D, head_fusion, dtype, block_n: None one pass / 16 two passes)
    (1, 1, 5, 8, "mean", torch.float32, None),
    (2, 3, 17, 16, "max", torch.float32, None),
    (2, 2, 50, 8, "min", torch.float32, None),
    (2, 3, 50, 16, "mean", torch.float32, 16),
    (1, 2, 17, 8, "max", torch.float32, 16),
    (2, 1, 50, 16, "min", torch.float32, 16),
    (2, 3, 17, 16, "mean", torch.float16, None),
    (2, 2, 50, 16, "max", torch.bfloat16, 16),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_triton_matches_sdpa_and_explicit_fusion(case, triton_device):
    B, H, N, D, head_fusion, dtype, block_n = case
    q, k, v = make_qkv(B, H, N, D, dtype=dtype, device=triton_device)
    out, fused = fa.fused_attention_triton(q, k, v, head_fusion=head_fusion, block_n=block_n)
    check_outputs(q, k, v, out, fused, head_fusion)


@pytest.mark.triton
def test_triton_cross_shapes_contiguous_and_fused_out(triton_device):
    """Nq != Nk, Dv != D, contiguous inputs, a query block smaller than N, and writing into a buffer."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 7, 16, generator=g).to(triton_device)
    k = torch.randn(2, 2, 19, 16, generator=g).to(triton_device)
    v = torch.randn(2, 2, 19, 8, generator=g).to(triton_device)
    buf = torch.zeros(2, 7, 19, device=triton_device)
    for block_n in (None, 16):
        out, fused = fa.fused_attention_triton(q, k, v, head_fusion="mean", block_m=16, block_n=block_n,
                                               fused_out=buf)
        assert fused.data_ptr() == buf.data_ptr()
        check_outputs(q, k, v, out, fused, "mean")


_COMPILE_FOR_GPU = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from rollout_fast.triton import attention as ta

kernel = ta._fused_attention_kernel
assert not ta.INTERPRETED
c = "constexpr"
def signature(dtype, stride):
    sig = dict(q_ptr="*" + dtype, k_ptr="*" + dtype, v_ptr="*" + dtype, o_ptr="*" + dtype, f_ptr="*fp32",
               m_ptr="*fp32", H="i32", NQ="i32", NK="i32", D="i32", DV="i32", qk_scale="fp32", inv_h="fp32")
    sig.update({n: stride for n in ("s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn",
                                    "s_ob", "s_oh", "s_on", "s_mb", "s_mh", "s_mq", "s_mk")})
    sig.update(FUSION=c, ONE_PASS=c, HAS_MASK=c, BLOCK_M=c, BLOCK_N=c, BLOCK_D=c, BLOCK_DV=c, PRECISION=c)
    return sig
variants = [  # DeiT-S at 224 px (N 197, one pass) in bf16; N > 256 (two passes); float32 with exact dots;
    # with an additive mask (relative-position bias) in both schedules
    ("bf16", "i32", dict(FUSION=0, ONE_PASS=True, HAS_MASK=False, BLOCK_M=16, BLOCK_N=256, BLOCK_D=64,
                         BLOCK_DV=64, PRECISION="tf32")),
    ("fp16", "i64", dict(FUSION=1, ONE_PASS=False, HAS_MASK=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
                         BLOCK_DV=64, PRECISION="tf32")),
    ("fp32", "i32", dict(FUSION=2, ONE_PASS=True, HAS_MASK=False, BLOCK_M=32, BLOCK_N=128, BLOCK_D=16,
                         BLOCK_DV=16, PRECISION="ieee")),
    ("bf16", "i32", dict(FUSION=2, ONE_PASS=False, HAS_MASK=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128,
                         BLOCK_DV=128, PRECISION="tf32")),
    ("bf16", "i32", dict(FUSION=0, ONE_PASS=True, HAS_MASK=True, BLOCK_M=16, BLOCK_N=256, BLOCK_D=64,
                         BLOCK_DV=64, PRECISION="tf32")),
    ("fp16", "i64", dict(FUSION=0, ONE_PASS=False, HAS_MASK=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
                         BLOCK_DV=64, PRECISION="tf32")),
]
for arch in map(int, sys.argv[1:]):
    for dtype, stride, constexprs in variants:
        out = compile(ASTSource(kernel, signature(dtype, stride), constexprs=constexprs),
                      target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
        assert out.asm.get("cubin"), (dtype, arch)
"""


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_compiles_for_gpu():
    """The fused-capture kernel compiles to a cubin for sm_80 and sm_90 without a GPU (fresh process, no
    interpreter): the interpreter does not type-check like the compiler."""
    res = run_without_interpreter(_COMPILE_FOR_GPU, "80", "90")
    assert res.returncode == 0, res.stderr[-4000:]




# ------------------------------------------------------------------------- the specification, the op
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_reference_is_the_explicit_attention(head_fusion):
    q, k, v = make_qkv(2, 3, 17, 16)
    out, fused = fused_attention_reference(q, k, v, head_fusion=head_fusion)
    want_out, want_fused = explicit(q, k, v, head_fusion)
    torch.testing.assert_close(fused, want_fused, rtol=0, atol=F32_TOL)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


def _op_args(device, head_fusion, dtype=torch.float32):
    q, k, v = make_qkv(2, 3, 17, 16, dtype=dtype, device=device)
    return q, k, v, torch.empty(2, 17, 17, device=device), 0.25, head_fusion, fa.DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_opcheck_cpu(head_fusion):
    torch.library.opcheck(torch.ops.rollout_fast.fused_attention.default, _op_args("cpu", head_fusion))
    torch.library.opcheck(torch.ops.rollout_fast.fused_attention.default,
                          _op_args("cpu", head_fusion, torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_opcheck_cuda(head_fusion):
    torch.library.opcheck(torch.ops.rollout_fast.fused_attention.default, _op_args("cuda", head_fusion))


def _compiled_vs_eager(device):
    q, k, v = make_qkv(2, 3, 50, 16, device=device)

    def f(q, k, v):
        out, fused = fa.fused_attention(q, k, v, head_fusion="max")
        return out.transpose(1, 2).reshape(2, 50, 48) * 2, fused + 1

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    want = f(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_torch_compile_cpu():
    _compiled_vs_eager("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
def test_torch_compile_cuda():
    _compiled_vs_eager("cuda")


def test_torch_compile_model_forward_under_the_capture():
    """AttentionRollout's capture with the model's forward compiled by torch.compile(fullgraph=True): the
    hooks, the SDPA interception and the fused-attention op trace without a graph break, and give the eager
    attention and logits. (Compiling AttentionRollout.explain itself is not possible: dynamo cannot trace
    the hook registration.)"""
    model = peaky_vit(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))
    images = torch.randn(2, 3, 32, 32)
    want = capture_attention(model, images, head_fusion="max")
    torch._dynamo.reset()
    forward = torch.compile(lambda m, x: m(x), fullgraph=True)
    got = capture_attention(model, images, head_fusion="max", forward=forward)
    assert got.path == want.path == "fused-chunked"
    torch.testing.assert_close(got.attention, want.attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.output, want.output, rtol=1e-4, atol=1e-5)
    explainer = AttentionRollout(model, head_fusion="max", discard_ratio=0.5)
    assert explainer.info["last_capture"] is None
