"""The staged ``convert`` and the typed objects around it (issue 21): example inputs made once,
``Dataset``, ``Scope``, ``Target``, the options declared once, messages that name the caller's
arguments, and the two ``family`` defects."""

import copy
import dataclasses
import importlib
import inspect

import pytest
import torch
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery.cli.convert import convert as convert_command
from bsconv_surgery.conversion import stages
from bsconv_surgery.core.options import CLI_FLAGS, SURGERY_OPTIONS
from bsconv_surgery.tools.compare import _OPTIONS as COMPARE_KEYS
from bsconv_surgery.training.recipe import SurgeryConfig

from ..helpers import SmallNet, json_output, random_batches

SIZE = (3, 12, 12)


def test_convert_is_a_short_chain_of_named_stages():
    source = inspect.getsource(bs.convert)
    assert len(source.splitlines()) <= 60
    calls = [line.split("stages.")[1].split("(")[0] for line in source.splitlines() if "stages." in line]
    assert calls == ["resolve", "plan", "select", "run_passes", "measure", "recalibrate", "build_report"]


def test_no_stage_edits_another_stages_section():
    job = stages.resolve(SmallNet(), "u", {"init": "svd"}, SIZE, random_batches(2), {"macs": 0.7}, True, None, True,
                         True)
    original = stages.plan(job)
    selection = stages.select(job, original)
    chosen = copy.deepcopy(selection.report)
    passes = stages.run_passes(job.model, dataclasses.replace(job.options, sites=tuple(selection.sites)), job.inputs)
    records = [r.to_json() for r in passes.replaced]
    measurement = stages.measure(job, original, passes)
    recalibration = stages.recalibrate(job, original, measurement)
    report = stages.build_report(job, original, selection, passes, measurement, recalibration, 0.0)
    assert [r.to_json() for r in passes.replaced] == records  # MACs went on new records
    assert all(r.macs_before is None for r in passes.replaced)
    assert all(r.macs_before is not None for r in report.replaced)
    assert selection.report == chosen  # the report section is a copy with what was reached
    assert all("reached" in t for t in report.selection["targets"]) and "reached" not in chosen["targets"][0]
    # random BatchNorm statistics against random data: recalibrating raises the loss, so it is reverted
    assert report.recalibration["fidelity_before"] == measurement.fidelity == report.fidelity
    assert not report.recalibration["kept"] and report.recalibration["fidelity_recalibrated"] != measurement.fidelity


@pytest.mark.parametrize("given", [
    torch.randn(1, *SIZE), (torch.randn(2, *SIZE),), SIZE, ",".join(map(str, SIZE)),
    bs.ExampleInputs.of("classification", SIZE),
])
def test_every_form_of_example_inputs_counts_the_same(given):
    reference = bs.convert(SmallNet(), "u", example_inputs=torch.randn(1, *SIZE)).report
    report = bs.convert(SmallNet(), "u", example_inputs=given).report
    assert report.input_size == SIZE
    assert (report.params_after, report.macs_before, report.macs_after) == \
        (reference.params_after, reference.macs_before, reference.macs_after)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(5, 16, 3, padding=1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_a_tuple_of_example_inputs_feeds_a_multi_input_model():
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)
    model = TwoInputs()
    result = bs.convert(model, "u", example_inputs=(x, y), calibration=[(x, y)])
    assert result.report.macs_before == 64 * (3 + 5) * 16 * 9  # batch 1: 8x8 outputs of two 3x3 convs
    assert result.report.fidelity["samples"] == 2
    assert sorted(r.name for r in result.report.replaced) == ["a", "b"]


def test_bad_example_inputs_are_one_clear_error():
    with pytest.raises(bs.SurgeryError, match="example_inputs must be a tensor with a batch dimension"):
        bs.convert(SmallNet(), "u", example_inputs=(torch.tensor(1.0),))
    with pytest.raises(bs.SurgeryError, match="Bad input size"):
        bs.convert(SmallNet(), "u", example_inputs=(3, 0, 12))


