"""Lowering (``passes/lowering.py``): each lowered BSConv step computes what it replaced (strides,
dilations, every padding, BSConv-S, an inner BatchNorm), shares its parameters, and what cannot be
lowered is left with a reason."""

import copy

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from bsconv_surgery import BSConvS, BSConvU
from bsconv_surgery.layers import DepthwiseAsStencil, PointwiseAsLinear
from bsconv_surgery.passes.lowering import lower_bsconv

from ..helpers import randomize_batchnorm

# (block, input size): strides, dilations, int / 'same' / 'valid' / asymmetric padding, bias,
# rectangular kernels, BSConv-S, and an inner BatchNorm that is not folded.
BLOCKS = [
    (lambda: BSConvU(6, 10, 3, padding=1), (6, 9, 9)),
    (lambda: BSConvU(6, 10, 3, stride=2, padding=1, bias=False), (6, 9, 10)),
    (lambda: BSConvU(6, 10, 5, stride=(2, 1), padding=(1, 3), dilation=(1, 2)), (6, 12, 11)),
    (lambda: BSConvU(4, 8, (1, 5), padding="same", dilation=2), (4, 7, 13)),
    (lambda: BSConvU(4, 8, 4, padding="same"), (4, 8, 8)),  # even kernel: 'same' pads 1 left, 2 right
    (lambda: BSConvU(4, 8, 3, padding="valid", stride=3), (4, 11, 11)),
    (lambda: BSConvU(5, 7, 3, padding=1, with_bn=True), (5, 6, 6)),
    (lambda: BSConvS(12, 9, 3, stride=2, padding=1, p=0.5), (12, 9, 9)),
    (lambda: BSConvS(12, 9, 3, padding=1, p=0.25, with_bn=True), (12, 6, 7)),
]


def _eval_double(block):
    return randomize_batchnorm(block).double().eval()


@pytest.mark.parametrize("make, size", BLOCKS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lowered_block_computes_the_same(make, size, channels_last, rng):
    torch.manual_seed(0)
    block = _eval_double(make())
    x = torch.randn(2, *size, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        lowered = copy.deepcopy(block)
        report = lower_bsconv(lowered)
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        got = lowered(xin)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in block.children())  # BatchNorm2d wants 4D
        unbatched = None if has_bn else lowered(x[0])
    convs = [n for n, m in block.named_children() if isinstance(m, nn.Conv2d)]
    assert [r["name"] for r in report.lowered] == convs and not report.skipped, report.as_dict()
    assert isinstance(lowered.dw, DepthwiseAsStencil)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if unbatched is not None:
        torch.testing.assert_close(unbatched, expected[0], rtol=1e-10, atol=1e-10)


def test_lowering_keeps_parameters_and_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BSConvU(6, 8, 3, padding=1), BSConvS(8, 8, 3, p=0.5))
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    report = lower_bsconv(model)
    assert len(report.lowered) == 5, report.as_dict()
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # the same tensors
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert type(model[0]) is nn.Conv2d, "a conv outside a BSConv block must stay as it is"
    assert isinstance(model[2].pw1, PointwiseAsLinear) and isinstance(model[2].pw2, PointwiseAsLinear)
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # still loads


def test_lowering_leaves_what_it_cannot_compute_alone():
    reflect = BSConvU(4, 6, 3, padding=1, padding_mode="reflect")
    same = BSConvU(4, 6, 3, stride=2, padding=0, depthwise_cls=Conv2dSame)
    model = nn.Sequential(reflect, same)
    report = lower_bsconv(model)
    reasons = {r["name"]: r["reason"] for r in report.skipped}
    assert "reflect" in reasons["0.dw"] and "Conv2dSame" in reasons["1.dw"], reasons
    assert type(model[0].dw) is nn.Conv2d and type(model[1].dw) is Conv2dSame
    assert isinstance(model[0].pw, PointwiseAsLinear), "the pointwise step lowers on its own"




def test_lowering_only_the_steps_asked_for(rng):
    block = _eval_double(BSConvS(12, 9, 3, padding=1, p=0.5))
    x = torch.randn(2, 12, 7, 7, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
    only_dw = copy.deepcopy(block)
    report = lower_bsconv(only_dw, steps=("depthwise",))
    assert [r["name"] for r in report.lowered] == ["dw"] and isinstance(only_dw.dw, DepthwiseAsStencil)
    assert type(only_dw.pw1) is nn.Conv2d and type(only_dw.pw2) is nn.Conv2d
    only_pw = copy.deepcopy(block)
    assert {r["as"] for r in lower_bsconv(only_pw, steps=("pointwise",)).lowered} == {"PointwiseAsLinear"}
    with torch.no_grad():
        assert torch.allclose(only_dw(x), expected) and torch.allclose(only_pw(x), expected)
    with pytest.raises(ValueError, match="depthwise"):
        lower_bsconv(copy.deepcopy(block), steps=("diagonal",))
