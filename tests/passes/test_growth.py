"""No silent growth: a standard conv whose replacement would not have fewer parameters or MACs is
skipped with that reason; --allow-growth converts it. Totals stay exact either way."""

import json
import re

import pytest
import timm
import torch
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery.layers import bsconv_macs, bsconv_s_params, bsconv_u_params, conv_macs
from bsconv_surgery.tools.survey import survey_model
from bsconv_surgery.models.zoo import parse_model_spec

from ..helpers import DSC, OneChannel, json_output, register_test_zoo

pytestmark = pytest.mark.usefixtures("one_thread")

register_test_zoo()

SIZE = (1, 16, 16)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _growth(report, name):
    return next((s.reason for s in report.skipped if s.name == name and "--allow-growth" in s.reason), None)


@pytest.mark.parametrize("variant", ["u", "s"])
def test_one_input_channel_conv_is_skipped_then_converted_with_allow_growth(variant):
    model = OneChannel()
    before = _params(model)
    # front: M=1, N=32, 3x3, bias. BSConv-U: 1*32 + 32*9 + 32 = 352 > 320; BSConv-S (M' = 1): 1 + 32 + 288 + 32 = 353
    grown = bsconv_u_params(1, 32, (3, 3), bias=True) if variant == "u" else bsconv_s_params(1, 32, (3, 3), None, 1, True)
    assert (grown, _params(model.front)) == ((352 if variant == "u" else 353), 320)
    shrunk = (bsconv_u_params(32, 32, (3, 3)) if variant == "u" else bsconv_s_params(32, 32, (3, 3), None, 8))
    report = bs.convert(model, variant, example_inputs=SIZE).report
    reason = _growth(report, "front")
    assert reason is not None and f"parameters (320 -> {grown})" in reason and "MACs" in reason
    assert "front" not in {r.name for r in report.replaced} and "conv" in {r.name for r in report.replaced}
    # nothing hidden: the totals are the closed forms of what was converted
    patch = [r for r in report.replaced if r.name == "patch"]
    expected = before - 32 * 32 * 9 + shrunk - sum(r.params_before - r.params_after for r in patch)
    assert report.params_after == _params(model) == expected

    model = OneChannel()
    report = bs.convert(model, variant, example_inputs=SIZE, allow_growth=True).report
    front = next(r for r in report.replaced if r.name == "front")
    assert (front.params_before, front.params_after) == (320, grown) == (320, _params(model.front))
    assert not [s for s in report.skipped if "--allow-growth" in s.reason]
    assert report.params_after == _params(model)
    assert report.options.allow_growth


def test_patchify_conv_grows_macs_and_the_reason_gives_fvcores_numbers():
    """A 4x4/4 conv: the pointwise step runs at the input's resolution, before the stride. The
    numbers in the reason are the closed forms; with --allow-growth fvcore counts the same."""
    report = bs.convert(OneChannel(), "u", example_inputs=SIZE).report
    reason = _growth(report, "patch")
    before, after = conv_macs(32, 48, (4, 4), 16), bsconv_macs(32, 48, (4, 4), 256, 16)
    assert before < after and "parameters" not in reason
    assert f"grow the MACs ({before:,} -> {after:,})" in reason
    grown = bs.convert(OneChannel(), "u", example_inputs=SIZE, allow_growth=True).report
    site = next(r for r in grown.replaced if r.name == "patch")
    assert (site.macs_before, site.macs_after) == (before, after)
    assert grown.macs_after - grown.macs_before == sum(r.macs_after - r.macs_before for r in grown.replaced)


def test_convnext_keeps_its_patchify_stem_and_downsamplers():
    """ConvNeXt's 4x4/4 stem and 2x2/2 downsamplers: BSConv-U would add MACs, so they are skipped;
    --allow-growth converts them and the MACs rise, as the zoo table showed for convnext_base."""
    kept = bs.convert("timm:convnext_atto", "u", example_inputs=(3, 64, 64)).report
    skipped = {s.name for s in kept.skipped if "--allow-growth" in s.reason}
    assert skipped == {"stem.0", "stages.1.downsample.1", "stages.2.downsample.1", "stages.3.downsample.1"}
    assert (kept.params_after, kept.macs_after) == (kept.params_before, kept.macs_before)
    grown = bs.convert("timm:convnext_atto", "u", example_inputs=(3, 64, 64), allow_growth=True).report
    assert {r.name for r in grown.replaced} == skipped
    assert grown.macs_after > grown.macs_before and grown.params_after < grown.params_before


