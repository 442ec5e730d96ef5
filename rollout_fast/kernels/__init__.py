"""Python side of the fused rollout kernels (private; use :func:`rollout_fast.attention_rollout`).

- :mod:`._ext`: loads the compiled extension ``rollout_fast._C`` (C++ CPU kernel, CUDA kernels when
  built with CUDA) on first use, with an actionable error when it is missing, and registers the fake
  (meta) kernels of its custom ops ``torch.ops.rollout_fast.rollout`` and ``fused_layers``.
- :mod:`.backends`: the backend functions ``rollout_fast.ops`` registers as "cpu", "cuda" and
  "triton" (each takes the validated :class:`rollout_fast.reference.RolloutArgs`).

Nothing here is imported by ``import rollout_fast``; the extension loads when a backend is first
queried or run.
"""
