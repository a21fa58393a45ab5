"""``bsconv-surgery benchmark``: a spec converted on the fly, a saved conversion, --lower, --device."""

import json

import pytest
import torch


def test_benchmark_cli_spec_and_converted_dir(cli, tmp_path):
    args = ["--input-size", "3,32,32", "--warmup", "1", "--runs", "3", "--json"]
    result = cli("benchmark", "timm:test_resnet", "--fuse", "--channels-last", *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "timm:test_resnet" and out["variant"] == "u"
    assert out["timing"]["prep"] == "fused+channels_last" and out["timing"]["batch_size"] == 1
    assert out["mac_ratio"] == pytest.approx(out["macs"]["original"] / out["macs"]["converted"], rel=1e-3)
    assert out["speedup"] == out["timing"]["speedup_median"] and out["timing"]["speedup_paired"] > 0
    assert out["params"]["converted"] < out["params"]["original"]

    saved = tmp_path / "conv"
    result = cli("convert", "timm:test_resnet", "--variant", "s", "--input-size", "3,32,32", "--out", saved)
    assert result.exit_code == 0, result.output
    result = cli("benchmark", saved, "--batch-size", "2", "--prep", "fused", *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["variant"] == "s" and out["source_dir"] == str(saved) and out["timing"]["batch_size"] == 2
    assert out["timing"]["prep"] == "fused"
    assert out["macs"]["original"] and out["macs"]["converted"]

    result = cli("benchmark", "timm:test_resnet", "--device", "cuda")
    if not torch.cuda.is_available():
        assert result.exit_code == 1 and "CUDA" in result.output and "Traceback" not in result.output


def test_benchmark_cli_lower_flag_reports_lowered_steps(cli):
    args = ["benchmark", "timm:test_resnet", "--input-size", "3,32,32", "--warmup", "1", "--runs", "3", "--json",
            "--fuse", "--channels-last", "--lower"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    timing = json.loads(result.stdout)["timing"]
    assert timing["prep"] == "fused+channels_last+lowered"
    assert timing["lowered"]["original"] == 0 and timing["lowered"]["converted"] > 0, timing["lowered"]


def test_benchmark_cli_picks_a_preparation_by_default_and_says_which(cli):
    args = ["benchmark", "timm:test_resnet", "--input-size", "3,32,32", "--warmup", "1", "--runs", "3",
            "--candidates", "fused,channels_last"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "original: " in result.output and "converted: " in result.output
    assert "measured" in result.output or "cached choice" in result.output
    result = cli(*args, "--json")
    timing = json.loads(result.stdout)["timing"]
    for name in ("original", "converted"):
        assert timing["preps"][name]["name"] in ("fused", "channels_last")
        assert timing["auto"][name]["cached"], "the first run's choice is reused"


def test_benchmark_cli_prep_errors(cli):
    result = cli("benchmark", "timm:test_resnet", "--prep", "fused", "--fuse")
    assert result.exit_code != 0 and "not both" in result.output and "Traceback" not in result.output
    result = cli("benchmark", "timm:test_resnet", "--candidates", "fused,turbo")
    assert result.exit_code != 0 and "'turbo'" in result.output and "channels_last" in result.output
    result = cli("benchmark", "timm:test_resnet", "--prep", "turbo")
    assert result.exit_code == 2 and "channels_last" in result.output