def _dsc_macs(m, n, k, hw_in, hw_out):
    """Conv MACs of dw KxK (M) + pw (M -> N) before the reorder, and pw + dw (N) after it."""
    before = m * k * k * hw_out + m * n * hw_out
    return before, m * n * hw_in + n * k * k * hw_out


def test_stride_2_depthwise_separable_block_is_not_reordered_without_allow_growth():
    """M = N, stride 2: the parameters shrink (the norm between goes), but the pointwise step would
    run before the stride, at 4x the positions: the guard says so with the closed-form MACs."""
    model = DSC(m=8, n=8, k=(3, 3), stride=2, between=[nn.BatchNorm2d(8), nn.ReLU()], dw_bias=False)
    report = bs.convert(model, "u", example_inputs=(8, 16, 16)).report
    assert report.replaced == [] and isinstance(model.dw, nn.Conv2d)
    (skip,) = report.skipped
    before, after = _dsc_macs(8, 8, 3, 16 * 16, 8 * 8)
    assert after > 2.4 * before  # 8,704 -> 20,992: the pointwise runs at 4x the positions
    assert f"MACs ({before:,} -> {after:,})" in skip.reason and "before the stride 2x2" in skip.reason
    assert "parameters" not in skip.reason and "--allow-growth" in skip.reason

    grown = bs.convert(DSC(m=8, n=8, k=(3, 3), stride=2, between=[nn.BatchNorm2d(8), nn.ReLU()], dw_bias=False),
                       "u", example_inputs=(8, 16, 16), allow_growth=True).report
    (site,) = grown.replaced
    # fvcore's totals also count the BatchNorm that went: the conv MACs dominate the change
    assert site.kind == "dsc->bsconv_u" and grown.macs_after - grown.macs_before > 0.9 * (after - before) > 0


@pytest.mark.parametrize("n, k, grows", [(6, 3, False), (12, 3, True), (12, 1, True)])
def test_stride_1_reorder_is_refused_only_when_it_grows(n, k, grows):
    """Stride 1: the MACs change by K^2 (N - M) per position and the parameters by K^2 (N - M) - 2M."""
    model = DSC(m=6, n=n, k=(k, k), stride=1, between=[nn.BatchNorm2d(6), nn.ReLU()], dw_bias=False,
                padding_mode="zeros")
    report = bs.convert(model, "u", example_inputs=(6, 10, 10)).report
    assert bool(report.skipped) == grows and bool(report.replaced) == (not grows)
    if grows:
        before, after = _dsc_macs(6, n, k, 100, 100)
        params = 6 * k * k + 2 * 6 + 6 * n + n
        delta = k * k * (n - 6) - 12  # a 1x1 "depthwise" loses more with the norm than it gains
        assert (f"parameters ({params:,} -> {params + delta:,})" in report.skipped[0].reason) == (delta > 0)
        assert f"MACs ({before:,} -> {after:,})" in report.skipped[0].reason


def test_mobilenetv1_reorders_only_the_blocks_that_do_not_grow():
    model = timm.create_model("mobilenetv1_100")
    shapes = {name: (b.conv_dw.in_channels, b.conv_pw.out_channels, b.conv_dw.stride[0])
              for name, b in model.named_modules() if type(b).__name__ == "DepthwiseSeparableConv"}
    report = bs.convert(model, "u", exclude=["conv_stem"], example_inputs=(3, 64, 64)).report
    kept = {r.name.rsplit(".", 1)[0] for r in report.replaced}
    assert kept == {name for name, (m, n, stride) in shapes.items() if n == m and stride == 1} and len(kept) == 8
    assert report.macs_after <= report.macs_before and report.params_after < report.params_before
    assert all("--allow-growth" in s.reason for s in report.skipped if s.kind == "dsc->bsconv_u")
    everything = bs.convert("timm:mobilenetv1_100", "u", exclude=["conv_stem"], example_inputs=(3, 64, 64),
                            allow_growth=True).report
    assert len(everything.replaced) == 13 and everything.macs_after > everything.macs_before  # paper 4.1


