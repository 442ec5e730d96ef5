"""Getting attention out of timm Vision Transformers without changing the user's model.

timm (>= 0.9) computes attention with ``F.scaled_dot_product_attention`` (SDPA) when ``attn.fused_attn``
is True, so the attention probabilities never exist as a tensor and hooks on ``attn_drop`` never fire
(vit-explain issue #23). Flipping ``fused_attn`` or ``timm.layers.set_fused_attn`` changes the user's
model. Nothing here does either; every path uses temporary hooks, removed (and each module's
train/eval flag restored) before returning, and timm's own ``Attention.forward`` runs unchanged:

- ``'fused-triton'`` / ``'fused-chunked'`` (the fast paths, :func:`capture_attention` picks one with
  ``capture='auto'``): while a block's ``attn`` runs (forward pre-hook to forward hook), a
  ``TorchFunctionMode`` intercepts its SDPA call and answers it with
  :func:`rollout_fast.ops.fused_attention` (the registered op ``rollout_fast::fused_attention``), which
  returns the attention output *and* the head-fused (B, N, N) probabilities in one pass (a Triton kernel
  on CUDA; batch-chunked PyTorch elsewhere; :mod:`rollout_fast.ops` decides which). Per-head
  probabilities are never stored; the model's output equals its SDPA output within the dtype's tolerance.
- ``'qk-hooks'`` (the foundation path, and the per-layer fallback of the fast paths when a block's SDPA
  call cannot be answered, e.g. ``fused_attn=False`` or an unusual call): forward hooks on
  ``attn.q_norm`` / ``attn.k_norm`` (``nn.Identity`` without q/k norm, called by every timm
  ``Attention.forward`` right before SDPA) see the exact q and k, and ``softmax(q k^T * scale)`` is rebuilt
  from them in float32 and head-fused at once, chunk by chunk; SDPA itself runs as usual.
- gradients (:func:`capture_attention_grad`, REFERENCE.md section 2): the intercepted SDPA call is answered
  with the explicit ``softmax(q k^T * scale) @ v`` in float32, so the probabilities ``A_l`` are tensors
  of the autograd graph; ``dy/dA_l`` for ``y = sum_b logits[b, target_b]`` comes from one
  ``torch.autograd.grad`` call. Models running timm's non-fused path are read at ``attn_drop``.

Modules: :mod:`.model` (supported models, token layout), :mod:`.hooks` (the temporary hooks),
:mod:`.forward` (:func:`capture_attention`), :mod:`.grad` (:func:`capture_attention_grad`).
"""


from __future__ import annotations

from .forward import CAPTURES, CaptureResult, capture_attention, resolve_capture
from .grad import GradCapture, capture_attention_grad, check_targets
from .model import TokenLayout, UnsupportedModelError, attention_modules, token_layout

__all__ = [
    "CAPTURES",
    "CaptureResult",
    "GradCapture",
    "TokenLayout",
    "UnsupportedModelError",
    "attention_modules",
    "capture_attention",
    "capture_attention_grad",
    "check_targets",
    "resolve_capture",
    "token_layout",
]
