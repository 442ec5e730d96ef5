"""Every fake (meta) kernel and autograd formula of the rollout_fast custom ops, in one place.

torch needs these to trace the ops (torch.compile, FakeTensorMode, ``torch.library.opcheck``). The C++
library names this module as its Python module (``csrc/ops.cpp``, ``set_python_module``), so torch imports
it, and with it the compiled ops' fakes, whenever it needs them; importing it loads the extension.

- compiled ops (``rollout_fast._C``): ``rollout``, ``fused_layers``, ``topk_gather`` (+ autograd):
  :func:`register_compiled`;
- Triton ops (:mod:`rollout_fast.triton`): ``rollout_triton``, ``fused_layers_triton`` (fakes only where
  the kernels are interpreted: a ``triton_op`` is traced through its kernels), ``topk_gather_triton``
  (+ autograd): :func:`register_triton_rollout`, :func:`register_triton_gather`;
- ``fused_attention`` (:mod:`rollout_fast.ops.attention`): :func:`register_fused_attention`.
"""

from __future__ import annotations

import torch

from . import _ext

__all__ = ["gather_backward", "gather_setup_context", "load_compiled", "register_compiled",
           "register_fused_attention", "register_triton_gather", "register_triton_rollout"]

_done: set[str] = set()


def _once(name: str) -> bool:
    """True the first time ``name`` is asked for (then its registrations run)."""
    if name in _done:
        return False
    _done.add(name)
    return True


# ------------------------------------------------------------------------------------------ rollout
def _rollout_fake(attentions, head_fusion, discard_ratio, num_prefix_tokens, protect_prefix, readout, normalize,
                  row_tolerance=None):
    torch._check(attentions.dim() == 5, lambda: "rollout_fast: attentions must be (L, B, H, N, N)")
    _, B, _, N, _ = attentions.shape
    shape = (B, N, N) if readout == "full" else (B, N - num_prefix_tokens)
    return attentions.new_empty(shape, dtype=torch.float32)


def _fused_layers_fake(attentions, head_fusion, discard_ratio, protect_first):
    torch._check(attentions.dim() == 5, lambda: "rollout_fast: attentions must be (L, B, H, N, N)")
    L, B, _, N, _ = attentions.shape
    return attentions.new_empty((L, B, N, N), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- gather
def _topk_gather_fake(tokens, scores, k, num_prefix_tokens):
    torch._check(tokens.dim() == 3, lambda: "rollout_fast::topk_gather: tokens must be (B, N, D)")
    B, _, D = tokens.shape
    return tokens.new_empty((B, num_prefix_tokens + k, D)), scores.new_empty((B, k), dtype=torch.int64)


# Autograd of the gather ops (compiled topk_gather and Triton topk_gather_triton): the kept tokens' gradient
# goes back to the tokens they came from, 0 for the dropped ones; none to the scores.
def gather_setup_context(ctx, inputs, output):
    tokens, _, _, P = inputs
    ctx.shape, ctx.P = tokens.shape, P
    ctx.save_for_backward(output[1])


def gather_backward(ctx, grad_kept, grad_indices):
    (idx,) = ctx.saved_tensors
    return _scatter_back(grad_kept, idx, ctx.shape, ctx.P), None, None, None


def _scatter_back(grad_kept: torch.Tensor, idx: torch.Tensor, shape, P: int) -> torch.Tensor:
    """Gradient of the gather: ``grad_kept`` (B, P + k, D) back to the tokens' (B, N, D); 0 for dropped tokens."""
    grad = grad_kept.new_zeros(shape)
    grad[:, :P] = grad_kept[:, :P]
    grad[:, P:].scatter_(1, idx.unsqueeze(-1).expand(-1, -1, shape[-1]), grad_kept[:, P:])
    return grad


# ---------------------------------------------------------------------------------- fused attention
def _fused_attention_fake(q, k, v, fused, scale, head_fusion, chunk_bytes, mask=None):
    B, H, Nq, _ = q.shape
    return q.new_empty((B, Nq, H, v.shape[-1])).transpose(1, 2)  # (B, Nq, H, Dv) memory, as the kernels


# ------------------------------------------------------------------------------------- registration
def register_compiled() -> None:
    """Fakes of the compiled ops and the autograd of ``topk_gather`` (once; the extension must be loaded)."""
    if not _once("compiled"):
        return
    torch.library.register_fake("rollout_fast::rollout")(_rollout_fake)
    torch.library.register_fake("rollout_fast::fused_layers")(_fused_layers_fake)
    torch.library.register_fake("rollout_fast::topk_gather")(_topk_gather_fake)
    torch.library.register_autograd("rollout_fast::topk_gather", gather_backward, setup_context=gather_setup_context)


def load_compiled():
    """Load ``rollout_fast._C`` and register its ops' fakes and autograd; the module, or None."""
    module = _ext.load()
    if module is not None:
        register_compiled()
    return module


def register_triton_rollout(interpreted: bool) -> None:
    """Fakes of ``rollout_triton`` / ``fused_layers_triton`` where they are opaque (interpreted) custom ops."""
    if _once("triton_rollout") and interpreted:
        torch.library.register_fake("rollout_fast::rollout_triton")(_rollout_fake)
        torch.library.register_fake("rollout_fast::fused_layers_triton")(_fused_layers_fake)


def register_triton_gather(interpreted: bool) -> None:
    """Autograd of ``topk_gather_triton``, and its fake where it is an opaque (interpreted) custom op."""
    if not _once("triton_gather"):
        return
    if interpreted:
        torch.library.register_fake("rollout_fast::topk_gather_triton")(_topk_gather_fake)
    torch.library.register_autograd("rollout_fast::topk_gather_triton", gather_backward,
                                    setup_context=gather_setup_context)


def register_fused_attention(triton_op: bool) -> None:
    """Fake of ``fused_attention`` where it is an opaque custom op (a ``triton_op`` is its own fake: torch
    traces its implementation, whose CPU branch is plain PyTorch)."""
    if _once("fused_attention") and not triton_op:
        torch.library.register_fake("rollout_fast::fused_attention")(_fused_attention_fake)


# torch imports this module (set_python_module) when it needs the compiled ops' fakes.
load_compiled()
