"""rollout_fast.fuse.fuse_conv_bn against the unfused module (the reference) on fresh random inputs."""

import pytest
import torch
from torch import nn

from rollout_fast.fuse import fuse_conv_bn


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so an unfolded or wrongly folded
    BatchNorm shows."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return module.eval()


def _count(module: nn.Module, kind) -> int:
    return sum(type(m) is kind for m in module.modules())


class Named(nn.Module):
    """conv1/bn1, conv2/bn2 siblings as in a ResNet block, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=True), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Reused(nn.Module):
    """conv/bn siblings where the conv's output is also used without the BatchNorm: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)

    def forward(self, x):
        y = self.conv(x)
        return y + self.bn(y)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_sequential_stem_equals_reference(channels_last, batch):
    gen = torch.Generator().manual_seed(batch)
    stem = _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 7, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(7), nn.ReLU(),
        nn.Conv2d(7, 11, 3, padding=1, groups=1), nn.BatchNorm2d(11), nn.ReLU(),
        nn.Conv2d(11, 11, 3, padding=1, groups=11, bias=False), nn.BatchNorm2d(11, affine=False),
        nn.Conv2d(11, 6, 1)), gen)
    x = torch.randn(batch, 3, 13, 9, generator=gen)
    fused, count = fuse_conv_bn(stem, x[:1], channels_last=channels_last)
    assert count == 3
    assert _count(fused, nn.BatchNorm2d) == 0 and _count(stem, nn.BatchNorm2d) == 3  # the original is untouched
    assert not fused.training
    y = torch.randn(batch, 3, 13, 9, generator=gen).permute(0, 1, 3, 2)  # fresh, non-contiguous input
    with torch.no_grad():
        ref, out = stem(y), fused(y)
    # float32: folding rounds each weight once (relative 2^-24) and reorders the sums; outputs of size ~10
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    weight = fused[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_named_pairs_and_timm_resnet():
    timm = pytest.importorskip("timm")
    gen = torch.Generator().manual_seed(1)
    block = _randomise_bn(Named(4), gen)
    x = torch.randn(2, 4, 6, 5, generator=gen)
    fused, count = fuse_conv_bn(block, x)
    assert count == 2 and _count(fused, nn.BatchNorm2d) == 0
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
    net = _randomise_bn(timm.create_model("resnet10t", num_classes=5), gen)  # deep stem, downsample conv/bn
    x = torch.randn(2, 3, 40, 40, generator=gen)
    before = _count(net, nn.BatchNorm2d)
    fused, count = fuse_conv_bn(net, x)
    assert count == before - _count(fused, nn.BatchNorm2d) and count > 0
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_batchnorm_act_is_not_folded():
    timm = pytest.importorskip("timm")
    from timm.layers import ConvNormAct

    gen = torch.Generator().manual_seed(2)
    m = _randomise_bn(ConvNormAct(3, 4, 3), gen)  # conv + BatchNormAct2d (BatchNorm2d with a ReLU inside)
    fused, count = fuse_conv_bn(m, torch.randn(1, 3, 8, 8, generator=gen))
    assert count == 0 and type(fused.bn).__name__ == "BatchNormAct2d"
    assert timm is not None


def test_student():
    from rollout_fast.students import create_student

    gen = torch.Generator().manual_seed(3)
    student = _randomise_bn(create_student("resnet-cifar", input_size=(56, 56), grid=(7, 7), factor=2,
                                           channels=[8, 8, 16, 16]), gen)
    x = torch.randn(3, 3, 56, 56, generator=gen)
    fused, count = fuse_conv_bn(student, x)
    assert count == _count(student, nn.BatchNorm2d) and _count(fused, nn.BatchNorm2d) == 0
    with torch.no_grad():
        ref = student(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_refuses_training_mode_bad_example_and_reused_conv():
    with pytest.raises(ValueError, match="module: expected eval mode"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), torch.zeros(1, 3, 2, 2))
    with pytest.raises(TypeError, match="example: expected an input tensor"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), [1, 2])
    gen = torch.Generator().manual_seed(4)
    with pytest.raises(RuntimeError, match="cannot be fused by structure"):
        fuse_conv_bn(_randomise_bn(Reused(), gen), torch.randn(2, 3, 5, 5, generator=gen))


def test_nothing_to_fold_returns_an_equal_copy():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()  # BN not directly after the conv
    x = torch.randn(2, 3, 7, 7)
    fused, count = fuse_conv_bn(m, x, channels_last=False)
    assert count == 0 and fused is not m
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=0, atol=0)


def test_conv_stem_vit_teacher():
    from rollout_fast.models import create_vit

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    arch = {"img_size": 32, "patch_size": 8, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "embed_layer": {"name": "conv_stem", "convs_per_stage": 2}}
    vit = _randomise_bn(create_vit(arch), gen)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    fused, count = fuse_conv_bn(vit, x[:2])
    assert count == _count(vit, nn.BatchNorm2d) == 6 and _count(fused, nn.BatchNorm2d) == 0
    with torch.no_grad():
        ref = vit(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