def test_budgets_never_choose_a_site_that_grows():
    """With --allow-growth the growing reorders are candidates of a plain conversion, never of a budget."""
    model = timm.create_model("mobilenetv1_100", num_classes=4)
    result = bs.convert(model, "u", example_inputs=(3, 32, 32), allow_growth=True, target={"params": 0.999})
    selection = result.report.to_json()["selection"]
    left_out = {s["name"] for s in selection["growing_sites_left_out"]}
    assert left_out and not left_out & {r.name for r in result.report.replaced}
    assert all(s["params_saved"] < 0 or (s["macs_saved"] or 0) < 0 for s in selection["growing_sites_left_out"])
    assert result.report.params_after <= 0.999 * result.report.params_before


def test_a_saved_growing_reorder_rebuilds_whatever_the_guard_says(tmp_path):
    """Files record the sites they converted: a rebuild converts exactly those, so a file written
    before the reorder had a growth guard (or with --allow-growth) still loads."""
    result = bs.convert(bs.load_model("timm:mobilenetv1_100", num_classes=3), "u", example_inputs=(3, 32, 32),
                        allow_growth=True)
    result.save(tmp_path / "grown")
    path = tmp_path / "grown" / "surgery.json"
    meta = json.loads(path.read_text())
    meta["options"]["allow_growth"] = meta["report"]["options"]["allow_growth"] = False
    path.write_text(json.dumps(meta))
    loaded = bs.load_converted(tmp_path / "grown")
    x = torch.randn(1, 3, 32, 32)
    result.model.eval(), loaded.model.eval()
    assert torch.equal(result.model(x), loaded.model(x))


def test_meta_device_survey_and_count_free_paths_skip_the_same_sites():
    """The models command builds on the meta device and converts with count=False: the same guard."""
    row = survey_model(parse_model_spec("timm:toy_one_channel"))
    counted = bs.convert(timm.create_model("toy_one_channel"), "u", example_inputs=SIZE).report
    assert row["u"]["sites"] == {"conv->bsconv_u": len(counted.replaced)} == {"conv->bsconv_u": 1}
    uncounted = bs.convert(timm.create_model("toy_one_channel"), "u", count=False, example_inputs=SIZE).report
    assert [s.name for s in uncounted.skipped] == [s.name for s in counted.skipped]


def test_a_growth_skip_survives_save_and_load(tmp_path):
    result = bs.convert("timm:toy_one_channel", "u")
    assert _growth(result.report, "front") and _growth(result.report, "patch")
    result.save(tmp_path / "saved")
    loaded = bs.load_converted(tmp_path / "saved")
    assert isinstance(loaded.model.front, nn.Conv2d) and isinstance(loaded.model.conv, bs.BSConvU)
    x = torch.randn(2, *SIZE)
    result.model.eval(), loaded.model.eval()
    assert torch.equal(result.model(x), loaded.model(x))


def test_files_saved_before_allow_growth_existed_rebuild_every_site(tmp_path):
    """Such files converted every conv: they read as allow_growth=true, so the rebuild fits the weights."""
    result = bs.convert("timm:toy_one_channel", "u", allow_growth=True)
    result.save(tmp_path / "old")
    path = tmp_path / "old" / "surgery.json"
    meta = json.loads(path.read_text())
    del meta["options"]["allow_growth"], meta["report"]["options"]["allow_growth"]
    path.write_text(json.dumps(meta))
    loaded = bs.load_converted(tmp_path / "old")
    assert loaded.options.allow_growth and isinstance(loaded.model.front, bs.BSConvU)


def test_cli_growth_skip_and_allow_growth(cli):
    out = json_output(cli("convert", "timm:toy_one_channel", "--json"))
    front = next(s for s in out["skipped"] if s["name"] == "front")
    assert re.search(r"grow the parameters \(320 -> 352\) and the MACs \([\d,]+ -> [\d,]+\); --allow-growth",
                     front["reason"])
    grown = json_output(cli("convert", "timm:toy_one_channel", "--allow-growth", "--json"))
    site = next(r for r in grown["replaced"] if r["name"] == "front")
    assert (site["params_before"], site["params_after"]) == (320, 352)
    assert grown["params_after"] - out["params_after"] == (352 - 320) + sum(
        r["params_after"] - r["params_before"] for r in grown["replaced"] if r["name"] == "patch")
    assert grown["options"]["allow_growth"] is True and out["options"]["allow_growth"] is False
    table = cli("compare", "timm:toy_one_channel", "--variant", "u", "--variant", "u:allow-growth", "--json",
                "--no-cross-check")
    params = [v["params"] for v in json_output(table)["variants"]]
    assert params == [out["params_after"], grown["params_after"]]
