import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery import BSConvU, SurgeryError, convert, load_model
from bsconv_surgery.models import create_model, parse_model_spec
from bsconv_surgery.analysis.counting import count_budget, flop_counter_conv_macs
from bsconv_surgery.layers import bsconv_u_params

from .helpers import RankOneZoo, make_rank_one_, randomize_batchnorm, standard_convs

RESNET18_BSCONV_U = 1_959_208  # NOTES.md: resnet18, every 3x3 conv -> BSConv-U, 7x7 stem kept


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_resnet18_bsconv_u_reference_budget(spec):
    result = convert(spec, "u", kernel_sizes="3,5", example_inputs=(3, 64, 64))
    model, report = result.model, result.report.to_json()
    params = sum(p.numel() for p in model.parameters())
    assert params == report["params_after"] == RESNET18_BSCONV_U, f"{spec}: {params:,} params"
    assert report["params_before"] == 11_689_512
    assert standard_convs(model, (3, 3)) == [], "a standard 3x3 conv survived"
    assert standard_convs(model) == ["conv1"], "only the 7x7 stem stays standard"
    assert len(report["replaced"]) == 16 and all(r["kind"] == "conv->bsconv_u" for r in report["replaced"])
    assert report["skipped"] == [
        {"name": "conv1", "kind": "conv->bsconv_u", "reason": "not selected: kernel 7x7 is not in --kernel-sizes 3x3,5x5"}
    ]
    # per-site params follow the closed form M*N + N*K^2
    for r in report["replaced"]:
        assert r["params_after"] == bsconv_u_params(r["in_channels"], r["out_channels"], 3, 3), r["name"]
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_converted_model_keeps_class_methods_and_mode():
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    model.eval()
    result = convert(model, "u", example_inputs=(3, 32, 32))
    assert result.model is model and type(model).__name__ == "ResNet"
    assert not model.training and not model.layer1[0].conv1.training
    assert isinstance(model.layer1[0].conv1, BSConvU)
    feats = model.forward_features(torch.randn(1, 3, 32, 32))  # timm's own methods still work
    assert feats.shape == (1, 512, 1, 1)
    model.train()
    assert model.layer1[0].conv1.dw.training


def test_conversion_carries_stride_padding_dilation_mode_and_bias_exactly(rng):
    model = RankOneZoo().double()
    factors = {name: make_rank_one_(getattr(model, name), rng) for name in "abcde"}
    x = torch.randn(2, 3, 23, 21, dtype=torch.float64, generator=rng)
    expected = model(x)
    result = convert(model, "u", example_inputs=(3, 23, 21))
    assert len(result.report.to_json()["replaced"]) == 5
    from timm.layers import Conv2dSame

    assert isinstance(model.d.dw, Conv2dSame), "dynamic 'same' padding must survive"
    assert model.c.dw.padding_mode == "reflect" and model.b.dw.dilation == (2, 2)
    for name, (w, b) in factors.items():
        site = getattr(model, name)
        assert site.dw.weight.dtype == torch.float64
        with torch.no_grad():  # a rank-1 filter is exactly a BSConv-U filter
            site.pw.weight.copy_(w[:, :, None, None])
            site.dw.weight.copy_(b[:, None])
    torch.testing.assert_close(model(x), expected)


def test_shared_conv_is_replaced_once_and_stays_shared():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model = Shared()
    report = convert(model, "u", example_inputs=(4, 8, 8)).report.to_json()
    (site,) = report["replaced"]
    assert site["calls"] == 2 and "shared" in site["calls_note"]
    assert isinstance(model.conv, BSConvU)


def test_hidden_and_functional_convs_are_reported_not_replaced():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.head(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1))

    model = Functional()
    report = convert(model, "u", example_inputs=(3, 8, 8)).report.to_json()
    assert [r["name"] for r in report["replaced"]] == ["head"]
    (skip,) = report["skipped"]
    assert skip["name"] == "conv" and "hidden" in skip["reason"] and "functionally" in skip["reason"]
    assert report["conv_census"]["hidden"] == 1
    assert isinstance(model.conv, nn.Conv2d) and not isinstance(model.conv, BSConvU)


