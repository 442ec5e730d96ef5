"""The ViT families the capture reads: timm, Hugging Face transformers, torchvision and open_clip.

:func:`describe_model` tells what the capture needs from a model, read from the model itself (never
assumed): the module of each transformer block inside whose forward the block's attention is computed,
where its exact probabilities can be read, the token layout (prefix tokens, patch grid) and how to find
class logits in the forward's output.

| family | blocks | the attention is read at |
|---|---|---|
| timm ``VisionTransformer``, relpos, BEiT, EVA / RoPE ViTs | ``model.blocks[i].attn`` | its SDPA call, or ``attn_drop`` (explicit path) |
| Hugging Face ViT, DeiT (incl. distilled), Dinov2 (incl. registers), BEiT, Data2VecVision, CLIP / SigLIP vision | the encoder's layers | the SDPA call (``attn_implementation="sdpa"``), or the softmax of ``"eager"`` |
| torchvision ``VisionTransformer`` (vit_b_16 ...), open_clip ``VisionTransformer`` (``clip.visual``) | each block's ``nn.MultiheadAttention`` | its call, answered as the self-attention SDPA it is |

Anything else (Swin, XCiT, LeViT, PiT and other windowed or pooled attention; a Hugging Face model that is
not a plain global-attention ViT) raises :class:`UnsupportedModelError` with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .model import TokenLayout, UnsupportedModelError, timm_attention_modules, timm_layout

__all__ = ["HF_MODEL_TYPES", "ViTSpec", "attention_modules", "default_input_size", "describe_model", "token_layout"]

# Hugging Face model_type -> (number of prefix tokens given the config, has a class token)
HF_MODEL_TYPES: dict[str, tuple[Callable, bool]] = {
    "vit": (lambda c: 1, True),
    "deit": (lambda c: 2, True),  # class + distillation token (DeiTModel always has both)
    "dinov2": (lambda c: 1, True),
    "dinov2_with_registers": (lambda c: 1 + int(getattr(c, "num_register_tokens", 0)), True),
    "beit": (lambda c: 1, True),
    "data2vec-vision": (lambda c: 1, True),
    "vit_msn": (lambda c: 1, True),
    "clip_vision_model": (lambda c: 1, True),
    "siglip_vision_model": (lambda c: 0, False),
}
_NOT_GLOBAL = ("swin", "xcit", "levit", "pit", "pvt", "maxvit", "coat", "crossvit", "twins", "nest",
               "mvit", "efficientformer", "mobilevit", "focalnet", "hiera", "hgnet", "convit")


@dataclass(frozen=True)
class ViTSpec:
    """What the capture needs from one model (see :func:`describe_model`).

    ``family``: 'timm' | 'transformers' | 'torchvision' | 'open_clip'; ``attentions``: one module per
    transformer block, in forward order, inside whose forward the block's attention is computed (the
    capture's hooks scope); ``probs_at``: 'attn_drop' (timm's explicit path) or 'softmax' (an explicit
    softmax inside the scope, e.g. Hugging Face's eager attention) where the probabilities are read when
    no SDPA / ``nn.MultiheadAttention`` call was answered; ``classifier``: the forward returns class logits
    (grad rollout needs them); ``prune_input``: the module whose input is the (B, N, D) token sequence
    after the position embeddings, where non-timm models are pruned (None: timm's ``patch_drop`` or not
    prunable); ``prune_refusal``: why pruning would be wrong, or None.
    """

    family: str
    attentions: tuple[nn.Module, ...]
    probs_at: str
    classifier: bool
    has_class_token: bool
    _layout: Callable[[tuple[int, int]], TokenLayout] = field(repr=False)
    _logits: Callable = field(repr=False)
    prune_input: nn.Module | None = field(default=None, repr=False)
    prune_refusal: str | None = None

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """The :class:`TokenLayout` for images of ``image_size`` = (H, W) pixels."""
        return self._layout(tuple(int(s) for s in image_size))

    def logits(self, output):
        """Class logits (B, C) from the forward's ``output`` (a Hugging Face ``ModelOutput``'s ``logits``),
        or ``output`` itself where the model has no classifier."""
        return self._logits(output)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def _grid_layout(P: int, patch, has_cls: bool):
    ph, pw = _pair(patch)
    return lambda hw: TokenLayout(P, (hw[0] // ph, hw[1] // pw), has_cls)


def _identity(output):
    return output


def _hf_logits(output):
    logits = getattr(output, "logits", None)
    return output if logits is None else logits


def describe_model(model: nn.Module) -> ViTSpec:
    """The :class:`ViTSpec` of ``model``: a timm, Hugging Face, torchvision or open_clip ViT.

    Raises:
        UnsupportedModelError (a TypeError): any other model, with the reason (e.g. windowed attention).
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model: expected a ViT nn.Module, got {type(model).__name__}")
    if all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens")):
        return _timm(model)
    if _is_hf(model):
        return _transformers(model)
    tv = sys.modules.get("torchvision.models.vision_transformer")
    if tv is not None and isinstance(model, tv.VisionTransformer):
        return _torchvision(model)
    oc = sys.modules.get("open_clip.transformer")
    if oc is not None and isinstance(model, oc.VisionTransformer):
        return _open_clip(model)
    if oc is not None and hasattr(model, "visual") and isinstance(model.visual, oc.VisionTransformer):
        raise UnsupportedModelError(f"model: {type(model).__name__} is a whole open_clip model; pass its image "
                                    "tower, model.visual")
    name = type(model).__name__
    why = ("its attention is windowed, pooled or convolutional, not global self-attention over one token "
           "sequence" if any(k in name.lower() for k in _NOT_GLOBAL) else
           "not a timm, Hugging Face, torchvision or open_clip Vision Transformer")
    raise UnsupportedModelError(f"model: {name} is not supported: {why}")