def test_dataset_wraps_any_source_with_a_transform_and_a_limit():
    calls = []
    data = bs.Dataset(range(5), transform_fn=lambda i: calls.append(i) or torch.full((2, *SIZE), float(i)), limit=3)
    batches = data.batches()
    assert len(batches) == 3 and calls == [0, 1, 2] and float(batches[2].args[0][0, 0, 0, 0]) == 2.0
    assert data.batches() is batches  # read once, kept
    inputs = bs.ExampleInputs.of("classification", (3, 8, 8))
    named = bs.Dataset("random", limit=2, batch_size=4).batches(inputs)
    assert [tuple(b.args[0].shape) for b in named] == [(4, 3, 8, 8)] * 2
    with pytest.raises(bs.SurgeryError, match="Unknown calibration set 'imagenet'"):
        bs.Dataset("imagenet")
    with pytest.raises(bs.SurgeryError, match="not a single tensor"):
        bs.Dataset(torch.randn(2, 3, 8, 8))
    with pytest.raises(bs.SurgeryError, match="needs the model's example_inputs"):
        bs.Dataset("random").batches()
    with pytest.raises(bs.SurgeryError, match="limit must be a whole number"):
        bs.Dataset("random", limit=0)


def test_convert_and_sensitivity_take_a_dataset():
    data = bs.Dataset(random_batches(4), limit=2)
    result = bs.convert(SmallNet(), "u", example_inputs=SIZE, calibration=data)
    assert result.report.fidelity["samples"] == 16
    rows = bs.measure_sensitivity(SmallNet(), data, example_inputs=SIZE).rows
    assert all(row.fidelity["samples"] == 16 for row in rows if row.fidelity)


def test_a_scope_selects_by_pattern_and_site_type():
    net = SmallNet()
    result = bs.convert(net, "u", example_inputs=SIZE, scope=bs.Scope(include=["features.3"]))
    assert [r.name for r in result.report.replaced] == ["features.3"]
    none = bs.convert(SmallNet(), "u", example_inputs=SIZE, scope=bs.Scope(types=["dsc"]))
    assert none.report.replaced == []
    with pytest.raises(bs.SurgeryError, match="Unknown site type"):
        bs.Scope(types=["convs"])


