"""rollout_fast: fast attention rollout for Vision Transformers.

Public API:
    attention_rollout        the rollout op (reference semantics, fastest available backend)
    grad_attention_rollout   class-specific gradient rollout from attention and its gradient
    available_backends       which backends this install has
    AttentionRollout         rollout maps straight from a ViT (timm, Hugging Face, torchvision, open_clip) and
                             a batch of images (fused attention capture; ``.grad_rollout(images, targets)``)
    check_model              does the fast capture equal the model's own explicit attention? (also
                             ``python -m rollout_fast.check MODEL``)
    load_teacher             the embedded CIFAR-10 teacher, any timm model, or a local checkpoint
    load_student             the shipped student of the embedded teacher (predicts its rollout from a thumbnail)
    load_saliency_model      a saliency encoder-decoder (shipped name or safetensors + card) predicting where people look
    prune_tokens             a ViT that runs its blocks on the prefix tokens + the top-scored patch tokens
    topk_gather              the fused top-k token gather behind prune_tokens
"""

from __future__ import annotations

__version__ = "0.1.0"

from .ops import attention_rollout, available_backends, grad_attention_rollout  # noqa: E402

__all__ = ["attention_rollout", "available_backends", "grad_attention_rollout", "AttentionRollout",
           "check_model", "load_teacher", "load_student", "load_saliency_model", "prune_tokens", "topk_gather",
           "__version__"]


def __getattr__(name):  # lazy: importing the op must not import timm
    if name == "AttentionRollout":
        from .explain import AttentionRollout
        return AttentionRollout
    if name == "check_model":
        from .check import check_model
        return check_model
    if name == "load_teacher":
        from .zoo import load_teacher
        return load_teacher
    if name == "load_student":
        from .zoo import load_student
        return load_student
    if name == "load_saliency_model":
        from .saliency.models import load_saliency_model
        return load_saliency_model
    if name == "prune_tokens":
        from .prune import prune_tokens
        return prune_tokens
    if name == "topk_gather":
        from .ops import topk_gather
        return topk_gather
    raise AttributeError(f"module 'rollout_fast' has no attribute {name!r}")