def test_untraceable_model_falls_back_to_named_modules_and_says_so():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
                return self.conv(x)
            return self.conv(-x)

    model = DataDependent()
    report = convert(model, "u", example_inputs=(3, 8, 8)).report.to_json()
    assert report["tracing"]["method"] == "named_modules fallback"
    assert "TraceError" in report["tracing"]["error"] and "named_modules()" in report["tracing"]["note"]
    assert [r["name"] for r in report["replaced"]] == ["conv"]


def test_include_exclude_globs_select_sites():
    report = convert("timm:resnet18", "u", include=["layer4.*"], exclude=["*.conv2"], count=False).report.to_json()
    assert [r["name"] for r in report["replaced"]] == ["layer4.0.conv1", "layer4.1.conv1"]
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert reasons["layer1.0.conv1"] == reasons["layer4.0.conv2"] == "not selected by --include/--exclude"


def test_weight_standardised_convs_are_skipped_with_a_reason():
    import timm

    model = timm.create_model("nf_resnet26")
    report = convert(model, "u", example_inputs=(3, 64, 64)).report.to_json()
    assert report["replaced"] == []
    assert report["skipped"], "standard ScaledStdConv2d sites must be reported"
    assert all("standardises each whole" in s["reason"] for s in report["skipped"])
    assert report["params_after"] == report["params_before"]


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:mobilenet_v2", "timm:convnext_atto"])
def test_fvcore_conv_macs_match_flop_counter(spec):
    result = convert(spec, "u", example_inputs=(3, 64, 64))
    assert result.report.to_json()["conv_macs_after"] == flop_counter_conv_macs(result.model, (3, 64, 64)), spec
    original = bs.load_model(spec)
    budget = count_budget(original, (3, 64, 64))
    assert budget.conv_macs == result.report.to_json()["conv_macs_before"] == flop_counter_conv_macs(original, (3, 64, 64))


def test_bad_options_raise_surgery_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(SurgeryError, match="Valid variants: s, u"):
        convert(model, "x")
    with pytest.raises(SurgeryError, match="Bad kernel size"):
        convert(model, "u", kernel_sizes="3,zero")
    with pytest.raises(SurgeryError, match="Unknown option"):
        convert(model, "u", kernel_size="3")
    with pytest.raises(SurgeryError, match="Bad p"):
        convert(model, "s", p="7/3")


# Every model of the list, converted with --variant u. Heavy ones run with -m slow.
ZOO = [
    ("torchvision:resnet50", 64, False),
    ("torchvision:vgg11_bn", 64, False),
    ("torchvision:densenet121", 64, True),
    ("torchvision:regnet_x_400mf", 64, False),
    ("torchvision:inception_v3", 299, True),  # the train-mode aux head needs its full 299 px
    ("torchvision:googlenet", 64, True),
    ("timm:resnet50", 64, False),
    ("timm:tf_efficientnet_lite0", 64, False),
    ("timm:nf_resnet50", 64, True),
    ("timm:convnext_atto", 64, False),  # u: its patchify stem and downsamplers would grow the MACs (skipped)
]


def _zoo_params():
    for spec, size, slow in ZOO:
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(spec, size, id=spec, marks=marks)


@pytest.mark.parametrize("spec,size", list(_zoo_params()))
def test_convert_variant_u_on_the_zoo(spec, size):
    result = convert(spec, "u", example_inputs=(3, size, size))
    model, report = result.model, result.report.to_json()
    standard_left = set(standard_convs(model))
    skipped = {s["name"] for s in report["skipped"]}
    replaced = [r["name"] for r in report["replaced"]]
    # every standard conv is either replaced or skipped with a reason
    assert standard_left <= skipped, f"{spec}: unreported standard convs {sorted(standard_left - skipped)[:5]}"
    if spec == "timm:nf_resnet50":
        assert all("ScaledStdConv2d" in s["reason"] for s in report["skipped"])
    elif spec == "timm:convnext_atto":  # every standard conv is patchify (kernel = stride)
        assert not replaced and all("grow the MACs" in s["reason"] for s in report["skipped"] if s["name"] in standard_left)
    else:
        assert replaced, f"{spec}: nothing converted"
        assert report["params_after"] < report["params_before"]
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    model.eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert list(out.shape) == [2] + report["output_shape"][1:] == [2, 1000]
    model.train()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out  # inception / googlenet aux outputs
    out.float().sum().backward()


