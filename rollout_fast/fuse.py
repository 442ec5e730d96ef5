"""Conv-BatchNorm fusion for inference: fold each eval-mode ``BatchNorm2d`` into the convolution before it.

A convolutional stem (the embedded ViT teachers') or a small ResNet (the distilled students) spends a sixth of
its time in separate BatchNorm passes and NCHW <-> blocked layout conversions on the CPU. Folding
``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` into the convolution's weight and bias (PyTorch's
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`) removes the BatchNorm pass, and channels-last weights let
oneDNN run the convolutions without reordering; the output is the same up to float rounding. This is the
standard inference-time folding (PyTorch's ``torch.ao.quantization.fuse_modules``, TensorRT, ONNX Runtime);
here it is found by structure, so it works on modules torch.fx cannot trace, and checked by value.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fuse_conv_bn"]

# (conv, bn) attribute-name pairs of one module that run one after the other (timm / torchvision ResNet stems and
# blocks, timm ConvNormAct without activation fused into the norm)
_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "bn"))


def _foldable(conv, bn) -> bool:
    # only exactly nn.BatchNorm2d: subclasses (timm's BatchNormAct2d) carry an activation that folding would drop
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _fold_children(module: nn.Module) -> int:
    """Fold the (conv, bn) pairs among ``module``'s direct children in place; returns how many."""
    count = 0
    children = module._modules
    if isinstance(module, nn.Sequential):
        names = list(children)
        for a, b in itertools.pairwise(names):
            if _foldable(children[a], children[b]):
                children[a] = fuse_conv_bn_eval(children[a], children[b])
                children[b] = nn.Identity()
                count += 1
        return count
    for a, b in _NAMED_PAIRS:
        if _foldable(children.get(a), children.get(b)):
            children[a] = fuse_conv_bn_eval(children[a], children[b])
            children[b] = nn.Identity()
            count += 1
    return count


def fuse_conv_bn(module: nn.Module, example: torch.Tensor, *, channels_last: bool = True,
                 rtol: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of ``module`` with every eval-mode BatchNorm2d folded into the Conv2d that feeds it.

    Pairs are found by structure: consecutive ``Conv2d`` -> ``BatchNorm2d`` children of an ``nn.Sequential``,
    and the sibling attributes ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``, ``conv``/``bn`` (timm
    and torchvision ResNets). Only exact ``nn.BatchNorm2d`` layers with running statistics are folded (never a
    subclass such as timm's ``BatchNormAct2d``, whose activation would be lost); each folded one becomes
    ``nn.Identity``. The copy's output on ``example`` is then compared with the original's.

    Args:
        module: an ``nn.Module`` in eval mode; not modified.
        example: an input batch for ``module`` (e.g. (B, 3, H, W) float32 images), used once for the check.
        channels_last: also store the copy's 4-D weights channels-last (oneDNN's preferred layout on the CPU;
            convolution outputs then come out channels-last, which the following ops accept as any layout).
        rtol: the check's tolerance, relative to the largest absolute output: float32 rounding of the folded
            weights changes outputs by about 1e-6 of their scale; a BatchNorm whose input is not only its
            conv's output (the structural rule matched a module that uses the conv elsewhere) changes them by
            far more.

    Returns:
        ``(fused copy, number of BatchNorm layers folded)``; the copy is in eval mode.

    Raises:
        ValueError: ``module`` is in training mode (BatchNorm then uses batch statistics, nothing to fold).
        TypeError: ``example`` is not a tensor.
        RuntimeError: the fused copy's output on ``example`` differs from ``module``'s by more than ``rtol``
            (nothing is returned that computes something else).
    """
    if module.training:
        raise ValueError("module: expected eval mode (call .eval() first); BatchNorm in training mode uses batch "
                         "statistics and cannot be folded")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example: expected an input tensor for the module, got {type(example).__name__}")
    fused = copy.deepcopy(module)
    count = sum(_fold_children(m) for m in list(fused.modules()))
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = module(example), fused(example)
    err = _max_difference(ref, out)
    scale = _max_abs(ref)
    if not err <= rtol * max(scale, 1e-12):
        raise RuntimeError(f"fuse_conv_bn: the fused module's output differs from the original's by {err:.3g} "
                           f"(largest output {scale:.3g}, rtol {rtol:g}); a folded BatchNorm's input is used "
                           "elsewhere too, so this module cannot be fused by structure")
    return fused, count


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def _max_difference(a, b) -> float:
    pairs = list(zip(_flat(a), _flat(b), strict=True))
    return max((float((x.float() - y.float()).abs().max()) for x, y in pairs), default=0.0)


def _max_abs(a) -> float:
    return max((float(x.float().abs().max()) for x in _flat(a)), default=0.0)
