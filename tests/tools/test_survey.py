"""The ``models`` command's library side (``survey.py``): matching names, and counts that agree with
real conversions."""

from bsconv_surgery import convert
from bsconv_surgery.tools.survey import match_models, survey_model


def test_match_models_globs_both_zoos_and_prefixes():
    names = {str(s) for s in match_models("resnet18")}
    assert names == {"timm:resnet18", "torchvision:resnet18"}
    assert all(s.source == "torchvision" for s in match_models("tv:mobilenet_v*"))
    assert {s.name for s in match_models("tv:mobilenet_v*")} == {"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"}


def test_survey_counts_agree_with_a_real_conversion():
    spec = match_models("timm:mobilenetv2_050")[0]
    row = survey_model(spec)
    for variant in ("u", "s"):
        report = convert(str(spec), variant, count=False).report.to_json()
        kinds = {}
        for r in report["replaced"]:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        assert row[variant]["sites"] == kinds, variant
        assert row[variant]["skipped"] == len(report["skipped"]), variant
    assert row["params"] == 1_968_680


