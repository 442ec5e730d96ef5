"""Helpers shared by the tests of every room (pytest puts tests/ on sys.path: ``from helpers import ...``).

- flags with skip reasons: the compiled extension, a GPU, Triton;
- :func:`make_attention` (quantised softmax attention in a chosen memory layout) and :func:`assert_matches`
  (the allclose that reports the worst element, its index and how many failed);
- :func:`peaky_vit`, :func:`explicit_attention`: timm models and their explicit attention for the capture tests;
- :func:`run_without_interpreter`, :func:`compile_for_gpu`: compiling Triton kernels for GPUs on a machine
  without one.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from rollout_fast import reference
from rollout_fast.ops import _ext

HAS_EXT = _ext.loaded()
HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_EXT = f"compiled extension not available: {_ext.load_error()}"
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
NO_CUDA_BUILD = "the extension was built without CUDA"

RTOL = 1e-5        # relative to each element
SCALE_TOL = 1e-5   # relative to the largest |reference| value


# ------------------------------------------------------------------------------- inputs and comparison
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


# ------------------------------------------------------------------------------- attention inputs
F32_TOL = 2e-6


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


# ------------------------------------------------------------------------------------ timm models
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


# ------------------------------------------------------------------------- Triton kernels for GPUs
def run_without_interpreter(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c script args...`` in a fresh process with TRITON_INTERPRET unset, so the kernels are
    built by Triton's real compiler (which type-checks what the interpreter does not)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


_COMPILE_LOOP = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

for arch in map(int, sys.argv[1:]):
    for fn, signature, constexprs in kernels:
        out = compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        assert out.asm.get("cubin"), (fn.__name__, arch)
"""


def compile_for_gpu(kernels_script: str, *archs: str) -> subprocess.CompletedProcess:
    """:func:`run_without_interpreter` on ``kernels_script`` (which defines ``kernels``, a list of
    ``(jit_function, signature, constexprs)``) followed by compiling each kernel to a cubin for each of
    ``archs`` (e.g. "80", "90"); a non-zero return code says which failed."""
    return run_without_interpreter(kernels_script + _COMPILE_LOOP, *archs)
