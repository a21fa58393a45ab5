"""Honest counting: what fvcore counts, what it drops (flagged), the FlopCounterMode cross-check,
and the counter's name and version in every report."""

from importlib.metadata import version

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import bsconv_surgery  # noqa: F401  (registers the CIFAR models)
from bsconv_surgery.analysis import counting
from bsconv_surgery.analysis.counting import Budget, ConvCheck, count_budget, counter_info, cross_check_conv_macs, is_compute_op


pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """A conv followed by attention through ``scaled_dot_product_attention``, which fvcore does
    not know: it counts it as zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        t = F.scaled_dot_product_attention(t, t, t)
        return self.proj(t).mean(1)


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("op,compute", [
    ("aten::_convolution", True), ("aten::_convolution_mode", True), ("aten::conv_depthwise2d", True),
    ("aten::addmm", True), ("aten::mm", True), ("aten::bmm", True), ("aten::baddbmm", True),
    ("aten::einsum", True), ("aten::scaled_dot_product_attention", True), ("aten::fft_rfft2", True),
    ("aten::mv", True), ("aten::linear", True),
    ("aten::add", False), ("aten::add_", False), ("aten::mul", False), ("aten::relu_", False),
    ("aten::mean", False), ("aten::softmax", False), ("aten::max_pool2d", False), ("aten::hardswish_", False),
    ("aten::sum", False), ("aten::linalg_vector_norm", False),
])
def test_is_compute_op(op, compute):
    assert is_compute_op(op) is compute


def test_uncounted_attention_is_flagged_not_hidden():
    budget = count_budget(Attention(), (3, 4, 4))
    assert budget.macs is not None
    assert budget.unsupported_ops.get("aten::scaled_dot_product_attention") == 1
    assert budget.uncounted_compute_ops == {"aten::scaled_dot_product_attention": 1}
    (warning,) = budget.warnings()
    assert "scaled_dot_product_attention" in warning and "counted as 0" in warning
    assert "uncounted_compute_ops" in budget.to_dict()


def test_elementwise_ops_are_not_flagged():
    budget = count_budget(timm.create_model("cifar_resnet20"), (3, 32, 32))
    assert budget.unsupported_ops == {"aten::add": 9}  # the residual adds: elementwise, listed only
    assert budget.uncounted_compute_ops == {} and budget.warnings() == []


def test_what_fvcore_counts():
    """conv + linear MACs, BatchNorm (eval, affine: 2 per element), adaptive pooling; one MAC = 1."""
    budget = count_budget(ConvLinear(), (3, 6, 6))
    conv, linear, bn = 3 * 4 * 9 * 16, 4 * 2, 2 * 4 * 16
    assert budget.conv_macs == conv
    assert budget.conv_linear_macs == conv + linear
    assert budget.by_operator["batch_norm"] == bn
    assert budget.macs == conv + linear + bn  # mean() is elementwise: not counted


def test_conv_cross_check_agrees_on_original_and_converted():
    from bsconv_surgery import convert

    for variant in (None, "u", "s"):
        model = timm.create_model("cifar_resnet20")
        if variant:
            model = convert(model, variant, count=False).model
        budget = count_budget(model, (3, 32, 32), cross_check=True)
        check = budget.conv_check
        assert check.agree and check.fvcore == check.flop_counter == budget.conv_macs > 0, variant
        assert budget.to_dict()["conv_check"] == {"fvcore": check.fvcore, "flop_counter": check.fvcore, "agree": True}


def test_cross_check_disagreement_is_reported(monkeypatch):
    model = ConvLinear()
    budget = count_budget(model, (3, 6, 6))
    monkeypatch.setattr(counting, "flop_counter_conv_macs", lambda m, s: budget.conv_macs + 1)
    check = cross_check_conv_macs(model, (3, 6, 6), budget)
    assert not check.agree
    budget.conv_check = check
    assert any("cross-check failed" in w for w in budget.warnings())


def test_cross_check_failure_is_reported_not_raised(monkeypatch):
    def boom(model, size, **kwargs):
        raise RuntimeError("no flop counter here")

    monkeypatch.setattr(counting, "flop_counter_conv_macs", boom)
    check = cross_check_conv_macs(ConvLinear(), (3, 6, 6))
    assert not check.agree and "no flop counter here" in check.error


def test_fvcore_failure_gives_no_macs_and_a_reason():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            raise ValueError("cannot run")

    budget = count_budget(Broken(), (3, 8, 8), cross_check=True)
    assert budget.macs is None and budget.conv_macs is None and budget.conv_linear_macs is None
    assert budget.params == 84
    assert "fvcore could not count this model" in budget.error and "cannot run" in budget.error
    assert budget.conv_check is None
    assert budget.warnings() == [budget.error]


def test_counter_names_itself_and_its_version():
    info = counter_info()
    assert info["name"] == "fvcore" and info["version"] == version("fvcore")
    assert "MACs" in info["unit"]
    assert "FlopCounterMode" in info["cross_check"] and torch.__version__ in info["cross_check"]
    assert "BatchNorm" in info["counts"]


def test_conv_check_to_dict_names_the_error():
    assert ConvCheck(5, None, error="x").to_dict() == {"fvcore": 5, "flop_counter": None, "agree": False, "error": "x"}
    assert Budget(1, None, error="why").to_dict()["error"] == "why"
