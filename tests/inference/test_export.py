"""Export: ONNX (both exporters) against onnxruntime, ``torch.export``, AOTInductor packages, and
``export_model`` (the checked file ``bsconv-surgery export`` writes)."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import BSConvS, SubspaceProjection, SurgeryError, convert, prepare_for_inference
from bsconv_surgery.inference import (compile_aot, compiler_available, export_model, export_onnx, export_program,
                                      onnx_parity, relative_error)

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


# -- export_model: the file bsconv-surgery export writes ---------------------------------------------

class _TwoOutputs(nn.Module):
    """Logits and a feature map (as MTCNN's networks return several tensors), BatchNorm to fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3))), y


class _BatchDependent(nn.Module):
    """Computes something else for a batch of one: a dynamic-batch export traced at 2 gets it wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if x.shape[0] > 1 else y


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_model_checks_every_output_and_leaves_the_model_as_it_was(tmp_path, fmt):
    model = randomize_batchnorm(_TwoOutputs(), seed=2).train()
    report = export_model(model, tmp_path / f"m.{fmt}", fmt, "3,8,8")
    assert report.outputs == 2 and report.folded == 1 and report.parity < 1e-5 and report.within_tolerance
    assert model.training and isinstance(model.bn, nn.BatchNorm2d)  # the export worked on a copy
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{fmt}"]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_batch_dependent_model_fails_parity_with_a_dynamic_batch_and_exports_with_a_fixed_one(tmp_path, fmt):
    with pytest.raises(SurgeryError, match=r"is 1.00e\+00, above the tolerance .* exports with dynamic_batch=False"):
        export_model(_BatchDependent(), tmp_path / f"m.{fmt}", fmt, "3,8,8")
    assert list(tmp_path.iterdir()) == []
    report = export_model(_BatchDependent(), tmp_path / f"m.{fmt}", fmt, "3,8,8", dynamic_batch=False)
    assert report.parity_batches == (1, 1, 1) and report.within_tolerance


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "tflite"}, "Unknown format 'tflite': expected one of onnx, pt2"),
    ({"batch": 0}, "batch must be a whole number"),
    ({"batch": 1}, "A dynamic batch is traced on 2 or more samples"),
    ({"tolerance": -1}, "tolerance must be a number"),
    ({"force": "yes"}, "force must be True or False"),
    ({"example_inputs": "3,2,2"}, "does not run on 2 example input(s) of 3x2x2"),
])
def test_export_model_refuses_bad_arguments_with_a_clear_error(tmp_path, kwargs, message):
    kwargs = {"format": "pt2", "example_inputs": "3,8,8", **kwargs}
    with pytest.raises(SurgeryError) as error:
        export_model(_TwoOutputs(), tmp_path / "m.pt2", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