def _timm(model: nn.Module) -> ViTSpec:
    mods = tuple(timm_attention_modules(model))
    return ViTSpec("timm", mods, "attn_drop", getattr(model, "num_classes", 0) > 0,
                   getattr(model, "cls_token", None) is not None, lambda hw: timm_layout(model, hw), _identity)


def _is_hf(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _transformers(model: nn.Module) -> ViTSpec:
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    if vision is not None and cfg.model_type not in HF_MODEL_TYPES:
        raise UnsupportedModelError(f"model: {type(model).__name__} is a Hugging Face {cfg.model_type!r} model with "
                                    "a vision tower; pass the vision model (e.g. model.vision_model, or "
                                    "CLIPVisionModel / SiglipVisionModel)")
    mt = cfg.model_type
    if mt not in HF_MODEL_TYPES:
        why = ("windowed or pooled attention, not global self-attention over one token sequence"
               if any(k in mt for k in _NOT_GLOBAL) else "not one of the supported global-attention ViTs")
        raise UnsupportedModelError(f"model: Hugging Face model_type {mt!r} ({type(model).__name__}) is not supported: "
                                    f"{why}; supported: {sorted(HF_MODEL_TYPES)}")
    layers = _hf_layers(model)
    prefix, has_cls = HF_MODEL_TYPES[mt]
    P = prefix(cfg)
    has_logits = "ForImageClassification" in type(model).__name__
    refusal = None
    if mt in ("beit", "data2vec-vision") and (getattr(cfg, "use_relative_position_bias", False)
                                             or getattr(cfg, "use_shared_relative_position_bias", False)):
        refusal = (f"{type(model).__name__} adds a relative-position bias to its attention; the bias is not "
                   "gathered for kept tokens")
    return ViTSpec("transformers", tuple(layers), "softmax", has_logits, has_cls,
                   _grid_layout(P, cfg.patch_size, has_cls), _hf_logits,
                   prune_input=layers[0], prune_refusal=refusal)


def _hf_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers: the shallowest non-empty ``ModuleList`` named ``layer`` / ``layers`` (``encoder.layer``
    in ViT / Dinov2 / BEiT, ``layers`` in DeiT, ``vision_model.encoder.layers`` in CLIP / SigLIP)."""
    found = [(name.count("."), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and name.split(".")[-1] in ("layer", "layers")]
    if not found:
        raise UnsupportedModelError(f"model: {type(model).__name__} has no list of transformer layers")
    return list(min(found, key=lambda t: t[0])[2])


def _mha_blocks(blocks, attr: str, where: str) -> list[nn.Module]:
    mods = []
    for i, b in enumerate(blocks):
        attn = getattr(b, attr, None)
        if not isinstance(attn, nn.Module):
            raise UnsupportedModelError(f"{where}[{i}]: no attention module .{attr}")
        mods.append(attn)
    if not mods:
        raise UnsupportedModelError("model: has no transformer blocks")
    return mods


def _torchvision(model: nn.Module) -> ViTSpec:
    blocks = list(model.encoder.layers)
    mods = _mha_blocks(blocks, "self_attention", "model.encoder.layers")
    P = 1 if getattr(model, "class_token", None) is not None else 0
    return ViTSpec("torchvision", tuple(mods), "softmax", True, P == 1, _grid_layout(P, model.patch_size, P == 1),
                   _identity, prune_input=blocks[0])


def _open_clip(model: nn.Module) -> ViTSpec:
    blocks = list(model.transformer.resblocks)
    mods = _mha_blocks(blocks, "attn", "model.transformer.resblocks")
    P = 1 if getattr(model, "class_embedding", None) is not None else 0
    refusal = None if getattr(model.transformer, "batch_first", True) else (
        "this open_clip version runs its blocks sequence-first (batch_first=False)")
    return ViTSpec("open_clip", tuple(mods), "softmax", False, P == 1, _grid_layout(P, model.patch_size, P == 1),
                   _identity, prune_input=blocks[0], prune_refusal=refusal)


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) input size in pixels ``model`` was built for (timm ``patch_embed.img_size``, a Hugging Face
    config's ``image_size``, torchvision's / open_clip's ``image_size``; 224 x 224 when none is recorded)."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return _pair(pe.img_size)
    size = getattr(getattr(model, "config", None), "image_size", None)
    if size is None:
        size = getattr(model, "image_size", None)
    return (224, 224) if size is None else _pair(size)


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """Prefix-token count and patch grid of ``model`` for images of ``image_size`` = (H, W) pixels.

    Read from the model (timm: ``num_prefix_tokens``, ``patch_embed``; Hugging Face: the config's patch size,
    class / distillation / register tokens; torchvision and open_clip: the class token and patch size), never
    assumed. See :func:`describe_model`.

    Raises:
        UnsupportedModelError: ``model`` is not a supported ViT.
        ValueError: a fixed-size timm model given another input size.
    """
    return describe_model(model).layout(image_size)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The module of each transformer block inside whose forward the block's attention is computed.

    timm: each block's ``attn`` (``Attention``, ``RelPosAttention``, BEiT's and EVA's attentions), read at its
    SDPA call (fused path) or at ``attn_drop`` (explicit path), where the model's exact probabilities are.
    Hugging Face: each encoder layer (SDPA call, or the softmax of the eager implementation). torchvision and
    open_clip: each block's ``nn.MultiheadAttention`` (its call answered as self-attention SDPA).

    Raises:
        UnsupportedModelError: not a supported ViT, or a block's attention rollout_fast cannot read.
    """
    return list(describe_model(model).attentions)