@pytest.mark.parametrize("spec,cls", [("timm:mixnet_s", "MixedConv2d"), ("timm:efficientnet_cc_b0_4e", "CondConv2d")])
def test_cond_and_mixed_convs_are_reported(spec, cls):
    report = convert(spec, "u", count=False).report.to_json()
    others = [o for o in report["other_convs"] if o["cls"] == cls]
    model = bs.load_model(spec)
    expected = sum(type(m).__name__ == cls for m in model.modules())
    assert len(others) == expected > 0, f"{spec}: {len(others)} of {expected} {cls} reported"
    assert all(o["reason"] for o in others)


def _leaf_model(data_dependent: bool):
    from timm.layers import register_notrace_module

    @register_notrace_module
    class LeafBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            if data_dependent and x.shape[-1] % 2:  # python control flow on a traced shape
                x = x[..., :-1]
            return self.conv(x) + x

    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LeafBlock())


def test_convs_inside_timm_leaf_modules_are_found_by_tracing_the_leaf_alone():
    model = _leaf_model(data_dependent=False)
    report = convert(model, "u", example_inputs=(3, 8, 8)).report.to_json()
    assert [r["name"] for r in report["replaced"]] == ["0", "1.conv"]
    assert report["conv_census"]["hidden"] == 0


def test_convs_inside_untraceable_leaf_modules_stay_hidden_with_a_reason():
    model = _leaf_model(data_dependent=True)
    report = convert(model, "u", example_inputs=(3, 8, 8)).report.to_json()
    assert [r["name"] for r in report["replaced"]] == ["0"]
    (skip,) = report["skipped"]
    assert skip["name"] == "1.conv" and "inside leaf module '1'" in skip["reason"]


@pytest.mark.parametrize("spec,size", [("timm:resnet18", 224), ("timm:tf_efficientnet_lite0", 224),
                                       ("torchvision:vit_h_14", 224), ("torchvision:inception_v3", 299),
                                       ("torchvision:resnet18", 224)])
def test_default_input_size(spec, size):
    from bsconv_surgery.models import default_input_size

    parsed = bs.models.parse_model_spec(spec)
    with torch.device("meta"):
        model = bs.models.create_model(parsed)
    assert default_input_size(parsed, model) == (3, size, size)


def test_the_python_api_takes_the_cli_forms_of_kernel_sizes_and_input_size():
    """One parser for both: ``kernel_sizes=3`` as ``--kernel-sizes 3``, ``input_size="3,32,32"`` as
    ``--input-size 3,32,32``."""
    a = convert("timm:test_resnet", "u", kernel_sizes=3, example_inputs="3,32,32")
    b = convert("timm:test_resnet", "u", kernel_sizes="3", example_inputs=(3, 32, 32))
    assert a.options.kernel_sizes == b.options.kernel_sizes == frozenset({(3, 3)})
    assert a.input_size == b.input_size == (3, 32, 32)
    assert (a.report.params_after, a.report.macs_after) == (b.report.params_after, b.report.macs_after)
    assert [r.name for r in a.report.replaced] == [r.name for r in b.report.replaced]
    for bad in ("3,32", "3,x,32", (3, 0, 32), (3, 32.5, 32), 32):
        with pytest.raises(SurgeryError, match="Bad input size"):
            convert("timm:test_resnet", "u", example_inputs=bad)


@pytest.mark.parametrize("classes", [0, -3, True, 2.5, "10"])
def test_num_classes_must_be_a_positive_integer(classes):
    with pytest.raises(SurgeryError, match=f"Bad num_classes {classes!r}: expected a positive integer"):
        convert(load_model("timm:test_resnet", num_classes=classes), "u", count=False)
    with pytest.raises(SurgeryError, match="Bad num_classes"):
        create_model(parse_model_spec("timm:test_resnet"), num_classes=classes)


def test_svd_init_refuses_non_finite_weights_and_names_them():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(SurgeryError, match=r"The model Sequential holds non-finite values .* 2.weight \(0 NaN, 1 inf"):
        convert(model, "u", init="svd", example_inputs=(3, 16, 16))
    convert(model, "u", example_inputs=(3, 16, 16))  # fresh weights: nothing is read from them
