"""Standard conv -> BSConv-S (issue 3 item 3): --p as a float or fraction, --with-bn, --p auto."""

import json
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
from torch import nn

from bsconv_surgery import BSConvS, SurgeryError, convert, load_converted, load_model
from bsconv_surgery.layers import bsconv_s_params, mid_channels_for
from bsconv_surgery.passes.conv import auto_p

# resnet18's standard convs (M, N, K): the 7x7 stem and the sixteen 3x3 convs of the basic blocks
RESNET18_CONVS = ([(3, 64, 7)] + [(64, 64, 3)] * 4 + [(64, 128, 3)] + [(128, 128, 3)] * 3
                  + [(128, 256, 3)] + [(256, 256, 3)] * 3 + [(256, 512, 3)] + [(512, 512, 3)] * 3)
RESNET18_PARAMS = 11_689_512


def _closed_form(p: Fraction, with_bn: bool) -> int:
    """resnet18 after every standard conv -> BSConvS: M*M' + M'*N + N*K^2 (+ 2(M' + N) BN affine),
    M' = min(M, max(4, ceil(p*M)))."""
    total = RESNET18_PARAMS
    for m, n, k in RESNET18_CONVS:
        mid = min(m, max(4, math.ceil(p * m)))
        total += -m * n * k * k + m * mid + mid * n + n * k * k + (2 * (mid + n) if with_bn else 0)
    return total


def test_resnet18_p_quarter_with_bn_equals_the_formula_from_the_cli(cli):
    expected = _closed_form(Fraction(1, 4), with_bn=True)
    assert expected == 1_330_839
    run = cli("convert", "timm:resnet18", "--variant", "s", "--p", "1/4", "--with-bn", "--input-size", "3,32,32", "--json")
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["params_before"] == RESNET18_PARAMS and report["params_after"] == expected
    sites = report["replaced"]
    assert len(sites) == 17 and all(r["kind"] == "conv->bsconv_s" and r["p"] == "1/4" for r in sites)
    for r, (m, n, k) in zip(sites, RESNET18_CONVS):
        assert (r["in_channels"], r["out_channels"], r["kernel"]) == (m, n, [k, k])
        assert r["mid_channels"] == mid_channels_for(m, Fraction(1, 4))
        assert r["params_after"] == bsconv_s_params(m, n, k, k, r["mid_channels"], with_bn=True)
    assert report["options"]["p"] == "1/4" and report["options"]["with_bn"] is True


@pytest.mark.parametrize("p,expected_p", [("1/6", Fraction(1, 6)), (0.25, Fraction(1, 4)), ("0.5", Fraction(1, 2))])
def test_p_as_float_or_fraction(p, expected_p):
    result = convert("timm:resnet18", "s", p=p, count=False)
    assert result.options.p == expected_p
    model = result.model
    assert isinstance(model.layer1[0].conv1, BSConvS)
    assert model.layer1[0].conv1.mid_channels == math.ceil(expected_p * 64)
    assert model.conv1.mid_channels == 3  # M = 3: min(M, max(4, ceil(p*3)))
    assert sum(p.numel() for p in model.parameters()) == _closed_form(expected_p, with_bn=False)


@pytest.mark.parametrize("bad", ["0", "7/6", "-0.1", "quarter", "1/0"])
def test_bad_p_is_refused(bad):
    with pytest.raises(SurgeryError, match="Bad p"):
        convert("timm:resnet18", "s", p=bad, count=False)


def test_p_auto_is_p_one_for_every_resnet18_conv():
    """Closest parameter count to the original: the count grows with M' and stays below
    M*N*K^2 even at M' = M, so --p auto picks M' = M (p = 1) for 3x3 and 7x7 convs."""
    for with_bn in (False, True):
        result = convert("timm:resnet18", "s", p="auto", with_bn=with_bn, count=False)
        report = result.report.to_json()
        assert report["options"]["p"] == "auto"
        assert report["p_auto"]["chosen"] == {"1": 17}
        assert all(r["p"] == "1" and r["mid_channels"] == r["in_channels"] for r in report["replaced"])
        assert report["params_after"] == _closed_form(Fraction(1), with_bn)
        assert report["params_after"] < report["params_before"]


def test_p_auto_follows_its_rule_where_the_answer_is_not_one():
    # a 1x2 conv 3 -> 3 (6 + 12 = 18 weights): M' = 2 gives 6 + 6 + 6 = 18 exactly; M' = 3 gives 24
    conv = nn.Conv2d(3, 3, (1, 2), bias=False)
    options = SimpleNamespace(min_mid_channels=1, with_bn=False)
    assert auto_p(conv, options) == Fraction(2, 3)
    # brute force on a few shapes: the pick minimises |BSConv-S params - conv params|
    for m, n, kh, kw, bias, bn in [(3, 3, 1, 2, False, False), (16, 8, 1, 3, True, False),
                                   (2, 2, 3, 1, False, True), (64, 64, 3, 3, False, True)]:
        conv = nn.Conv2d(m, n, (kh, kw), bias=bias)
        options = SimpleNamespace(min_mid_channels=1, with_bn=bn)
        target = sum(p.numel() for p in conv.parameters())
        best = min(abs(bsconv_s_params(m, n, kh, kw, k, bias, bn) - target) for k in range(1, m + 1))
        pick = auto_p(conv, options)
        assert pick.denominator in (1, m) or m % pick.denominator == 0
        assert abs(bsconv_s_params(m, n, kh, kw, int(pick * m), bias, bn) - target) == best


def test_p_auto_model_saves_and_loads(tmp_path):
    result = convert(load_model("timm:resnet18", num_classes=3), "s", p="auto", count=False)
    loaded = load_converted(result.save(tmp_path / "r18_auto")).model
    assert loaded.layer4[1].conv2.mid_channels == 512
