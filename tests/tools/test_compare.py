"""``compare``: variant SPECs, the side-by-side and per-stage budgets, JSON and CSV, and the
paper's reference budgets (NOTES.md) reproduced through the surgery on the CIFAR architectures."""

import pytest
import torch
from torch import nn

from bsconv_surgery import SurgeryError, convert
from bsconv_surgery.tools.compare import VariantSpec, compare, parse_variant, parse_variants
from bsconv_surgery.analysis.stages import HEAD, MODEL_OPS, model_stages, stage_budgets
from bsconv_surgery.analysis.counting import count_budget
from bsconv_surgery.layers import BSConvS, BSConvU, SubspaceProjection
from bsconv_surgery.layers.regularization import regularization_sites


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# The reference budgets: NOTES.md "Reference budgets" and the paper's Table 2 (MACs at 3x32x32).
# Each row: model, variant SPEC, classes, exact params, paper MACs (None: not in Table 2).
# --------------------------------------------------------------------------------------------

MOBILENETV2_S = "s:p=1/6,exclude=stem.conv"  # the paper's MobileNetV2 + BSConv-S keeps its stem conv

REFERENCE = [
    ("cifar_resnet20", "orig", 10, 272_480, 41.3e6),
    ("cifar_resnet20", "orig", 100, 278_330, 41.3e6),
    ("cifar_resnet110", "u", 10, 238_960, 41.1e6),
    ("cifar_resnet110", "u", 100, 244_810, 41.1e6),
    ("cifar_wrn40_3", "orig", 10, 5_038_560, 735.0e6),
    ("cifar_wrn40_8", "u", 10, 4_240_112, 671.6e6),
    ("cifar_wrn16_4", "orig", 10, 2_748_896, None),
    ("cifar_wrn16_4", "u", 10, 364_528, None),
    ("cifar_wrn16_4", "s:p=1/4,with-bn", 10, 213_607, None),
    ("cifar_mobilenetv2_100", "orig", 10, 2_237_776, None),
    ("cifar_mobilenetv2_100", MOBILENETV2_S, 10, 2_237_776, None),
]

# one compare() per model and class count, all its variants in one go
_RUNS = {}
for _model, _spec, _classes, _, _ in REFERENCE:
    _RUNS.setdefault((_model, _classes), []).append(_spec)


@pytest.fixture(scope="module")
def reference_runs():
    return {(model, classes): compare(model, specs, num_classes=classes) for (model, classes), specs in _RUNS.items()}


def _variant(comparison, spec):
    return next(v for v in comparison.variants if v.spec.label == spec)


@pytest.mark.parametrize("model,spec,classes,params,paper_macs", REFERENCE,
                         ids=[f"{m}-{s}-{c}" for m, s, c, _, _ in REFERENCE])
def test_reference_budget(reference_runs, model, spec, classes, params, paper_macs):
    comparison = reference_runs[(model, classes)]
    v = _variant(comparison, spec)
    assert comparison.input_size == (3, 32, 32)  # the registered models' default
    assert v.params == params
    if paper_macs is not None:
        # the paper's FLOPs are MACs including BatchNorm: fvcore's total is within 1%
        assert abs(v.macs - paper_macs) / paper_macs < 0.02, v.macs
    assert v.budget.conv_check.agree, v.budget.conv_check
    assert v.budget.warnings() == []


def test_reference_variants_come_from_the_surgery(reference_runs):
    """No hand-built model: every BSConv variant is the surgery's conversion of the original."""
    wrn_u = _variant(reference_runs[("cifar_wrn16_4", 10)], "u")
    assert wrn_u.sites() == {"conv->bsconv_u": 13, "skipped": 0}  # stem + 12 block convs; 1x1 kept
    wrn_s = _variant(reference_runs[("cifar_wrn16_4", 10)], "s:p=1/4,with-bn")
    assert wrn_s.sites() == {"conv->bsconv_s": 13, "skipped": 0}
    assert wrn_s.report.to_json()["options"]["with_bn"] is True and wrn_s.report.to_json()["options"]["p"] == "1/4"
    resnet_u = _variant(reference_runs[("cifar_resnet110", 10)], "u")
    assert resnet_u.sites() == {"conv->bsconv_u": 109, "skipped": 0}


def test_mobilenetv2_bsconv_s_is_the_bottleneck_rewrite(reference_runs):
    """MobileNetV2 + BSConv-S p=1/6: every bottleneck projection becomes a subspace projection
    (paper 4.2), parameters and MACs unchanged; the stem conv is left alone as in the paper."""
    comparison = reference_runs[("cifar_mobilenetv2_100", 10)]
    orig, s = _variant(comparison, "orig"), _variant(comparison, MOBILENETV2_S)
    assert s.sites() == {"bottleneck->bsconv_s": 17, "skipped": 1}  # 17 inverted residuals; stem skipped
    assert (s.params, s.macs) == (orig.params, orig.macs)
    assert {r["name"] for r in s.report.to_json()["skipped"]} == {"stem.conv"}


