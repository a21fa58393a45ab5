"""Export: ONNX (both exporters) against onnxruntime, ``torch.export``, and AOTInductor packages."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import BSConvS, SubspaceProjection, SurgeryError, convert, prepare_for_inference
from bsconv_surgery.inference import compile_aot, compiler_available, export_onnx, export_program, onnx_parity, relative_error

from ..helpers import randomize_batchnorm


@pytest.fixture(scope="module")
def resnet18_u():
    """timm resnet18, 3x3 convs -> BSConv-U (with the optional inner BatchNorm), random BN stats."""
    model = convert("timm:resnet18", "u", kernel_sizes="3", with_bn=True, count=False).model
    return randomize_batchnorm(model, seed=5).eval()


def inputs(*batches, size=64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, size, size, generator=gen) for b in batches]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_matches_onnxruntime(resnet18_u, tmp_path, dynamo):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    path = export_onnx(resnet18_u, tmp_path / "model.onnx", inputs(2)[0], dynamo=dynamo)
    # a batch size other than the example's: the batch dimension is dynamic
    assert onnx_parity(resnet18_u, path, inputs(1, 3)) < 1e-4


def test_fused_channels_last_model_exports_and_matches_the_unfused_one(resnet18_u, tmp_path):
    pytest.importorskip("onnxruntime")
    fused = prepare_for_inference(copy.deepcopy(resnet18_u), channels_last=True)
    path = export_onnx(fused, tmp_path / "fused.onnx", inputs(1)[0], dynamo=False)
    # parity against the *unfused* eager model: folding and export together stay exact
    assert onnx_parity(resnet18_u, path, inputs(2)) < 1e-4


def test_bsconv_s_model_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    model = convert("timm:test_efficientnet", "s", count=False).model  # linear bottlenecks + stem
    assert any(isinstance(m, (BSConvS, SubspaceProjection)) for m in model.modules())
    model = randomize_batchnorm(model, seed=6).eval()
    path = export_onnx(model, tmp_path / "s.onnx", inputs(1)[0], dynamo=False)
    assert onnx_parity(model, path, inputs(2)) < 1e-4


def test_torch_export_runs_and_matches(resnet18_u):
    x, x3 = inputs(2, 3)
    program = export_program(resnet18_u, x, dynamic_batch=True)
    with torch.no_grad():
        expected = resnet18_u(x3)
    got = program.module()(x3)
    assert relative_error(got, expected) < 1e-5


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


def test_compile_aot_explains_a_model_torch_export_cannot_capture():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # control flow on a value: torch.export refuses it

    with pytest.raises(SurgeryError, match="torch.export could not capture DataDependent"):
        compile_aot(DataDependent(), torch.ones(1, 3, 4, 4))
