"""rollout_fast.precision: a student run under reduced-precision autocast inside a float32 pipeline."""

import pytest
import torch
from torch import nn

from rollout_fast.precision import PRECISIONS, AutocastModule, with_precision


class _TwoOutputs(nn.Module):
    """A small conv net with an attribute (``grid``) and a tuple output (a float map, an integer index)."""

    grid = (3, 5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        y = self.conv(x)  # (B, 4, H, W)
        m = self.lin(y.permute(0, 2, 3, 1)).squeeze(-1)  # (B, H, W)
        return m, m.flatten(1).argmax(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_autocast_module_equals_the_module_under_autocast(dtype, batch):
    torch.manual_seed(0)
    net = _TwoOutputs().eval()
    x = torch.randn(batch, 3, 7, 9)[..., ::1, 1:]  # non-contiguous (B, 3, 7, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want_map, want_idx = net(x)
    with torch.no_grad():
        got_map, got_idx = AutocastModule(net, dtype)(x)
        full, _ = net(x)
    assert got_map.dtype == torch.float32 and got_idx.dtype == torch.int64
    assert torch.equal(got_map, want_map.float()) and torch.equal(got_idx, want_idx)
    # the reduced-precision map is the float32 one up to the dtype's rounding: bf16 keeps 8 mantissa bits (relative
    # step 2^-8 per rounding, a few roundings through conv + linear), fp16 11
    rtol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got_map, full, rtol=rtol, atol=rtol * full.abs().max().item())
    assert not torch.equal(got_map, full)  # it did run in reduced precision


def test_autocast_module_forwards_attributes_and_plain_tensors():
    net = _TwoOutputs()
    wrapped = AutocastModule(net)
    assert wrapped.grid == (3, 5) and wrapped.module is net and wrapped.dtype == torch.bfloat16
    seq = AutocastModule(nn.Sequential(nn.Linear(4, 2)))
    assert seq(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


def test_with_precision_and_bad_input():
    net = _TwoOutputs()
    assert with_precision(net, "fp32") is net and with_precision(None, "bf16") is None
    assert isinstance(with_precision(net, "bf16"), AutocastModule) and with_precision(net, "fp16").dtype == torch.float16
    assert sorted(PRECISIONS) == ["bf16", "fp16", "fp32"]
    with pytest.raises(ValueError, match=r"^precision: expected one of \['bf16', 'fp16', 'fp32'\], got 'int8'$"):
        with_precision(net, "int8")
    with pytest.raises(TypeError, match="^module: expected an nn.Module, got function$"):
        AutocastModule(lambda x: x)
    with pytest.raises(ValueError, match=r"^dtype: expected torch.bfloat16 or torch.float16, got torch.float32$"):
        AutocastModule(net, torch.float32)
