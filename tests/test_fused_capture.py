"""Fused attention capture: attention output + head-fused attention without per-head probabilities.

Kernels (``rollout_fast.fused_attention``) against ``F.scaled_dot_product_attention`` for the output and the
explicit float32 ``softmax(q k^T * scale)`` fused over heads for F, on odd sizes (N 5, 17, 50; H 1-3; head
dim 8 and 16), every fusion, strided q/k/v as timm makes them, float32 and low precision:

- float32: F within 2e-6 absolute (probabilities are at most 1), the output within 1e-5 relative + 1e-5
  absolute (outputs up to ~5 here): float32 rounding only, accumulated in another order.
- float16/bfloat16: F is computed in float32 from the same q, k, so it keeps the float32 tolerance; the output
  follows flash-attention's rule: its error against the float32 SDPA output is at most 2x that of PyTorch's
  own SDPA in the same dtype, plus 1e-3.

The Triton kernel runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` set only while a
Triton test runs, before the kernel's first use); ``test_triton_kernel_compiles_for_gpu`` compiles it for sm_80
and sm_90 without a GPU. Model-level tests: the capture paths give the rollout of the explicit attention,
the model's outputs stay its SDPA outputs, and the model is left unchanged, also when the forward raises.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from gpu_compile import run_without_interpreter
from vit_testing import explicit_attention, peaky_vit

from rollout_fast import AttentionRollout, reference
from rollout_fast import fused_attention as fa
from rollout_fast.capture import capture_attention

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
F32_TOL = 2e-6

# (B, H, N, D)
SHAPES = [(1, 1, 5, 8), (2, 3, 17, 16), (3, 2, 50, 8), (2, 3, 50, 16)]


def make_qkv(B, H, N, D, dtype=torch.float32, device="cpu", contiguous=False, seed=0):
    """q, k, v (B, H, N, D) as timm makes them: views of one (B, N, 3, H, D) projection, logits of scale ~3."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3, H, D, generator=g) * 1.7).to(dtype).to(device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def explicit(q, k, v, head_fusion):
    """float32 reference: (SDPA output of the float32 inputs, fused float32 probabilities)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    probs = (qf @ kf.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return F.scaled_dot_product_attention(qf, kf, vf), reference.fuse_heads(probs, head_fusion)


def check_outputs(q, k, v, out, fused, head_fusion):
    want_out, want_fused = explicit(q, k, v, head_fusion)
    assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype
    assert fused.shape == (q.shape[0], q.shape[2], k.shape[2]) and fused.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), "O is laid out (B, N, H, D) so timm's reshape is free"
    torch.testing.assert_close(fused.cpu(), want_fused.cpu(), rtol=0, atol=F32_TOL)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), want_out.cpu(), rtol=1e-5, atol=1e-5)
    else:
        torch_err = (F.scaled_dot_product_attention(q, k, v).float() - want_out).abs().max()
        err = (out.float() - want_out).abs().max()
        assert err <= 2 * torch_err + 1e-3, f"low-precision error {err:.3g} vs PyTorch's {torch_err:.3g}"


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
    monkeypatch.setattr(fa, "_probs", lambda q, k, s: seen.append(q.shape[0]) or real(q, k, s))
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


_COMPILE_FOR_GPU = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from rollout_fast import fused_attention as fa

kernel = fa.triton_kernel()
assert not fa.triton_interpreted()
c = "constexpr"
def signature(dtype, stride):
    sig = dict(q_ptr="*" + dtype, k_ptr="*" + dtype, v_ptr="*" + dtype, o_ptr="*" + dtype, f_ptr="*fp32",
               H="i32", NQ="i32", NK="i32", D="i32", DV="i32", qk_scale="fp32", inv_h="fp32")
    sig.update({n: stride for n in ("s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn",
                                    "s_ob", "s_oh", "s_on")})
    sig.update(FUSION=c, ONE_PASS=c, BLOCK_M=c, BLOCK_N=c, BLOCK_D=c, BLOCK_DV=c, PRECISION=c)
    return sig
variants = [  # DeiT-S at 224 px (N 197, one pass) in bf16; N > 256 (two passes); float32 with exact dots
    ("bf16", "i32", dict(FUSION=0, ONE_PASS=True, BLOCK_M=16, BLOCK_N=256, BLOCK_D=64, BLOCK_DV=64,
                         PRECISION="tf32")),
    ("fp16", "i64", dict(FUSION=1, ONE_PASS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64,
                         PRECISION="tf32")),
    ("fp32", "i32", dict(FUSION=2, ONE_PASS=True, BLOCK_M=32, BLOCK_N=128, BLOCK_D=16, BLOCK_DV=16,
                         PRECISION="ieee")),
    ("bf16", "i32", dict(FUSION=2, ONE_PASS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128,
                         PRECISION="tf32")),
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


def test_unfused_blocks_fall_back_to_qk_hooks():
    """Blocks running timm's explicit path (fused_attn False) never call SDPA: they are rebuilt from q, k."""
    model, (H, W), _, _ = _build("vit")
    mixed = copy.deepcopy(model)
    mixed.blocks[1].attn.fused_attn = False
    images = torch.randn(2, 3, H, W)
    explainer = AttentionRollout(mixed, discard_ratio=0.5)
    maps = explainer(images)
    assert explainer.info["last_layer_captures"] == ("fused-chunked", "qk-hooks", "fused-chunked")
    assert explainer.info["last_capture"] == "fused-chunked+qk-hooks"
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
