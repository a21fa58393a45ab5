"""``bsconv-surgery compress``: the table and --json, --resume of a finished run, and its errors (exit 1, one paragraph)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["py:tests.own_models:trained_tiny", "--input-size", "3,16,16"]
BASE = ["--data", "random", "--data-batches", "4", "--steps", "4", "--batch-size", "16", "--no-speed"]
FAST = [*BASE, "--holdout", "16"]


def test_compress_prints_the_table_and_json(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("compress", *MODEL, "--target-macs", "0.6", *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    for text in ("params", "MACs", "zero-shot", "after recalibration", "after distillation", "held-out split"):
        assert text in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "surgery.json").is_file()
    again = cli("compress", *MODEL, "--target-macs", "0.6", *FAST, "--out", str(out), "--resume", "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["resumed"] and data["macs"]["after"] <= 0.6 * data["macs"]["before"]
    assert set(data["fidelity"]) == {"zero_shot", "recalibrated", "distilled"} and data["split"]["holdout"] == 16
    shown = cli("benchmark", str(out), "--trust-code", "--runs", "3", "--warmup", "1", "--prep", "eager", "--json")
    assert shown.exit_code == 0, shown.output


@pytest.mark.parametrize("args, message", [
    (["--target-macs", "1.5"], "target-macs"),
    (["--target-macs", "0.6", "--holdout", "60"], "too few"),
    (["--target-macs", "0.6", "--data", "nowhere:x"], "Unknown calibration set"),
])
def test_compress_errors(cli, tmp_path, args, message):
    result = cli("compress", *MODEL, *BASE, *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.output


def test_compress_refuses_an_existing_folder_and_an_unknown_model(cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = cli("compress", *MODEL, "--target-macs", "0.6", *FAST, "--out", str(out))
    assert result.exit_code == 1 and "already exists" in result.output and "--resume" in result.output
    result = cli("compress", "timm:no_such_net", "--target-macs", "0.6", *FAST, "--out", str(tmp_path / "new"))
    assert result.exit_code == 1 and "no_such_net" in result.output
    result = cli("compress", *MODEL, *FAST, "--out", str(tmp_path / "new"))
    assert result.exit_code == 2 and "budget" in result.output


@pytest.mark.parametrize("command", ["compress", "convert", "sensitivity"])
def test_a_converted_folder_given_as_the_model_says_what_it_is(cli, tmp_path, command):
    saved = cli("convert", "timm:test_resnet", "--out", str(tmp_path / "converted"))
    assert saved.exit_code == 0, saved.output
    extra = ["--target-macs", "0.6", "--data", "random", "--out", str(tmp_path / "run")] if command == "compress" else []
    result = cli(command, str(tmp_path / "converted"), *extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is the folder of a converted model" in result.output and "source.spec" in result.output


def test_function_matching_from_the_command_line(cli, tmp_path):
    settings = {}
    for i, method in enumerate(("plain", "function_matching")):
        out = tmp_path / f"run{i}"
        result = cli("compress", *MODEL, "--target-macs", "0.6", *FAST, "--method", method, "--out", str(out))
        assert result.exit_code == 0, result.output
        (stage,) = json.loads((out / "compress.json").read_text())["stages"]
        settings[method] = stage["distill"]["settings"]
    assert settings["plain"]["method"] == "plain" and settings["plain"]["mixup"] is None
    assert settings["function_matching"]["method"] == "function_matching" and settings["function_matching"]["mixup"] == 1.0
