"""Depthwise-separable pair -> BSConv-U by reordering (paper 4.1, issue 3 item 1)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_surgery import convert, load_converted, load_model
from bsconv_surgery.passes.dsc import dsc_param_delta

from ..helpers import DSC, SE

KIND = "dsc->bsconv_u"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dsc_blocks(model: nn.Module):
    """The model's own depthwise-separable blocks (timm ``DepthwiseSeparableConv``)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv)]


def test_mobilenetv1_all_13_blocks_reordered_with_the_stated_formula():
    import timm

    model = timm.create_model("mobilenetv1_100")
    blocks = _dsc_blocks(model)
    assert len(blocks) == 13
    # expected change from the model's own layers, before conversion: K^2 (N - M) - 2M per block
    expected = {}
    for name, b in blocks:
        m, n = b.conv_dw.in_channels, b.conv_pw.out_channels
        kh, kw = b.conv_dw.kernel_size
        removed = sum(p.numel() for p in b.bn1.parameters())
        assert removed == 2 * m  # affine BatchNormAct2d on M channels
        expected[f"{name}.conv_dw"] = kh * kw * (n - m) - 2 * m
    old = {name: (b.conv_dw.stride, b.conv_dw.in_channels, b.conv_pw.out_channels, b.bn2) for name, b in blocks}

    # the stem (a standard conv) is left out so the totals show the reordering alone
    result = convert(model, "u", allow_growth=True, exclude=("conv_stem",), example_inputs=(3, 64, 64))
    report = result.report.to_json()
    sites = [r for r in report["replaced"] if r["kind"] == KIND]
    assert [r["name"] for r in sites] == list(expected) and len(report["replaced"]) == 13
    assert report["skipped"] == [{"name": "conv_stem", "kind": "conv->bsconv_u", "reason": "not selected by --include/--exclude"}]
    for r in sites:
        assert r["params_after"] - r["params_before"] == r["params_delta_formula"] == expected[r["name"]], r["name"]
        assert r["removed"] == [r["name"].replace("conv_dw", "bn1")]
    # whole model: measured change == sum of the formula == closed form for MobileNetV1
    # (sum_i 9 (N_i - M_i) = 9 * (1024 - 32) = 8928; sum_i 2 M_i = 2 * 4960 = 9920)
    delta = report["params_after"] - report["params_before"]
    assert delta == sum(expected.values()) == 8928 - 9920 == -992
    assert _params(model) == report["params_after"] == 4_231_976 - 992

    # structure: pw (M -> N) at the old dw's name, Identity between, dw on N at the old pw's name
    for name, b in blocks:
        stride, m, n, bn2 = old[name]
        assert isinstance(b.conv_dw, nn.Conv2d) and b.conv_dw.kernel_size == (1, 1) and b.conv_dw.groups == 1
        assert (b.conv_dw.in_channels, b.conv_dw.out_channels, b.conv_dw.bias) == (m, n, None)
        assert isinstance(b.bn1, nn.Identity)
        assert b.conv_pw.groups == n == b.conv_pw.in_channels == b.conv_pw.out_channels
        assert b.conv_pw.kernel_size == (3, 3) and b.conv_pw.stride == stride and b.conv_pw.padding == (1, 1)
        assert b.bn2 is bn2 and b.bn2.num_features == n  # the norm/act after the pointwise stays

    # MACs go up (paper 4.1): the pointwise now runs before the depthwise's stride
    assert report["macs_after"] > report["macs_before"]
    assert all(r["macs_after"] >= r["macs_before"] for r in sites)
    assert all(r["macs_after"] > r["macs_before"] for r in sites if r["stride"] == [2, 2])

    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1000)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_synthetic_pair_keeps_geometry_moves_the_bias_and_follows_the_formula():
    model = DSC()
    old_dw, old_pw = model.dw, model.pw
    before = _params(model)
    x = torch.randn(2, 6, 17, 15)
    shape = model(x).shape
    result = convert(model, "u", allow_growth=True, example_inputs=(6, 17, 15))
    (site,) = result.report.to_json()["replaced"]
    assert site["kind"] == KIND and site["depthwise"] == "dw" and site["pointwise"] == "pw"
    assert site["removed"] == ["between.0", "between.1"]
    # GroupNorm(2, 6) affine: 12 params; dw bias 6; pw bias moves: delta = 15 (10 - 6) - 12 - 6
    assert site["params_delta_formula"] == dsc_param_delta(6, 10, 5, 3, 12, True) == 15 * 4 - 12 - 6
    assert _params(model) - before == site["params_delta_formula"]
    pw, dw = model.dw, model.pw
    assert (pw.in_channels, pw.out_channels, pw.kernel_size, pw.bias) == (6, 10, (1, 1), None)
    assert (dw.groups, dw.kernel_size, dw.stride, dw.padding, dw.dilation, dw.padding_mode) == (
        10, (5, 3), (2, 2), old_dw.padding, (1, 1), "reflect")
    assert torch.equal(dw.bias, old_pw.bias)
    assert all(isinstance(m, nn.Identity) for m in model.between)
    # the block now computes exactly BSConv-U: dw(pw(x)) followed by the kept norm/act
    model.eval()
    with torch.no_grad():
        out = model(x)
        ref = model.act(model.bn(F.conv2d(F.pad(F.conv2d(x, pw.weight), (1, 1, 2, 2), mode="reflect"),
                                          dw.weight, dw.bias, stride=2, groups=10)))
    assert out.shape == shape and torch.allclose(out, ref, atol=1e-6)


