"""Convnet students: a timm ResNet trunk + a multi-scale map head.

- ``"resnet"``: timm ``resnet18`` (He et al., "Deep Residual Learning for Image Recognition", CVPR
  2016; BasicBlock layout 2-2-2-2, widths 64-512) adapted to small inputs: the 7x7 stem conv runs at
  stride 1 and the max-pool is removed, so ``--pretrained`` ImageNet weights still load. The seeds'
  convnet student (ResNet18 + MLP head, MSE).
- ``"resnet-cifar"``: a light CIFAR-style timm ResNet (BasicBlock, one block per stage by default,
  widths 24-48-96-192, 3x3 stride-1 stem, no max-pool; He et al.'s CIFAR variant). The shipped student.

Map head: the outputs of all four stages are average-pooled (or bilinearly upsampled) to the teacher's
grid, concatenated, and mapped by 1x1 conv -> BN -> ReLU -> 1x1 conv to one score per patch, plus a
learned per-patch bias (an explicit positional prior).
"""

from __future__ import annotations

import torch
from torch import nn

from .inputs import to_grid
from .registry import BuildContext, register_student

__all__ = ["ConvMapNet"]

_CONV_STRATEGIES = ("downsize", "lowres")


class ConvMapNet(nn.Module):
    """timm ResNet trunk + multi-scale map head -> (B, gh, gw) logits."""

    def __init__(self, trunk: nn.Module, channels: list[int], grid: tuple[int, int], head_width: int):
        super().__init__()
        self.trunk = trunk
        self.grid = grid
        self.head = nn.Sequential(
            nn.Conv2d(sum(channels), head_width, 1, bias=False), nn.BatchNorm2d(head_width),
            nn.ReLU(inplace=True), nn.Conv2d(head_width, 1, 1))
        self.bias_map = nn.Parameter(torch.zeros(grid))
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.trunk
        x = t.maxpool(t.act1(t.bn1(t.conv1(x))))
        feats = []
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.cat([to_grid(f, self.grid) for f in self.features(x)], dim=1)
        return self.head(f)[:, 0] + self.bias_map

    def head_modules(self) -> list[nn.Module]:
        return [self.head]

    def backbone(self) -> nn.Module:
        return self.trunk


@register_student("resnet", options={"head_width": 64}, strategies=_CONV_STRATEGIES)
def resnet18_student(ctx: BuildContext) -> nn.Module:
    import timm

    trunk = timm.create_model("resnet18", pretrained=ctx.pretrained, num_classes=0, global_pool="")
    trunk.conv1.stride = (1, 1)  # small inputs: keep the (pretrained) 7x7 stem, stride 1
    trunk.maxpool = nn.Identity()
    return ConvMapNet(trunk, [64, 128, 256, 512], ctx.grid, int(ctx.options["head_width"]))


@register_student("resnet-cifar", options={"channels": [24, 48, 96, 192], "layers": [1, 1, 1, 1], "head_width": 64},
                  strategies=_CONV_STRATEGIES)
def resnet_cifar_student(ctx: BuildContext) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    if ctx.pretrained:
        raise ValueError("pretrained: there are no pretrained weights for 'resnet-cifar'; use "
                         "student 'resnet' or 'vit-tiny'")
    channels, layers = list(ctx.options["channels"]), list(ctx.options["layers"])
    if len(channels) != 4 or len(layers) != 4 or min(channels + layers) < 1:
        raise ValueError(f"channels/layers: expected four positive ints each, got {channels}, {layers}")
    trunk = ResNet(BasicBlock, layers, channels=tuple(channels), stem_width=channels[0],
                   num_classes=0, global_pool="")
    trunk.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
    trunk.bn1 = nn.BatchNorm2d(channels[0])
    trunk.maxpool = nn.Identity()
    # timm's plain stem always has 64 channels: rebuild stage 1 at the stem's width (no projection)
    trunk.layer1 = nn.Sequential(*[BasicBlock(channels[0], channels[0]) for _ in range(layers[0])])
    for blk in trunk.layer1:
        blk.zero_init_last()
    return ConvMapNet(trunk, channels, ctx.grid, int(ctx.options["head_width"]))
