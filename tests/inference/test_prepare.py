"""``prepare_for_inference``: folding, lowering, channels_last and torch.compile with frozen weights
give the eager model's outputs."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import BSConvU, convert, prepare_for_inference
from bsconv_surgery.inference import CompiledForInference, compiler_available, relative_error
from bsconv_surgery.layers import DepthwiseAsStencil

from ..helpers import Blocks, outputs, randomize_batchnorm


def test_prepare_for_inference_channels_last_matches(rng):
    model = convert("timm:resnet18", "u", kernel_sizes="3", count=False).model
    randomize_batchnorm(model, seed=4).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    expected = outputs(model, x)
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model).train(), channels_last=True, report=info)
    assert not prepared.training and len(info["fold"]["folded"]) == 20
    assert prepared.layer1[0].conv1.pw.weight.is_contiguous(memory_format=torch.channels_last)
    got = outputs(prepared, x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-5


@pytest.mark.slow
def test_prepare_for_inference_compile_matches(rng):
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    expected = outputs(model, x)
    compiled = prepare_for_inference(copy.deepcopy(model), channels_last=True, compile=True)
    with torch.inference_mode():
        got = compiled(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-4


def test_prepare_for_inference_lowers_converted_resnet(rng):
    model = convert("timm:resnet18", "u", kernel_sizes="3", count=False).model
    randomize_batchnorm(model, seed=3).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    with torch.no_grad():
        expected = model(x)
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model), channels_last=True, lower=True, report=info)
    assert len(info["lower"]["lowered"]) == 32 and not info["lower"]["skipped"]  # 16 BSConv-U, 2 steps each
    with torch.no_grad():
        got = prepared(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-5
    info = {}
    prepare_for_inference(copy.deepcopy(model), report=info)
    assert "lower" not in info, "no lowering without compile unless asked for"


@pytest.mark.skipif(not compiler_available(), reason="inductor on CPU needs a C++ compiler")
def test_compiled_for_inference_freezes_weights_and_matches(rng):
    """With freezing the compiled code holds the weights as constants: changing a weight after
    the first call does not change its output, while the uncompiled model's output does change.
    (``torch.compile(options={"freezing": True})`` alone does not freeze: this test catches it.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          BSConvU(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_batchnorm(model).eval()
    x = torch.randn(1, 3, 12, 12, generator=rng).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    prepared = prepare_for_inference(copy.deepcopy(model), channels_last=True, compile=True)
    assert isinstance(prepared, CompiledForInference)
    first = prepared(x)
    assert relative_error(first, expected) < 1e-4
    inner = prepared.model
    assert isinstance(inner[3].dw, DepthwiseAsStencil), "compile lowers the BSConv blocks by default"
    assert prepared.training is False and list(prepared._modules) == ["model"]
    assert prepared.backend.startswith("export+inductor"), prepared.export_failure
    with pytest.raises(AttributeError):
        prepared.no_such_attribute
    with torch.no_grad():
        inner[0].weight.mul_(2.0)
    assert relative_error(prepared(x), first) == 0.0, "weights were not frozen into the compiled code"
    with torch.no_grad():
        assert relative_error(inner(x), first) > 1e-2


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it, dynamo can (a graph break)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.relu() if float(y.sum()) > 0 else -y


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(), reason="inductor on CPU needs a C++ compiler")
def test_compiled_for_inference_falls_back_to_dynamo_when_export_fails(rng):
    model = _Branchy().eval()
    x = torch.randn(1, 3, 8, 8, generator=rng)
    compiled = CompiledForInference(copy.deepcopy(model))
    assert relative_error(compiled(x), outputs(model, x)) < 1e-5
    assert compiled.backend == "dynamo" and compiled.export_failure
