"""Model definitions shipped with rollout_fast.

Only one thing lives here: :class:`ConvStemPatchEmbed`, the convolutional stem of the embedded
CIFAR-10 teacher. Everything else about the teacher is a stock ``timm`` VisionTransformer.
"""

from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from torch import nn

__all__ = ["ConvStemPatchEmbed", "create_model", "create_vit", "model_logits"]


class ConvStemPatchEmbed(PatchEmbed):
    """Patch embedding with a small convolutional stem instead of one strided projection.

    Xiao et al. 2021, "Early Convolutions Help Transformers See Better" (NeurIPS): replacing the
    ViT patchify layer with a stack of stride-2 3x3 convolutions (BatchNorm + ReLU) and a final 1x1
    convolution makes ViTs converge faster and more robustly, especially on small data. The module
    is a drop-in ``embed_layer`` for ``timm.models.VisionTransformer``: it keeps every attribute of
    ``timm.layers.PatchEmbed`` (``grid_size``, ``num_patches``, ``patch_size`` ...), so there is
    still exactly one token per ``patch_size x patch_size`` patch. ``convs_per_stage`` adds stride-1
    3x3 convolutions after each stride-2 one (a deeper stem, as in Xiao et al.'s larger variants).

    Input ``(B, in_chans, H, W)`` float; output ``(B, gh * gw, embed_dim)`` with
    ``gh = H // patch_size``, ``gw = W // patch_size`` (or NCHW/NHWC per ``output_fmt``).

    Raises:
        ValueError: if ``patch_size`` is not a power of two (the stem is a chain of stride-2 convs).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, *,
                 convs_per_stage: int = 1, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         embed_dim=embed_dim, **kwargs)
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p < 2 or 2 ** int(math.log2(p)) != p:
            raise ValueError(f"patch_size must be a square power of two >= 2, got {self.patch_size}")
        n_down = int(math.log2(p))
        layers: list[nn.Module] = []
        ch_in = in_chans
        for i in range(n_down):
            ch_out = embed_dim // 2 ** (n_down - i)
            for j in range(convs_per_stage):
                layers += [nn.Conv2d(ch_in, ch_out, 3, stride=2 if j == 0 else 1, padding=1,
                                     bias=False),
                           nn.BatchNorm2d(ch_out), nn.ReLU(inplace=True)]
                ch_in = ch_out
        layers.append(nn.Conv2d(ch_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def create_vit(arch: dict) -> nn.Module:
    """Build a timm ``VisionTransformer`` from a JSON-serialisable architecture dict.

    ``arch`` holds ``VisionTransformer`` keyword arguments (``img_size``, ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``num_classes`` ...) plus, optionally,
    ``"embed_layer": {"name": "conv_stem", "convs_per_stage": 2}`` for :class:`ConvStemPatchEmbed`.
    This is the format of the ``arch`` field of rollout_fast's model cards.

    Raises:
        ValueError: for an unknown ``embed_layer`` name.
    """
    import functools

    from timm.models import VisionTransformer

    kwargs = dict(arch)
    embed = kwargs.pop("embed_layer", None)
    if embed is not None:
        embed = dict(embed)
        name = embed.pop("name")
        if name != "conv_stem":
            raise ValueError(f"arch['embed_layer']['name'] must be 'conv_stem', got {name!r}")
        kwargs["embed_layer"] = functools.partial(ConvStemPatchEmbed, **embed)
    return VisionTransformer(**kwargs)


def create_model(arch: dict) -> nn.Module:
    """Build a classifier from a model card's ``arch`` dict: ``arch["type"] == "attnvgg"`` gives
    :func:`rollout_fast.ltpa.create_attnvgg` (Learn to Pay Attention); ``"timm"`` gives
    ``timm.create_model(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))`` with random
    weights (any timm classifier, e.g. a ResNet18 trained on Imagenette as an encoder for the saliency models;
    ``img_size`` is the training and evaluation input side); anything else (no ``type``, or ``"vit"``)
    :func:`create_vit`.

    Raises:
        ValueError: an unknown ``type``, an unknown timm model name or bad architecture arguments.
    """
    kind = arch.get("type", "vit")
    if kind == "attnvgg":
        from .ltpa import create_attnvgg

        return create_attnvgg(arch)
    if kind == "timm":
        return _create_timm(arch)
    if kind != "vit":
        raise ValueError(f"arch['type']: expected 'vit', 'attnvgg' or 'timm', got {kind!r}")
    return create_vit({k: v for k, v in arch.items() if k != "type"})


def _create_timm(arch: dict) -> nn.Module:
    import timm

    unknown = set(arch) - {"type", "name", "num_classes", "img_size", "kwargs"}
    if unknown:
        raise ValueError(f"arch: unknown keys {sorted(unknown)} for type 'timm' (known: name, num_classes, "
                         "img_size, kwargs)")
    name = arch.get("name")
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"arch['name']: expected a timm model name (timm.list_models()), got {name!r}")
    if not isinstance(arch.get("num_classes"), int) or arch["num_classes"] < 1:
        raise ValueError(f"arch['num_classes']: expected a positive integer, got {arch.get('num_classes')!r}")
    return timm.create_model(name, pretrained=False, num_classes=arch["num_classes"], **arch.get("kwargs", {}))


def model_logits(output) -> torch.Tensor:
    """The logits of a classifier's output: the tensor itself, or the first element of a tuple (AttnVGG
    returns ``(logits, attention maps)``)."""
    return output[0] if isinstance(output, (tuple, list)) else output
