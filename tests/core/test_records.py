"""``records.py``: the report is typed, and its JSON reads back to the same JSON."""

import pytest
import torch

from bsconv_surgery import Dataset, load_model
from bsconv_surgery import convert
from bsconv_surgery.core.records import ConversionReport, SiteRecord, count_by_kind

from ..helpers import DSC


@pytest.mark.parametrize("spec,variant,options", [
    ("timm:mobilenetv2_050", "s", dict(p="auto")),  # bottleneck sites, BSConv-S stem, p_auto
    ("timm:resnet18", "u", dict(kernel_sizes="3", count=False)),  # skips, nothing counted
])
def test_report_json_reads_back_to_the_same_json(spec, variant, options):
    report = convert(spec, variant, example_inputs=(3, 32, 32), **options).report
    data = report.to_json()
    again = ConversionReport.from_json(data)
    assert again.to_json() == data
    assert [r.kind for r in again.replaced] == [r.kind for r in report.replaced]
    assert again.options == report.options and again.macs_after == report.macs_after


def test_a_reordered_pair_keeps_its_details_and_svd_extras():
    report = convert(DSC(), "u", init="svd", example_inputs=(6, 16, 16), calibration=Dataset("random", limit=1),
                     allow_growth=True).report
    (site,) = report.replaced
    assert site.module_names == ["dw", "pw"] and site.details["removed"] == ["between.0", "between.1"]
    data = report.to_json()
    assert ConversionReport.from_json(data).to_json() == data
    assert data["replaced"][0]["macs_before"] == site.macs_before and "fidelity" in data


def test_site_macs_appear_only_once_counted():
    record = SiteRecord("a", "conv->bsconv_u", "Conv2d", 3, 8, [3, 3], [1, 1], 216, 48, 1, details={"init": "svd"})
    assert "macs_before" not in record.to_json() and record.to_json()["init"] == "svd"
    record.macs_before, record.macs_after, record.macs_counted = 10, None, True
    assert record.to_json()["macs_before"] == 10 and record.to_json()["macs_after"] is None
    assert SiteRecord.from_json(record.to_json()) == record


def test_count_by_kind_keeps_the_order_of_first_appearance():
    records = [SiteRecord(str(i), kind, "Conv2d", 1, 1, [1, 1], [1, 1], 1, 1, 1) for i, kind in enumerate("baab")]
    assert list(count_by_kind(records).items()) == [("b", 2), ("a", 2)]
    assert count_by_kind([{"k": "x"}], lambda r: r["k"]) == {"x": 1}


def test_model_label_and_source_of_a_module_with_a_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    report = convert(load_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), checkpoint=tmp_path / "w.pt"), "u", example_inputs=(3, 8, 8)).report
    assert report.model == "Sequential" and report.source.spec is None
    assert report.to_json()["checkpoint"] == str(tmp_path / "w.pt")
