"""``bsconv-surgery sensitivity`` and ``convert --target-macs/--target-params/--recalibrate-bn`` (issue 15)."""

import math

import pytest

from ..helpers import json_output

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = ["timm:test_resnet", "--input-size", "3,16,16"]


def test_sensitivity_json_is_sorted_by_loss_per_mac(cli):
    data = json_output(cli("sensitivity", *MODEL, "--calib", "random", "--calib-batches", "1", "--json"))
    rows = data["sites"]
    assert len(rows) >= 4 and data["calib"] == "random"
    assert data["loss"] == "decision: softmax KL + disagreement on the output (logits)"
    assert all(r["loss"] == pytest.approx(1 - r["fidelity"]["top1_agreement"] + r["fidelity"]["kl_divergence"])
               for r in rows)
    per = [r["loss_per_mmac_saved"] if r["loss_per_mmac_saved"] is not None else math.inf for r in rows]
    assert per == sorted(per)
    assert all(r["fidelity"]["samples"] == 16 and r["macs_saved"] and 0 < r["energy_kept"] <= 1 for r in rows)


def test_sensitivity_table_plot_and_refusals(cli, tmp_path):
    plot = tmp_path / "sens.png"
    result = cli("sensitivity", *MODEL, "--calib", "random", "--calib-batches", "1", "--plot", plot)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "each site converted alone" in text and "loss per million MACs saved" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cli("sensitivity", *MODEL, "--plot", plot)
    assert result.exit_code == 1 and "already exists" in result.output
    result = cli("sensitivity", *MODEL)
    assert result.exit_code == 0 and "No calibration data, so nothing was measured" in " ".join(result.stdout.split())
    result = cli("sensitivity", *MODEL, "--recalibrate-bn")
    assert result.exit_code == 2 and "--recalibrate-bn needs --calib" in result.output


def test_convert_to_a_budget(cli):
    data = json_output(cli("convert", *MODEL, "--init", "svd", "--target-macs", "0.7", "--calib", "random",
                           "--calib-batches", "2", "--recalibrate-bn", "--json"))
    sel = data["selection"]
    (target,) = sel["targets"]
    assert target["met"] and data["macs_after"] == target["reached"] <= 0.7 * data["macs_before"]
    assert data["options"]["sites"] == [c["name"] for c in sel["chosen"]]
    assert "measured_loss" in sel and "fidelity_before" in data["recalibration"]
    assert isinstance(data["recalibration"]["kept"], bool) and sel["loss"].startswith("decision: softmax KL")


@pytest.mark.parametrize("command", ["sensitivity", "convert"])
def test_a_named_metric_and_the_errors(cli, command):
    data = json_output(cli(command, *MODEL, "--calib", "random", "--calib-batches", "1", "--metric", "relative-error",
                           "--json"))
    if command == "sensitivity":
        assert data["loss"] == "relative output error"
        assert all(r["loss"] == pytest.approx(r["fidelity"]["relative_logit_error"]) for r in data["sites"])
    else:
        assert data["fidelity"]["loss"] == pytest.approx(data["fidelity"]["relative_logit_error"])
    result = cli(command, *MODEL, "--calib", "random", "--metric", "kld")
    assert result.exit_code == 1 and "Unknown --metric 'kld'. Valid metrics: auto, bce, disagreement, kl, " \
        "relative-error." in " ".join(result.output.split()) and "Traceback" not in result.output
    result = cli(command, *MODEL, "--metric", "kl")
    assert result.exit_code == 2 and "--metric needs --calib" in result.output


def test_convert_to_a_budget_for_people_and_the_errors(cli):
    result = cli("convert", *MODEL, "--init", "svd", "--target-params", "0.5")
    assert result.exit_code == 0, result.output
    assert "Chosen sites" in result.stdout and "Budget" in result.stdout
    assert "without --calib nothing was measured" in result.stderr
    result = cli("convert", *MODEL, "--target-macs", "0.01")
    assert result.exit_code == 1 and "cannot be reached" in result.output and "Traceback" not in result.output
    result = cli("convert", *MODEL, "--target-macs", "lots")
    assert result.exit_code == 1 and "Bad --target-macs 'lots'" in result.output


@pytest.mark.parametrize("spec, noted", [("py:tests.own_models:trained_mobile", True),
                                         ("py:tests.own_models:MobileTiny", False)])
def test_convert_says_when_a_reorder_cannot_keep_trained_weights(cli, spec, noted):
    result = cli("convert", spec, "--input-size", "3,16,16")
    assert result.exit_code == 0, result.output
    line = "1 depthwise-separable reorder(s) cross a nonlinearity (dw1): with trained weights"
    assert (line in " ".join(result.stderr.split())) is noted
    result = cli("sensitivity", spec, "--input-size", "3,16,16")
    assert result.exit_code == 0 and "cross a nonlinearity (dw1)" in " ".join(result.stdout.split())