def test_mobilenetv2_projections_carry_the_regulariser():
    result = convert("cifar_mobilenetv2_100", "s", p="1/6", exclude=["stem.conv"], count=False)
    sites = dict(regularization_sites(result.model))
    assert len(sites) == 17 and all(isinstance(m, SubspaceProjection) for m in sites.values())
    assert all(name.endswith("conv_pwl") for name in sites)
    assert not any(isinstance(m, (BSConvS, BSConvU)) for m in result.model.modules())


def test_stages_sum_to_totals(reference_runs):
    for comparison in reference_runs.values():
        for v in comparison.variants:
            assert sum(p for p, _ in v.stages.values()) == v.params
            assert sum(m for _, m in v.stages.values()) == v.macs


def test_per_stage_breakdown_uses_feature_stages(reference_runs):
    comparison = reference_runs[("cifar_wrn16_4", 10)]
    rows = comparison.rows()
    assert [r.name for r in rows] == ["stem", "stages.0", "stages.1", "stages.2", HEAD]
    assert rows[0].also == ("data_bn",) and rows[-1].also == ("final", "fc")
    assert [r.reduction for r in rows[:4]] == [1, 1, 2, 4]
    orig, u = _variant(comparison, "orig"), _variant(comparison, "u")
    assert orig.stages["head"] == u.stages["head"]  # the head has no 3x3 conv
    assert u.stages["stages.2"][0] < orig.stages["stages.2"][0] / 5


# --------------------------------------------------------------------------------------------
# stages without timm feature info: top-level children
# --------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        x = self.pool(self.body(x)).flatten(1)
        return self.fc(x) * self.scale + torch.nn.functional.adaptive_avg_pool2d(x[:, :, None, None], 1).mean()


def test_top_level_children_without_feature_info():
    model = _Toy()
    stages = model_stages(model)
    assert [s.name for s in stages] == ["body", "pool", "fc", HEAD, MODEL_OPS]
    budget = count_budget(model, (3, 8, 8))
    rows = stage_budgets(model, budget, stages)
    assert rows["body"][0] == 3 * 8 * 9 + 8 + 16 and rows["fc"][0] == 36
    assert rows[MODEL_OPS][0] == 1  # a parameter registered on the model itself
    assert rows[MODEL_OPS][1] == 8  # the functional pooling in the model's own forward
    assert sum(p for p, _ in rows.values()) == budget.params
    assert sum(m for _, m in rows.values()) == budget.macs


# --------------------------------------------------------------------------------------------
# variant SPECs
# --------------------------------------------------------------------------------------------


def test_parse_variant_specs():
    assert parse_variant("orig") == VariantSpec("orig", None)
    assert parse_variant("s:p=1/6").kwargs == {"p": "1/6"}
    assert parse_variant("s:p=auto").kwargs == {"p": "auto"}
    assert parse_variant("u:kernel-sizes=3,5").kwargs == {"kernel_sizes": "3,5"}
    spec = parse_variant("s:p=1/4,with-bn")
    assert spec.kwargs == {"p": "1/4", "with_bn": True} and spec.label == "s:p=1/4,with-bn"
    assert parse_variant("s:p=1/4:with-bn").label == "s:p=1/4,with-bn"
    assert parse_variant("u:exclude=stem.conv,stages.0.*").kwargs == {"exclude": ("stem.conv", "stages.0.*")}
    assert parse_variant("s:min-mid-channels=2").kwargs == {"min_mid_channels": 2}
    assert [s.label for s in parse_variants(["orig,u,s"])] == ["orig", "u", "s"]
    assert [s.label for s in parse_variants(["u:kernel-sizes=3,5,s:p=1/6", "orig"])] == [
        "u:kernel-sizes=3,5", "s:p=1/6", "orig"]


@pytest.mark.parametrize("text,needle", [
    ("x", "Unknown variant 'x'"),
    ("u:q=1", "Bad option 'q=1'"),
    ("s:p=2", "Bad p '2'"),
    ("s:p=0", "Bad p '0'"),
    ("orig:p=1/4", "takes no options"),
    ("u:kernel-sizes=a", "Bad kernel size"),
    ("s:with-bn=maybe", "expected true or false"),
    ("s:p=1/4,p=1/6", "given twice"),
    ("u,u", "given twice"),
    ("u:init=svd-magic", "Unknown init"),
])
def test_bad_variant_spec_names_what_is_allowed(text, needle):
    with pytest.raises(SurgeryError) as info:
        parse_variants([text])
    assert needle in str(info.value)
    if "Unknown variant" in needle or "Bad option" in needle:
        assert "orig, s, u" in str(info.value) and "kernel-sizes" in str(info.value)


def test_p_auto_variant():
    comparison = compare("cifar_resnet20", ["s:p=auto"], cross_check=False)
    v = comparison.variants[0]
    assert v.sites()["conv->bsconv_s"] == 19
    assert v.params < comparison.original.params
    assert "p_auto" in v.report.to_json()


def test_resnet302_counts():
    comparison = compare("cifar_resnet302", ["orig", "u"])
    orig, u = comparison.variants
    assert orig.params == 4_841_632
    assert u.sites() == {"conv->bsconv_u": 301, "skipped": 0}
    assert all(v.budget.conv_check.agree for v in comparison.variants)
