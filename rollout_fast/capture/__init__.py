"""Getting attention out of Vision Transformers (timm, Hugging Face, torchvision, open_clip; see
:mod:`.families`) without changing the user's model.

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
- ``'qk-hooks'`` (``capture='qk-hooks'``, per-head attention with ``head_fusion=None``, and the per-layer
  fallback of the fused paths when a block's q, k, v cannot go to the fused op, e.g. float64): SDPA runs as
  usual and ``softmax(q k^T * scale + mask)`` is rebuilt in float32 from the q, k, ``attn_mask`` and scale
  of the SDPA call itself, so rotary embeddings (EVA, RoPE ViTs) and relative-position biases (relpos
  ViTs, BEiT) are included exactly; head-fused at once, chunk by chunk.
- ``'attn-drop'`` (blocks running timm's explicit path, ``fused_attn=False``): the model's own
  probabilities are read at ``attn_drop`` (checked to be rows of probabilities) and fused;
  ``'eager-softmax'``: Hugging Face's eager attention, read at its softmax the same way.
- ``nn.MultiheadAttention`` (torchvision, open_clip): its call is answered as the self-attention SDPA call it
  makes (q, k, v from its packed projection), so every path above applies.
- An SDPA call the capture cannot reproduce exactly (causal, dropout, grouped-query, not self-attention)
  raises ``UnsupportedModelError`` saying why: no path returns a map from attention the model did not compute.
- gradients (:func:`capture_attention_grad`, REFERENCE.md section 2): the intercepted SDPA call is answered
  with the explicit ``softmax(q k^T * scale + mask) @ v`` in float32, so the probabilities ``A_l`` are tensors
  of the autograd graph; ``dy/dA_l`` for ``y = sum_b logits[b, target_b]`` comes from one
  ``torch.autograd.grad`` call. Models running timm's non-fused path are read at ``attn_drop``.

Threads: captures of one model run one at a time (a re-entrant lock per attention module, held for the
forward); hooks act only on the calling thread, so other threads' plain forwards are not tapped.

Modules: :mod:`.model` (token layout), :mod:`.families` (the supported models), :mod:`.hooks` (the temporary hooks),
:mod:`.forward` (:func:`capture_attention`), :mod:`.grad` (:func:`capture_attention_grad`).
"""


from __future__ import annotations

from .families import ViTSpec, attention_modules, default_input_size, describe_model, token_layout
from .forward import CAPTURES, CaptureResult, capture_attention, resolve_capture
from .grad import GradCapture, capture_attention_grad, check_targets
from .model import TokenLayout, UnsupportedModelError

__all__ = [
    "CAPTURES",
    "CaptureResult",
    "GradCapture",
    "TokenLayout",
    "UnsupportedModelError",
    "ViTSpec",
    "attention_modules",
    "capture_attention",
    "capture_attention_grad",
    "check_targets",
    "default_input_size",
    "describe_model",
    "resolve_capture",
    "token_layout",
]
