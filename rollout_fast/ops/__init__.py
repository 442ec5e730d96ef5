"""The public ops of rollout_fast and the only place that decides backends.

- :mod:`.rollout`: :func:`attention_rollout`, :func:`grad_attention_rollout`, :func:`available_backends`;
- :mod:`.gather`: :func:`topk_gather` (the fused top-k token gather behind token pruning);
- :mod:`.attention`: :func:`fused_attention` (attention output + head-fused probabilities; the registered
  op ``torch.ops.rollout_fast.fused_attention`` behind the capture);
- :mod:`.registry`: one registry keyed by (op, backend), the "auto" order, and the one
  "is Triton usable here" check (:func:`~.registry.triton_usable`);
- :mod:`.meta`: every fake kernel and autograd formula of the custom ops;
- :mod:`._ext`: the loader of the compiled extension ``rollout_fast._C`` (C++/CUDA kernels, ``csrc/``).

Each op validates its arguments once, here, then runs the registry's backend (the specifications:
:mod:`rollout_fast.reference`; the Triton kernels: :mod:`rollout_fast.triton`, imported on first use).
"""

from __future__ import annotations

from .attention import DEFAULT_CHUNK_BYTES, fused_attention, fused_attention_chunked, fused_attention_triton
from .gather import GATHER_BACKENDS, available_gather_backends, topk_gather
from .rollout import BACKENDS, attention_rollout, available_backends, grad_attention_rollout

__all__ = ["BACKENDS", "DEFAULT_CHUNK_BYTES", "GATHER_BACKENDS", "attention_rollout", "available_backends",
           "available_gather_backends", "fused_attention", "fused_attention_chunked", "fused_attention_triton",
           "grad_attention_rollout", "topk_gather"]
