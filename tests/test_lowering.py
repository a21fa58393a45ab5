import copy
import json

import pytest
import torch
from click.testing import CliRunner
from timm.layers import Conv2dSame
from torch import nn

from bsconv_surgery import BSConvS, BSConvU, SurgeryError, convert, prepare_for_inference
from bsconv_surgery.benchmark import PrepOptions
from bsconv_surgery.cli import bsconv_surgery
from bsconv_surgery.inference import CompiledForInference, compile_aot, compiler_available, relative_error
from bsconv_surgery.layers import DepthwiseAsStencil, PointwiseAsLinear
from bsconv_surgery.passes.lowering import lower_bsconv

from .helpers import randomize_batchnorm

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
    inner = prepared.compiled._orig_mod
    assert isinstance(inner[3].dw, DepthwiseAsStencil), "compile lowers the BSConv blocks by default"
    assert prepared.training is False and list(prepared._modules) == ["compiled"]
    with pytest.raises(AttributeError):
        prepared.no_such_attribute
    with torch.no_grad():
        inner[0].weight.mul_(2.0)
    assert relative_error(prepared(x), first) == 0.0, "weights were not frozen into the compiled code"
    with torch.no_grad():
        assert relative_error(inner(x), first) > 1e-2


def test_benchmark_cli_lower_flag_reports_lowered_steps():
    args = ["benchmark", "timm:test_resnet", "--input-size", "3,32,32", "--warmup", "1", "--runs", "3", "--json",
            "--fuse", "--channels-last", "--lower"]
    result = CliRunner().invoke(bsconv_surgery, args)
    assert result.exit_code == 0, result.output
    timing = json.loads(result.stdout)["timing"]
    assert timing["prep"] == "fused+channels_last+lowered"
    assert timing["lowered"]["original"] == 0 and timing["lowered"]["converted"] > 0, timing["lowered"]


@pytest.mark.skipif(not compiler_available(), reason="AOTInductor on CPU needs a C++ compiler")
def test_compile_aot_package_matches_eager_at_any_batch(tmp_path, rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          BSConvS(8, 8, 3, stride=2, padding=1, p=0.5), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_batchnorm(model).eval()
    prepared = prepare_for_inference(copy.deepcopy(model), channels_last=True, lower=True)
    cl = torch.channels_last
    package = tmp_path / "model.pt2"
    runner = compile_aot(prepared, torch.randn(2, 3, 12, 12).contiguous(memory_format=cl), package, dynamic_batch=True)
    assert package.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"], "temporary files left"
    for batch in (2, 5):
        x = torch.randn(batch, 3, 12, 12, generator=rng)
        with torch.no_grad():
            expected = model(x)
        assert relative_error(runner(x.contiguous(memory_format=cl)), expected) < 1e-4
    assert relative_error(torch._inductor.aoti_load_package(str(package))(x.contiguous(memory_format=cl)), expected) < 1e-4


def test_prep_labels_name_every_step():
    assert PrepOptions().label == "eager"
    assert PrepOptions(fuse=True, channels_last=True, compile=True, lower=True).label == \
        "fused+channels_last+lowered+compiled"
    assert PrepOptions(fuse=True, compile=True, aot=True).label == "fused+aot-compiled"


def test_compile_aot_explains_a_model_torch_export_cannot_capture():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # control flow on a value: torch.export refuses it

    with pytest.raises(SurgeryError, match="torch.export could not capture DataDependent"):
        compile_aot(DataDependent(), torch.ones(1, 3, 4, 4))
