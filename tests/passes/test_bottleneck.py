"""Linear bottleneck -> BSConv-S (paper 4.2, issue 3 item 2): every inverted-residual projection
becomes a ``SubspaceProjection``; the layers, parameters, MACs and outputs stay the same."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_surgery import SubspaceProjection, convert, regularization_loss
from bsconv_surgery.layers.regularization import regularization_sites

from ..helpers import SE, randomize_batchnorm, standard_convs

KIND = "bottleneck->bsconv_s"


def _timm_projections(model):
    from timm.models._efficientnet_blocks import InvertedResidual

    return [f"{n}.conv_pwl" for n, m in model.named_modules() if isinstance(m, InvertedResidual)]


def _tv_mobilenet_v2_projections(model):
    from torchvision.models.mobilenetv2 import InvertedResidual

    out = []
    for name, block in model.named_modules():
        if isinstance(block, InvertedResidual):
            first = block.conv[0][0]  # expand_ratio 1 blocks start with the depthwise
            if first.kernel_size == (1, 1) and first.groups == 1:
                out.append(f"{name}.conv.{len(block.conv) - 2}")
    return out


def _tv_mobilenet_v3_projections(model):
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

    configs, _ = _mobilenet_v3_conf("mobilenet_v3_large")
    return [
        f"features.{i}.block.{len(model.features[i].block) - 1}.0"
        for i, cnf in enumerate(configs, start=1)
        if cnf.expanded_channels != cnf.input_channels
    ]


def _tv_efficientnet_projections(model):
    from torchvision.models.efficientnet import _efficientnet_conf

    configs, _ = _efficientnet_conf("efficientnet_b0", width_mult=1.0, depth_mult=1.0)
    out = []
    for stage, cnf in enumerate(configs, start=1):
        if cnf.expand_ratio != 1:
            for j in range(cnf.num_layers):
                out.append(f"features.{stage}.{j}.block.{len(model.features[stage][j].block) - 1}.0")
    return out


def _tv_mnasnet_projections(model):
    from torchvision.models.mnasnet import _InvertedResidual

    return [f"{n}.layers.6" for n, m in model.named_modules() if isinstance(m, _InvertedResidual)]


def _model(spec, projections, count, slow=False):
    return pytest.param(spec, projections, count, id=spec, marks=[pytest.mark.slow] if slow else [])


# About 10 s of CPU each (mostly the two fvcore counts), so half of them run with -m slow;
# the default half covers both zoos, squeeze-excite and stochastic depth.
MODELS = [
    _model("timm:mobilenetv2_100", _timm_projections, 16),
    _model("timm:efficientnet_b0", _timm_projections, 15, slow=True),
    _model("timm:mobilenetv3_large_100", _timm_projections, 14),
    _model("timm:mnasnet_100", _timm_projections, 16, slow=True),
    _model("torchvision:mobilenet_v2", _tv_mobilenet_v2_projections, 16, slow=True),
    _model("torchvision:mobilenet_v3_large", _tv_mobilenet_v3_projections, 14, slow=True),
    _model("torchvision:efficientnet_b0", _tv_efficientnet_projections, 15),
    _model("torchvision:mnasnet1_0", _tv_mnasnet_projections, 16),
]


@pytest.mark.parametrize("spec,expected_projections,count", MODELS)
def test_every_inverted_residual_projection_is_found(spec, expected_projections, count):
    from bsconv_surgery.models import create_model, parse_model_spec

    model = create_model(parse_model_spec(spec))
    randomize_batchnorm(model)
    model.eval()
    expected = expected_projections(model)
    assert len(expected) == count  # the model's own block list, checked against the paper's tables
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_before = model(x)
    old = {name: model.get_submodule(name) for name in expected}

    # the standard stem conv would become a BSConvS (item 3): leave it out to see the bottlenecks alone
    stems = tuple(standard_convs(model))
    result = convert(model, "s", exclude=stems, example_inputs=(3, 32, 32))
    report = result.report.to_json()
    sites = report["replaced"]
    assert [r["name"] for r in sites] == expected
    assert all(r["kind"] == KIND for r in sites)
    assert report["params_after"] == report["params_before"]
    assert report["macs_after"] == report["macs_before"] and report["conv_macs_after"] == report["conv_macs_before"]
    for r in sites:
        proj = model.get_submodule(r["name"])
        assert isinstance(proj, SubspaceProjection)
        assert torch.equal(proj.weight, old[r["name"]].weight)
        assert r["projection"] == r["name"] and r["p"] == str(Fraction(proj.out_channels, proj.in_channels))
        assert r["params_before"] == r["params_after"] and r["macs_before"] == r["macs_after"]
        for key in ("depthwise", "expansion", "next_expansion"):
            conv = model.get_submodule(r[key])
            assert isinstance(conv, nn.Conv2d), (r["name"], key)
        assert model.get_submodule(r["depthwise"]).groups == proj.in_channels
        assert model.get_submodule(r["expansion"]).out_channels == proj.in_channels
        w_a = model.get_submodule(r["next_expansion"])
        assert w_a.kernel_size == (1, 1) and w_a.groups == 1 and w_a.in_channels == proj.out_channels
    # the only bottleneck skip is the first depthwise-separable block (no expansion)
    block_skips = [s for s in report["skipped"] if s["kind"] == KIND]
    assert len(block_skips) == 1 and "no pointwise expansion before the depthwise" in block_skips[0]["reason"]

    with torch.no_grad():
        assert torch.equal(model(x), out_before)  # same maths, bit for bit
    assert [n for n, _ in regularization_sites(model)] == expected
    model.train()
    loss = regularization_loss(model)
    assert loss.item() > 0
    (model(x).square().mean() + 0.1 * loss).backward()
    for name in expected:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_next_expansion_is_the_projection_of_the_shifted_block():
    result = convert("timm:mobilenetv2_100", "s", count=False)
    by_name = {r["name"]: r for r in result.report.to_json()["replaced"] if r["kind"] == KIND}
    first = by_name["blocks.1.0.conv_pwl"]
    assert first == {**first, "depthwise": "blocks.1.0.conv_dw", "expansion": "blocks.1.0.conv_pw",
                     "next_expansion": "blocks.1.1.conv_pw", "norm": "blocks.1.0.bn3", "p": "1/4",
                     "expansion_ratio": "6", "in_channels": 96, "out_channels": 24}
    assert by_name["blocks.1.1.conv_pwl"]["p"] == "1/6"  # p = 1/t, t = 6 (paper 4.2)
    assert by_name["blocks.6.0.conv_pwl"]["next_expansion"] == "conv_head"  # the compressed last map


def test_drop_path_traced_in_train_mode_is_transparent():
    import timm

    model = timm.create_model("efficientnet_b0", drop_path_rate=0.2)
    result = convert(model, "s", count=False)
    assert sum(r["kind"] == KIND for r in result.report.to_json()["replaced"]) == 15


class Bottleneck(nn.Module):
    def __init__(self, c=8, t=4, tail=None, se=False):
        super().__init__()
        h = c * t
        self.exp = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.act2 = nn.ReLU6()
        self.se = SE(h) if se else nn.Identity()
        self.proj = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.tail = tail or nn.Identity()

    def forward(self, x):
        y = self.bn3(self.proj(self.se(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x)))))))))
        return self.tail(x + y)


class ActAfterProjection(Bottleneck):
    def forward(self, x):
        return F.relu(self.bn3(self.proj(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x)))))))))


class NoNorm(Bottleneck):
    def forward(self, x):
        return x + self.proj(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x)))))))


class GateReadsInput(Bottleneck):
    def forward(self, x):
        h = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x))))))
        gate = self.se.expand(F.relu(self.se.reduce(h.mean((2, 3), keepdim=True)))) + x.mean()
        return self.bn3(self.proj(h * torch.sigmoid(gate)))


class ProductOfTwoBranches(Bottleneck):
    def forward(self, x):
        h = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x))))))
        return self.bn3(self.proj(h * self.exp(x)))


def test_squeeze_excite_between_is_accepted_and_listed():
    model = Bottleneck(se=True)
    r = convert(model, "s", example_inputs=(8, 8, 8)).report.to_json()
    (site,) = r["replaced"]
    assert site["name"] == "proj" and site["between"] == ["bn2", "act2", "se"] and site["p"] == "1/4"
    assert r["skipped"] == []  # the squeeze-excite's own 1x1 convs are not taken for projections


@pytest.mark.parametrize("model,needle", [
    (ActAfterProjection(), "functional relu follows the projection: not a linear bottleneck"),
    (Bottleneck(tail=nn.ReLU()), "'tail' (ReLU) follows the projection: not a linear bottleneck"),
    (NoNorm(), "no norm after the projection: it feeds functional add"),
    (GateReadsInput(se=True), "the gate of this product also reads 'x'"),
    (ProductOfTwoBranches(), "a product of two tensors neither of which is computed from the other"),
])
def test_non_bottlenecks_are_skipped_with_a_reason(model, needle):
    r = convert(model, "s", example_inputs=(8, 8, 8)).report.to_json()
    assert r["replaced"] == []
    (skip,) = [s for s in r["skipped"] if s["kind"] == KIND]
    assert skip["name"] == "proj" and needle in skip["reason"], skip["reason"]


def test_timm_linear_norm_is_batchnormact_with_identity_and_relu_norm_is_not():
    """MobileNetV1's pointwise convs are followed by BatchNormAct2d(ReLU6): no bottleneck there."""
    r = convert("timm:mobilenetv1_100", "s", exclude=("conv_stem",), count=False).report.to_json()
    assert r["replaced"] == []
    reasons = [s["reason"] for s in r["skipped"] if s["kind"] == KIND]
    assert len(reasons) == 13
    assert "no pointwise expansion before the depthwise 'blocks.0.0.conv_dw'" in reasons[0]
    assert all("applies ReLU6 after the projection: not a linear bottleneck" in s for s in reasons[1:])