def test_a_mistyped_exclude_is_an_error_listing_close_names(cli):
    with pytest.raises(bs.SurgeryError, match=r"exclude pattern 'features\.30' matches no candidate conv "
                                              r"\(close names: features\.3.*allow_unmatched=True"):
        bs.convert(SmallNet(), "u", example_inputs=SIZE, exclude=["features.30"])
    kept = bs.convert(SmallNet(), "u", example_inputs=SIZE, exclude=["features.30"], allow_unmatched=True)
    assert len(kept.report.replaced) == 4
    result = cli("convert", "resnet18", "--exclude", "layer9.*", "--input-size", "3,32,32")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--exclude pattern 'layer9.*' matches no candidate conv (close names: layer4." in result.output
    assert "--allow-unmatched" in result.output
    result = cli("sensitivity", "resnet18", "--include", "layer1.0.conv9", "--input-size", "3,32,32")
    assert result.exit_code == 1 and "close names: layer1.0.conv2, layer1.0.conv1" in result.output
    ok = json_output(cli("convert", "resnet18", "--exclude", "layer9.*", "--allow-unmatched", "--input-size", "3,32,32",
                         "--json"))
    assert len(ok["replaced"]) == 17  # every 3x3 conv and the stem


def test_python_and_the_cli_share_one_init_default(cli, tmp_path):
    default = SURGERY_OPTIONS["init"].default
    assert default == "auto" == bs.SurgeryOptions().init == SurgeryConfig().init
    assert {p.name: p.default for p in convert_command.params}["init"] == default
    torch.save(bs.load_model("timm:test_resnet", num_classes=3).state_dict(), tmp_path / "w.pt")
    python = bs.convert(bs.load_model("timm:test_resnet", num_classes=3, checkpoint=tmp_path / "w.pt"), "u",
                        count=False)
    command = json_output(cli("convert", "timm:test_resnet", "--num-classes", "3", "--checkpoint", tmp_path / "w.pt",
                              "--json"))
    assert python.options.init == command["options"]["init"] == "svd"
    fresh = bs.convert(bs.load_model("timm:test_resnet", num_classes=3), "u", count=False)
    assert fresh.options.init == "default"


def test_every_declared_option_reaches_the_cli_the_recipe_and_compare():
    params = {p.name: p for p in convert_command.params}
    for option in SURGERY_OPTIONS.values():
        assert option.name in params and option.cli_flag in params[option.name].opts
        assert option.name in SurgeryConfig.model_fields
        assert option.name in bs.SurgeryOptions.__dataclass_fields__
        assert option.name == "variant" or COMPARE_KEYS[option.key] == option.name
        assert CLI_FLAGS[option.name] == option.cli_flag
        if not option.multiple and not option.is_flag:
            assert params[option.name].default == option.default
        field = SurgeryConfig.model_fields[option.name]
        assert (list(option.default) if isinstance(option.default, tuple) else option.default) == \
            field.get_default(call_default_factory=True)


def test_library_messages_name_python_arguments_and_the_cli_its_flags(cli):
    with pytest.raises(bs.SurgeryError) as raised:
        bs.convert("timm:test_resnet", "u", example_inputs=(3, 32))
    assert "example_inputs" in str(raised.value) and "--" not in str(raised.value)
    result = cli("convert", "timm:test_resnet", "--input-size", "3,32")
    assert result.exit_code == 1 and "--input-size C,H,W" in result.output and "example_inputs" not in result.output
    with pytest.raises(bs.SurgeryError, match="convert\\(\\) no longer takes input_size= \\(now example_inputs="):
        bs.convert(SmallNet(), "u", input_size=SIZE)


def test_load_converted_rebuilds_at_the_saved_family(tmp_path, monkeypatch):
    """The rebuild runs the passes on the family's own arguments (it fed one tensor before)."""
    model = bs.load_model("tv:raft_small")
    result = bs.convert(model, "u", example_inputs=(3, 128, 128), count=False)
    assert result.inputs.family.name == "optical_flow"
    result.save(tmp_path / "raft")
    seen = []
    real = stages.run_passes
    monkeypatch.setattr(stages, "run_passes", lambda m, o, inputs: seen.append(inputs) or real(m, o, inputs))
    loaded = bs.load_converted(tmp_path / "raft")
    assert [(i.family.name, i.size) for i in seen] == [("optical_flow", (3, 128, 128))]
    assert loaded.inputs == result.inputs
    assert sorted(r.name for r in loaded.report.replaced) == sorted(r.name for r in result.report.replaced)


@pytest.mark.parametrize("spec,family", [("tv:ssdlite320_mobilenet_v3_large", "detection"),
                                         ("tv:lraspp_mobilenet_v3_large", "segmentation")])
def test_the_sensitivity_command_passes_the_models_family(cli, monkeypatch, spec, family):
    """The command dropped the family (a detection model was fed a plain tensor and compared as one)."""
    library = importlib.import_module("bsconv_surgery.recovery.sensitivity")  # the command reads it lazily
    seen = []

    def spy(model, data, **kwargs):
        seen.append(kwargs["example_inputs"])
        raise bs.SurgeryError("stop here")

    monkeypatch.setattr(library, "measure_sensitivity", spy)
    result = cli("sensitivity", spec, "--input-size", "3,64,64", "--calib", "random")
    assert "stop here" in result.output
    assert [(i.family.name, i.size) for i in seen] == [(family, (3, 64, 64))]


@pytest.mark.slow
def test_the_sensitivity_command_feeds_a_detection_model_its_own_arguments(cli):
    """End to end: the detection model's rows compare detections by rank."""
    out = json_output(cli("sensitivity", "tv:ssdlite320_mobilenet_v3_large", "--input-size", "3,64,64", "--calib",
                          "random", "--calib-batches", "1", "--include", "backbone.features.0.0.0", "--json"))
    rows = out["sites"]
    assert [r["name"] for r in rows] == ["backbone.features.0.0.0"]
    assert "detections_original" in rows[0]["fidelity"]


@pytest.mark.parametrize("spec, noted", [("py:tests.own_models:trained_mobile", True),
                                         ("py:tests.own_models:MobileTiny", False)])
def test_a_reorder_across_a_nonlinearity_is_noted_when_weights_are_trained(spec, noted):
    report = bs.convert(bs.load_model(spec), "u", example_inputs=(3, 16, 16)).report
    sites = {r.name: r for r in report.replaced}
    assert sites["dw1"].details["nonlinear_between"] == ["act1 (ReLU)"] and sites["dw2"].details["nonlinear_between"] == []
    assert ("cannot be kept" in sites["dw1"].details.get(stages.CANNOT_KEEP, "")) is noted
    assert stages.CANNOT_KEEP not in sites["dw2"].details and stages.CANNOT_KEEP not in sites["stem.0"].details
    assert (stages.CANNOT_KEEP in report.to_json()["replaced"][[r.name for r in report.replaced].index("dw1")]) is noted