def test_same_padding_depthwise_keeps_its_class():
    from timm.layers import Conv2dSame

    model = DSC(m=4, n=8, k=(3, 3), stride=2, dw_cls=Conv2dSame, between=[nn.BatchNorm2d(4), nn.ReLU6()])
    x = torch.randn(1, 4, 15, 15)
    shape = model(x).shape
    result = convert(model, "u", allow_growth=True, example_inputs=(4, 15, 15))
    assert [r["kind"] for r in result.report.to_json()["replaced"]] == [KIND]
    assert type(model.pw) is Conv2dSame and model.pw.groups == 8
    assert model(x).shape == shape


class FunctionalAct(DSC):
    def forward(self, x):
        return self.act(self.bn(self.pw(F.relu(self.dw(x)))))


class TwoUsers(DSC):
    def forward(self, x):
        y = self.dw(x)
        return self.act(self.bn(self.pw(y))) + y.mean()


class SharedAct(DSC):
    def __init__(self):
        super().__init__(between=[])
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.pw(self.relu(self.dw(x)))))


@pytest.mark.parametrize("model,needle", [
    (DSC(between=[nn.BatchNorm2d(6), SE(6, 2)]), "functional mul sits on the path (in 'between.1', SE)"),
    (DSC(between=[nn.BatchNorm2d(6), nn.MaxPool2d(1)]), "'between.1' (MaxPool2d) is not a norm or activation module"),
    (DSC(between=[nn.Dropout(0.1)]), "'between.0' (Dropout) is not a norm or activation module"),
    (FunctionalAct(), "functional relu sits on the path"),
    (TwoUsers(), "the output of 'dw' (Conv2d) also goes to method .mean()"),
    (SharedAct(), "'relu' between them is called from 2 places"),
])
def test_guarded_pairs_are_skipped_with_a_precise_reason(model, needle):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = convert(model, "u", example_inputs=(6, 16, 16))
    skipped = [s for s in result.report.to_json()["skipped"] if s["kind"] == KIND]
    assert len(skipped) == 1 and skipped[0]["name"] == "dw", result.report.to_json()["skipped"]
    assert skipped[0]["reason"].startswith("dw -> pw: ") and needle in skipped[0]["reason"], skipped[0]["reason"]
    assert result.report.to_json()["replaced"] == []
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_squeeze_excite_convs_are_not_taken_for_a_pair():
    """The reduce conv inside a squeeze-excite reads the depthwise output through a pooling:
    it must not produce a second skip record for the same depthwise."""
    model = DSC(between=[nn.BatchNorm2d(6), SE(6, 2)])
    result = convert(model, "u", example_inputs=(6, 16, 16))
    assert [s["name"] for s in result.report.to_json()["skipped"]] == ["dw"]


def test_selection_by_kernel_size_and_name():
    model = DSC(k=(5, 5))
    r = convert(model, "u", allow_growth=True, kernel_sizes="3", example_inputs=(6, 16, 16)).report.to_json()
    assert r["replaced"] == [] and "depthwise kernel 5x5 is not in --kernel-sizes 3x3" in r["skipped"][0]["reason"]
    r = convert(DSC(), "u", allow_growth=True, exclude=("pw",), example_inputs=(6, 16, 16)).report.to_json()
    assert r["replaced"] == [] and r["skipped"][0]["reason"].endswith("not selected by --include/--exclude")
    r = convert(DSC(), "u", allow_growth=True, include=("dw",), example_inputs=(6, 16, 16)).report.to_json()
    assert [x["kind"] for x in r["replaced"]] == [KIND]


def test_variant_s_leaves_pairs_alone():
    model = DSC()
    r = convert(model, "s", example_inputs=(6, 16, 16)).report.to_json()
    assert r["replaced"] == [] and isinstance(model.between[0], nn.GroupNorm)


def test_reordered_model_saves_and_loads(tmp_path):
    result = convert(load_model("timm:mobilenetv1_100", num_classes=5), "u", allow_growth=True, count=False)
    assert sum(r["kind"] == KIND for r in result.report.to_json()["replaced"]) == 13
    result.model.eval()
    loaded = load_converted(result.save(tmp_path / "mnv1_u")).model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
